"""PEFT LoRA adapter folders as checkpoints: a fine-tuned model that is its base plus, for each
adapted linear layer, the low-rank update  B @ A * scaling  (scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA; rank_pattern / alpha_pattern per module), exactly what PEFT's
merge_and_unload computes. The dense weight is built one tensor at a time when the engine asks for
it, so an adapter costs no more memory than its largest adapted matrix and nothing on disk.

Supported: LoRA (adapter_config.json with peft_type LORA), fan_in_fan_out, rsLoRA, rank and alpha
patterns; and tensors stored whole, which replace the base's: `modules_to_save` and the biases
that bias "lora_only" or "all" stores (what `foldin export --lora-full-tensors` writes, so foldin
reads its own adapters back). Refused with a clear error: DoRA, LoRA's own bias terms
(`lora_bias`), other PEFT types.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from foldin.errors import CheckpointError
from foldin.io.checkpoint import Checkpoint, open_checkpoint
from foldin.io.hf_names import prefixed_matches
from foldin.io.specs import Spec

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
# what PEFT puts between a module and its parameter in a whole tensor's key: a LoRA layer's wrapped
# layer (its bias), or the copy it trains of a module to save
WHOLE_INFIX = re.compile(r"\.(?:base_layer|modules_to_save(?:\.default)?)\.")


def is_lora_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """`base` with the adapter's updates applied (tensor names and dtypes are the base's)."""

    def __init__(self, path: Path, base: Checkpoint):
        config = self._config(path)
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(
                f"{path} is a LoRA adapter without adapter_model.safetensors (adapter_model.bin is not read)."
            )
        super().__init__(path, [path / "adapter_config.json", weights])
        self._base = base
        self._adapter = open_checkpoint(weights)
        self._fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        pairs: dict[str, dict[str, str]] = {}
        base_names = set(base.names())
        self._whole: dict[str, str] = {}  # base tensor name -> the adapter's key holding its new value
        whole_allowed = bool(config.get("modules_to_save")) or config.get("bias", "none") != "none"
        for key in self._adapter.names():
            m = LORA_KEY.match(key.removeprefix(PREFIX))
            if m is not None:
                pairs.setdefault(m["module"], {})[m["ab"]] = key
            elif whole_allowed:
                self._whole[self._base_name(WHOLE_INFIX.sub(".", key.removeprefix(PREFIX)), base_names, path)] = key
            else:
                raise CheckpointError(
                    f"{path}: adapter tensor {key!r} is not a LoRA A or B matrix, and the adapter declares no "
                    f"modules_to_save or bias that would store it whole."
                )
        self._updates: dict[str, tuple[str, str, float]] = {}  # base tensor name -> (A key, B key, scaling)
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{path}: module {module!r} has lora_{next(iter(ab))} but not its partner.")
            target = self._base_name(f"{module}.weight", base_names, path)
            r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            self._updates[target] = (ab["A"], ab["B"], scaling)

    @staticmethod
    def _config(path: Path) -> dict:
        try:
            config = json.loads((path / "adapter_config.json").read_text())
            if not isinstance(config, dict):
                raise ValueError
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / 'adapter_config.json'} is not valid JSON.") from e
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path} is a {config.get('peft_type')} adapter; foldin reads LoRA adapters.")
        if config.get("use_dora") or config.get("lora_bias"):
            raise CheckpointError(
                f"{path}: DoRA and LoRA's own bias terms (lora_bias) are not supported; merge the adapter with "
                f"PEFT first."
            )
        if (
            not isinstance(config.get("r"), int)
            or not isinstance(config.get("lora_alpha"), (int, float))
            or config["r"] <= 0
        ):
            raise CheckpointError(f"{path / 'adapter_config.json'} lacks a valid r and lora_alpha.")
        return config

    @staticmethod
    def _base_name(name: str, base_names: set[str], path: Path) -> str:
        """The base tensor an adapter module updates; checkpoints may add or drop a prefix such as 'bert.'."""
        if name in base_names:
            return name
        matches = prefixed_matches(name, base_names)
        if len(matches) != 1:
            raise CheckpointError(f"{path}: the adapter updates {name!r}, which the base model does not have.")
        return matches[0]

    def names(self) -> list[str]:
        return self._base.names()

    def spec(self, name: str) -> Spec:
        return self._base.spec(name)

    def read(self, name: str) -> torch.Tensor:
        if name in self._whole:  # stored whole: the module's new value replaces the base's
            value, (dtype, shape) = self._adapter.read(self._whole[name]), self._base.spec(name)
            if tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{self.path}: {self._whole[name]!r} has shape {list(value.shape)}, the base's {name!r} "
                    f"{list(shape)}."
                )
            return value.to(dtype)
        weight = self._base.read(name)
        if name not in self._updates:
            return weight
        a_key, b_key, scaling = self._updates[name]
        a, b = self._adapter.read(a_key).float(), self._adapter.read(b_key).float()
        delta = (b @ a) * scaling
        if self._fan_in_fan_out:
            delta = delta.T
        if delta.shape != weight.shape:
            raise CheckpointError(
                f"{self.path}: the update of {name!r} has shape {list(delta.shape)}, the base weight "
                f"{list(weight.shape)}."
            )
        return (weight.float() + delta).to(weight.dtype)

    def close(self) -> None:
        self._adapter.close()


def open_model_or_adapter(path: str | Path, base: Checkpoint) -> Checkpoint:
    """A checkpoint to fold in: a model in any format, or a LoRA adapter of `base`."""
    path = Path(path)
    return LoraCheckpoint(path, base) if is_lora_adapter(path) else open_checkpoint(path)
