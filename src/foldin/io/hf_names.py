"""The names a transformers model gives its weights in memory and the names its files use.

foldin merges checkpoints by the names in their files. transformers 5 renamed some modules in
memory and maps the names when it loads and saves: DINOv2's `attention.attention.query` is
`attention.q_proj` in a v5 model, while `save_pretrained` still writes `attention.attention.query`
(its default `save_original_format=True`). transformers 4 uses the file names in memory too. So a
module-derived name (which weights are nn.Linear) must be translated before it is matched with a
checkpoint's keys, and a state dict read from files must be translated before `load_state_dict`.
Both directions are derived from transformers' own reverse mapping (the one `save_pretrained`
applies); with transformers 4, or for a model with no mapping, every name maps to itself. Names
may also differ by a module prefix ('bert.'), which `prefixed_matches` allows for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def _reverse_renamer(model: nn.Module):
    """A function from an in-memory name to the name `save_pretrained` writes, or None (no mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            apply_converters,
            apply_renamings,
        )
    except ImportError:  # transformers 4: the names in memory are the names in files
        return None
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built from a config, not loaded: the default mapping, as save_pretrained uses
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            return None
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    if not renamings and not converters:
        return None
    return lambda name: apply_renamings(apply_converters(name, converters)[0], renamings)


def prefixed_matches(name: str, keys: Iterable[str]) -> list[str]:
    """The keys that are `name` with a module prefix added or dropped (a task model's 'bert.' that
    the base model lacks, or the other way round): those ending in '.name', else those that '.key' ends."""
    keys = list(keys)
    return [k for k in keys if k.endswith("." + name)] or [k for k in keys if name.endswith("." + k)]


def file_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{in-memory name: the name in the model's files} for `names` of `model`'s parameters or buffers."""
    rename = _reverse_renamer(model)
    return {n: rename(n) if rename else n for n in names}


def to_model_names(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with file names replaced by `model`'s in-memory names (names it knows stay)."""
    own = model.state_dict().keys()
    saved = file_names(model, own)
    counts = Counter(saved.values())  # a tensor split in memory (one file name for several) is not renamed
    by_file = {file: name for name, file in saved.items() if file != name and counts[file] == 1}
    return {(n if n in own else by_file.get(n, n)): t for n, t in state_dict.items()}
