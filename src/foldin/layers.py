"""Which parameters are linear-layer weights (the ones OPCM projects).

A pattern may also select convolution kernels: OPCM then reads a kernel of shape
(out, in, kh, kw) as the (out, in * kh * kw) matrix it applies to image patches.

In order of preference: an explicit regular expression from the user; the model's own modules
(every ``nn.Linear``, as FusionBench walks them), built on the meta device from the checkpoint's
config.json; and, for plain state dicts, a documented fallback rule: a 2-D floating tensor whose
name ends in ``weight`` and does not look like an embedding.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from foldin.errors import FoldinError
from foldin.io.hf_names import file_names, prefixed_matches

FALLBACK_EXCLUDE = re.compile(r"embed|wte|wpe|position|token_type|shared", re.IGNORECASE)


def fallback_rule(name: str, shape: tuple[int, ...]) -> bool:
    """2-D `*weight` tensors that are not embeddings (embedding tables are nn.Embedding, not nn.Linear)."""
    return len(shape) == 2 and name.endswith("weight") and not FALLBACK_EXCLUDE.search(name)


def from_module(module: nn.Module) -> set[str]:
    """Names of the weights of every nn.Linear (including subclasses) in a module, both as the module
    names them and as its files do where transformers maps the two (see foldin.io.hf_names)."""
    names = {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    return names | set(file_names(module, names).values())


def _model_from_config(config_dir: Path) -> nn.Module | None:
    """Instantiate the checkpoint's architecture on the meta device (no memory, no weights)."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls._from_config(config) if cls is not None else AutoModel.from_config(config)
    except Exception:  # an unknown or custom architecture: fall back to the name rule
        return None


def _align(model_names: set[str], checkpoint_names: Iterable[str]) -> set[str]:
    """Map module-derived names onto checkpoint keys, which may add or drop a prefix such as 'bert.'."""
    keys = set(checkpoint_names)
    found = model_names & keys
    for name in model_names - found:
        matches = prefixed_matches(name, keys)
        if len(matches) == 1:
            found.add(matches[0])
    return found


def resolve_linear_weights(
    specs: Mapping[str, tuple[int, ...]],
    *,
    pattern: str | None = None,
    config_dir: Path | None = None,
    module: nn.Module | None = None,
) -> tuple[list[str], str]:
    """Return (sorted names of linear-layer weights, how they were determined)."""
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise FoldinError(f"--linear-weights {pattern!r} is not a valid regular expression: {e}.") from e
        names = [n for n in specs if rx.fullmatch(n)]
        bad = [n for n in names if len(specs[n]) < 2]
        if bad:
            raise FoldinError(
                f"--linear-weights matches {bad[0]!r}, which has fewer than two dimensions (not a weight matrix)."
            )
        return sorted(names), f"pattern {pattern!r}"
    if module is None and config_dir is not None:
        module = _model_from_config(config_dir)
        source = f"nn.Linear modules of the architecture in {config_dir / 'config.json'}"
    else:
        source = "nn.Linear modules of the given module"
    if module is not None:
        found = _align(from_module(module), specs)
        found = {n for n in found if len(specs[n]) == 2}
        if found:
            return sorted(found), source
    return sorted(n for n, shape in specs.items() if fallback_rule(n, shape)), (
        "fallback rule: 2-D '*weight' tensors whose names do not contain embed/wte/wpe/position/token_type/shared"
    )
