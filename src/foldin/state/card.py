"""The README model card of an exported folder: how it was made, from what, in which order."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any


def model_card(meta: dict[str, Any]) -> str:
    """A README for the exported folder: how it was made, from what, in which order."""
    params = ", ".join(f"{k}={v}" for k, v in meta["params"].items()) or "none"
    lines = [
        "---",
        "tags: [foldin, model-merging, continual-merging]",
        "---",
        "# Merged model",
        "",
        f"Made with foldin {version('foldin')} by folding {meta['step']} fine-tuned checkpoint(s) into the base model "
        f"with the `{meta['method']}` method ({params}).",
        "",
        f"- Base: `{meta['base']['path']}` ({meta['base']['hash']})",
        f"- Linear-layer weights: {len(meta['linear_weights'])}, from {meta['linear_weights_source']}",
        "",
        "| step | checkpoint | content hash |",
        "|---:|---|---|",
    ]
    lines += [f"| {e['step']} | `{e['checkpoint']}` | {e['hash']} |" for e in meta["history"]]
    return "\n".join(lines) + "\n"
