"""The README model card of an exported folder, in the Hub's conventions: front matter naming the
base model and the relation (a merge), then how the model was made, from what, in which order,
and the `foldin run` file that makes it again from the recorded checkpoints (as mergekit's cards
carry their config)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import yaml


def _source(entry: dict[str, Any]) -> str:
    """How to name a model again: its Hub id at the commit it resolved to, or its path."""
    if entry.get("hub_id"):
        return f"{entry['hub_id']}@{entry['revision']}"
    return entry.get("source") or entry.get("checkpoint") or entry["path"]


def model_card(meta: dict[str, Any], library: str = "transformers") -> str:
    """A README for the exported folder (`library`: transformers for a full model, peft for an adapter)."""
    params = ", ".join(f"{k}={v}" for k, v in meta["params"].items()) or "none"
    base = meta["base"]
    front = {
        **({"base_model": base["hub_id"]} if base.get("hub_id") else {}),
        "base_model_relation": "merge" if library == "transformers" else "adapter",
        "library_name": library,
        "tags": ["foldin", "model-merging", "continual-merging", meta["method"]],
    }
    run = {
        "base": _source(base),
        "method": meta["method"],
        "params": meta["params"],
        "checkpoints": [_source(e) for e in meta["history"]],
        "output": "merged/",
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "# Merged model",
        "",
        f"Made with foldin {version('foldin')} by folding {meta['step']} fine-tuned checkpoint(s) into the base "
        f"model with the `{meta['method']}` method ({params}).",
        "",
        f"- Base: `{_source(base)}` ({base['hash']})",
        f"- Linear-layer weights: {len(meta['linear_weights'])}, from {meta['linear_weights_source']}",
        "",
        "| step | checkpoint | content hash |",
        "|---:|---|---|",
        *(f"| {e['step']} | `{_source(e)}` | {e['hash']} |" for e in meta["history"]),
        "",
        "To make it again, `foldin run merge.yaml` with (the content hashes above identify each model):",
        "",
        "```yaml",
        yaml.safe_dump(run, sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"
