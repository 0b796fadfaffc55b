"""A bench's results as data: the summary of a method's runs over task orders, and the join of two
runs' results (`--extend`, or the parts of a bench split over processes with `first_order`), which
refuses results that do not describe the same benchmark."""

from __future__ import annotations

from typing import Any

from foldin.errors import FoldinError
from foldin.evaluation.metrics import mean_std, normalized_accuracy


def summarize_runs(runs: list[dict[str, Any]], finetuned: dict[str, float]) -> dict[str, Any]:
    accs, bwts = [r["ACC"] for r in runs], [r["BWT"] for r in runs]
    norm = [normalized_accuracy([r["final_acc"][n] for n in finetuned], list(finetuned.values())) for r in runs]
    (acc_m, acc_s), (bwt_m, bwt_s), (norm_m, _) = mean_std(accs), mean_std(bwts), mean_std(norm)
    steps = [s for r in runs for s in r["seconds_per_step"]]
    peaks = [p for r in runs for p in r.get("peak_rss_mb_per_step", [])]
    return {
        "ACC_mean": acc_m,
        "ACC_std": acc_s,
        "BWT_mean": bwt_m,
        "BWT_std": bwt_s,
        "normalized_acc_mean": norm_m,
        "seconds_per_step": sum(steps) / len(steps),
        **({"peak_rss_mb": max(peaks)} if peaks else {}),
        **({"final_model": runs[0]["final_model"]} if runs and "final_model" in runs[0] else {}),
        "runs": runs,
    }


def extend_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new`'s methods added to an earlier run's results; refuses runs that are not comparable.
    A method in both is replaced by `new`'s runs (a rerun), or, where the two ran disjoint task
    orders with the same parameters (two parts of one bench, see `first_order`), gets both."""
    same = lambda key: old["settings"].get(key) == new["settings"].get(key)  # noqa: E731
    if (
        old["suite"] != new["suite"]
        or list(old["tasks"]) != list(new["tasks"])
        or not (same("seed") and same("max_test") and same("zoo"))
    ):
        raise FoldinError(
            "--extend: the results already in the output directory come from another suite, task list, seed, "
            "test set or zoo."
        )
    if any(abs(old["tasks"][n]["finetuned_acc"] - t["finetuned_acc"]) > 1e-9 for n, t in new["tasks"].items()):
        raise FoldinError(
            "--extend: the fine-tuned accuracies differ from the earlier run's: not the same checkpoints."
        )
    methods = {**old["methods"], **joined_methods(old["methods"], new["methods"], new["tasks"])}
    # the joined parts hold orders 1..N between them: the settings say N, not the first part's count
    settings = {k: v for k, v in old["settings"].items() if k != "first_order"}
    settings["orders"] = max(old["settings"]["orders"], new["settings"]["orders"])
    if "continual_finetuning" in new["references"]:  # the reference comes from the new run, as its count does
        settings["cft_orders"] = min(new["settings"]["cft_orders"], new["settings"]["orders"])
    merged = {**old, "settings": settings, "methods": methods}
    merged["references"] = {
        **old["references"],
        **{k: v for k, v in new["references"].items() if k == "continual_finetuning"},
    }
    merged["commands"] = [*old.get("commands", [old.get("command", "")]), new["command"]]
    return merged


def joined_methods(old: dict[str, Any], new: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    finetuned = {n: t["finetuned_acc"] for n, t in tasks.items()}
    joined = {}
    for label, entry in new.items():
        before = old.get(label)
        orders = lambda e: [r["order"] for r in e["runs"]]  # noqa: E731
        if (
            before
            and before["params"] == entry["params"]
            and not set(map(tuple, orders(before))) & set(map(tuple, orders(entry)))
        ):
            entry = {**before, **summarize_runs(before["runs"] + entry["runs"], finetuned)}
        joined[label] = entry
    return joined
