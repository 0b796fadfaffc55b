"""report.md (Table 1 and Table 3 of the OPCM paper, in form) and PNG plots from results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from foldin.evaluation.metrics import accuracy_after_each_step
from foldin.methods import get_method


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_report(results: dict[str, Any], out: Path) -> None:
    tasks = list(results["tasks"])
    refs = results["references"]
    rows = {
        **({"continual fine-tuning": refs["continual_finetuning"]} if "continual_finetuning" in refs else {}),
        **results["methods"],
    }
    lines = [
        f"# Continual merging benchmark: {results['suite']} suite, {len(tasks)} tasks, "
        f"{results['settings']['orders']} task orders",
        "",
        f"Backbone: `{results['backbone']}`. Machine: {results['machine']}.",
        *(f"Command: `{c}`" for c in results.get("commands", [results["command"]]) if c),
        *(
            [
                f"In the fully evaluated orders (heat maps, ACC-versus-tasks curves), the cells ACC and BWT do not "
                f"read were scored on the first {results['settings']['matrix_test']} test examples of each task."
            ]
            if results["settings"].get("matrix_test")
            else []
        ),
        "",
        "## Table 1 form: average accuracy (ACC) and backward transfer (BWT), mean ± std over orders (%)",
        "",
        "| method | ACC | BWT | normalized ACC | orders | seconds / step | peak RSS / step (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| pretrained (reference) | {_pct(refs['pretrained']['ACC_mean'])} | - | - | - | - | - |",
        f"| individually fine-tuned (reference) | {_pct(refs['finetuned']['ACC_mean'])} | - | 100.0 | - | - | - |",
    ]
    for label, r in rows.items():
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        lines.append(
            f"| {label} | {_pct(r['ACC_mean'])} ± {_pct(r['ACC_std'])} | {_pct(r['BWT_mean'])} ± {_pct(r['BWT_std'])} "
            f"| {_pct(r['normalized_acc_mean'])} | {len(r['runs'])} | {r['seconds_per_step']:.2f} | {peak} |"
        )
    if any("peak_rss_mb" in r for r in rows.values()):
        lines += [
            "",
            "Peak RSS / step: the largest resident high-water mark of the bench process during one merge step "
            "(reset before each step; the process also holds the checkpoints and test sets it scores with).",
        ]
    lines += [
        "",
        "## Table 3 form: final accuracy per task, mean over orders (%)",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    per_task = {"pretrained": refs["pretrained"]["final_acc"], "fine-tuned": refs["finetuned"]["final_acc"]}
    for label, r in rows.items():
        per_task[label] = {n: sum(run["final_acc"][n] for run in r["runs"]) / len(r["runs"]) for n in tasks}
    for label, accs in per_task.items():
        lines.append(f"| {label} | " + " | ".join(_pct(accs[n]) for n in tasks) + " |")
    lines += ["", "## Data each method reads", "", "| method | besides the checkpoints |", "|---|---|"]
    lines += [
        f"| {label} | {r.get('data_use', 'none (checkpoint weights only)')}{_scored_from(r)} |"
        for label, r in results["methods"].items()
    ]
    lines += ["", "Data-driven methods read training splits only; every accuracy is on the test splits."]
    lines += _learned_scalars(results["methods"])
    lines += _final_model_checks(results)
    lines += [
        "",
        "## Tasks",
        "",
        "| task | source | classes | train | test | pretrained head | fine-tuned | lift |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, t in results["tasks"].items():
        lines.append(
            f"| {n} | {t['source']} | {len(t['labels'])} | {t['n_train']} | {t['n_test']} | "
            f"{_pct(t['pretrained_acc'])} "
            f"| {_pct(t['finetuned_acc'])} | {100 * (t['finetuned_acc'] - t['pretrained_acc']):+.1f} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_all(results, out)


def _scored_from(r: dict[str, Any]) -> str:
    return f" (scored from {r['scored_from']})" if "scored_from" in r else ""


def _final_model_checks(results: dict[str, Any]) -> list[str]:
    """The first order's final merge as rank-R adapters, and the talk checks (perplexity on held-out
    prose, greedy chat answers) of the base, each merged model and its adapters."""
    checked = {label: r["final_model"] for label, r in results["methods"].items() if "final_model" in r}
    base_talk = results["references"]["pretrained"].get("talk")
    if not checked and base_talk is None:
        return []
    lines: list[str] = []
    ranks = sorted({a["rank"] for f in checked.values() for a in f.get("adapters", [])})
    if ranks:
        lines += [
            "",
            "## The merge as a rank-R LoRA adapter (first order's final model, loaded by PEFT on the base)",
            "",
            "| method | full model ACC | " + " | ".join(f"rank {r}: ACC (energy kept)" for r in ranks) + " |",
            "|---|---:|" + "---:|" * len(ranks),
        ]
        for label, f in checked.items():
            full = results["methods"][label]["runs"][0]["ACC"]
            by_rank = {a["rank"]: a for a in f.get("adapters", [])}
            cells = [
                f"{_pct(by_rank[r]['ACC'])} ({_pct(by_rank[r]['energy_kept_mean'])}%)" if r in by_rank else "-"
                for r in ranks
            ]
            lines.append(f"| {label} | {_pct(full)} | " + " | ".join(cells) + " |")
    talks = {"pretrained (base)": base_talk} if base_talk else {}
    for label, f in checked.items():
        if "talk" in f:
            talks[label] = f["talk"]
        talks.update({f"{label}, rank-{a['rank']} adapter": a["talk"] for a in f.get("adapters", []) if "talk" in a})
    if talks:
        lines += [
            "",
            "## Does it still talk? (first order's final model)",
            "",
            "Perplexity on held-out English prose, and greedy answers to general chat prompts.",
            "",
            "| model | perplexity | " + " | ".join(c["prompt"] for c in next(iter(talks.values()))["chat"]) + " |",
            "|---|---:|" + "---|" * len(next(iter(talks.values()))["chat"]),
        ]
        for label, t in talks.items():
            answers = " | ".join(c["answer"].replace("|", "/").replace("\n", " ") for c in t["chat"])
            lines.append(f"| {label} | {t['perplexity']:.2f} | {answers} |")
    return lines


def _learned_scalars(methods: dict[str, Any]) -> list[str]:
    """What the methods that learn from data learned at steps 2..T (e.g. AdaMerging's two
    coefficients), over the orders whose runs recorded it: mean, min and max."""
    lines = []
    for label, r in methods.items():
        if not get_method(r["method"]).needs_data or "scored_from" in r:
            continue
        steps = [s for run in r["runs"] for s in run.get("step_stats", [])[1:]]
        values: dict[str, list[float]] = {}
        for s in steps:
            for k, v in s.items():
                values.setdefault(k, []).append(v)
        lines += [
            f"| {label} | {k} | {sum(v) / len(v):.3f} | {min(v):.3f} | {max(v):.3f} | {len(v)} |"
            for k, v in values.items()
        ]
    if not lines:
        return []
    return [
        "",
        "## What the data-driven methods learned (steps 2 and later, all recorded orders)",
        "",
        "| method | scalar | mean | min | max | steps |",
        "|---|---|---:|---:|---:|---:|",
        *lines,
    ]


def plot_all(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {**results["methods"]}
    if "continual_finetuning" in results["references"]:
        rows["continual fine-tuning"] = results["references"]["continual_finetuning"]
    # accuracy matrix heat maps (first order, which is evaluated in full)
    for label, r in rows.items():
        run = r["runs"][0]
        acc = np.array([[np.nan if a is None else 100 * a for a in row] for row in run["acc_matrix"]])
        n = len(run["order"])
        fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.8 * n), max(4.5, 1.5 + 0.6 * n)))
        im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
        for (t, k), v in np.ndenumerate(acc):
            if not np.isnan(v):
                ax.text(k, t, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set_xticks(range(n), run["order"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), [f"{t + 1}" for t in range(n)], fontsize=8)
        ax.set_ylabel("checkpoints folded in")
        ax.set_title(f"{label}: accuracy matrix (%), order 1")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / f"acc_matrix_{_slug(label)}.png", dpi=110)
        plt.close(fig)
    # ACC versus number of tasks, band over the fully evaluated orders
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in rows.items():
        curves = [c for c in (accuracy_after_each_step(run["acc_matrix"]) for run in r["runs"]) if None not in c]
        if not curves:
            continue
        arr = 100 * np.array(curves, dtype=float)
        x = np.arange(1, arr.shape[1] + 1)
        ax.plot(x, arr.mean(0), marker="o", label=f"{label} ({len(curves)} orders)")
        ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.15)
    ax.set_xticks(range(1, len(results["tasks"]) + 1))
    ax.set_xlabel("number of tasks folded in")
    ax.set_ylabel("mean accuracy on tasks seen so far (%)")
    ax.set_title(f"{results['suite']} suite: ACC versus number of tasks")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:  # e.g. a part of a split bench that holds no fully evaluated order
        ax.text(0.5, 0.5, "no fully evaluated order", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(out / "acc_vs_tasks.png", dpi=110)
    plt.close(fig)
    plot_sweeps(results, out, plt)


def _sweep_points(results: dict[str, Any], method: str, param: str) -> list[tuple[float, float, float]]:
    """(value, ACC mean, ACC std) of the runs of `method` that differ only in `param` (the largest such
    group): variants that differ in anything else (another parameter, the head refit, the tensors
    `linear_weights` picks) are not a sweep."""
    groups: dict[str, dict[float, tuple[float, float, float]]] = {}
    for r in results["methods"].values():
        if r["method"] == method and r["params"].get("masks", True) and not r["params"].get("head_refit"):
            others = {k: v for k, v in r["params"].items() if k != param} | {"linear_weights": r.get("linear_weights")}
            rest = json.dumps(others, sort_keys=True)
            groups.setdefault(rest, {})[r["params"][param]] = (r["params"][param], r["ACC_mean"], r["ACC_std"])
    return sorted(max(groups.values(), key=len, default={}).values())


def plot_sweeps(results: dict[str, Any], out: Path, plt) -> None:
    """ACC versus OPCM's alpha and task arithmetic's scaling factor, when several values were run."""
    for method, param in (("opcm", "alpha"), ("task_arithmetic", "scaling_factor"), ("otmf", "alpha")):
        points = _sweep_points(results, method, param)
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs, ys, es = zip(*points)
        ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3)
        ax.set_xlabel(param)
        ax.set_ylabel("ACC (%)")
        ax.set_title(f"{method}: ACC versus {param}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"sweep_{method}_{param}.png", dpi=110)
        plt.close(fig)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")
