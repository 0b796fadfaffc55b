"""The OPCM paper's Table 1, side by side with one of foldin's benchmarks at 8, 14 and 20 tasks.

Reads SETTING_DIR/results.json for each setting present (written by `foldin bench --tasks N`),
writes OUT/report.md (our numbers next to the paper's ViT-B/32 numbers, the OPCM gaps, what
reproduces) and OUT/acc_vs_tasks.png (final ACC per setting for every method, the paper's dashed).

    python benchmarks/paper_table.py benchmarks/results/text-zeroshot
    python benchmarks/paper_table.py benchmarks/results/vit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SETTINGS = (8, 14, 20)
HEADS = {"zeroshot": "zero-shot", "prototype": "class-prototype", "probe": "linear-probe"}
# Tang et al., 2025 (arXiv 2501.09522), Table 1, CLIP ViT-B/32, 10 orders; MagMax: the ACC quoted
# for ViT-B/32 in the DOP paper's comparison. Keys are foldin's method labels.
PAPER_ACC = {
    "pretrained": (48.1, 56.9, 55.6),
    "fine-tuned": (90.4, 89.3, 89.8),
    "continual fine-tuning": (79.8, 67.4, 62.6),
    "average": (66.3, 65.4, 61.1),
    "task_arithmetic": (67.5, 66.5, 60.6),
    "ties": (49.0, 66.2, 59.9),
    "opcm": (75.5, 71.9, 65.7),
    "magmax": (70.7, 67.0, 61.2),
    "nufilt": (83.6, None, 71.0),  # the NUFILT paper (ICLR 2026), CLIP ViT-B/32; no 14-task figure
}
PAPER_BWT = {
    "average": (-11.5, -8.0, -7.1),
    "task_arithmetic": (-9.6, -1.3, -3.4),
    "ties": (-15.3, 1.9, -1.5),
    "opcm": (-6.3, -6.0, -7.8),
}


def _rows(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """label -> {ACC, ACC_std, BWT, BWT_std, orders} (%), references included."""
    refs = results["references"]
    rows = {
        "pretrained": {"ACC": 100 * refs["pretrained"]["ACC_mean"]},
        "fine-tuned": {"ACC": 100 * refs["finetuned"]["ACC_mean"]},
    }
    runs = {
        **({"continual fine-tuning": refs["continual_finetuning"]} if "continual_finetuning" in refs else {}),
        **results["methods"],
    }
    for label, r in runs.items():
        rows[label] = {
            "ACC": 100 * r["ACC_mean"],
            "ACC_std": 100 * r["ACC_std"],
            "BWT": 100 * r["BWT_mean"],
            "BWT_std": 100 * r["BWT_std"],
            "orders": len(r["runs"]),
        }
    return rows


def _cell(row: dict[str, float] | None, key: str) -> str:
    if row is None or key not in row:
        return "-"
    std = row.get(f"{key}_std")
    return f"{row[key]:.1f}" + (f" ± {std:.1f}" if std is not None and row.get("orders", 0) > 1 else "")


def _paper(table: dict[str, tuple[float | None, ...]], label: str, i: int) -> str:
    value = table.get(label, (None,) * len(SETTINGS))[i]
    return "-" if value is None else f"{value:.1f}"


def gaps(rows: dict[int, dict[str, dict[str, float]]], other: str) -> list[str]:
    """OPCM's ACC minus another method's, ours and the paper's, at each setting."""
    cells = []
    for i, n in enumerate(SETTINGS):
        ours = (
            f"{rows[n]['opcm']['ACC'] - rows[n][other]['ACC']:+.1f}"
            if n in rows and {"opcm", other} <= rows[n].keys()
            else "-"
        )
        paper = f"{PAPER_ACC['opcm'][i] - PAPER_ACC[other][i]:+.1f}"
        cells.append(f"{ours} (paper {paper})")
    return cells


def write(root: Path) -> str:
    results = {
        n: json.loads((root / str(n) / "results.json").read_text())
        for n in SETTINGS
        if (root / str(n) / "results.json").exists()
    }
    rows = {n: _rows(r) for n, r in results.items()}
    labels = list(dict.fromkeys(label for r in rows.values() for label in r))
    first = next(iter(results.values()))
    heads = HEADS[first["settings"]["zoo"].get("heads", "probe")]
    sizes = ", ".join(str(n) for n in results)
    lines = [
        f"# The {first['suite']} benchmark in the OPCM paper's regime: {sizes} tasks, {heads} heads",
        "",
        f"Ours: {first['backbone']} with frozen {heads} heads on the {first['suite']} suite's first {sizes} tasks",
        "(`docs/benchmarks.md`); the paper: CLIP ViT-B/32 on its 8, 14 and 20 image tasks (Table 1 of Tang et al.,",
        "2025; MagMax as the DOP paper quotes it; NUFILT from its own paper). Per setting: `SETTING/report.md`",
        "(commands, per-task tables, what the data-driven methods learned) and `SETTING/acc_vs_tasks.png`,",
        "`SETTING/acc_matrix_*.png`.",
        "",
        "## ACC (%), mean ± std over task orders",
        "",
        "| method | " + " | ".join(f"{n} tasks | paper" for n in SETTINGS) + " | orders |",
        "|---|" + "---:|---:|" * len(SETTINGS) + "---|",
    ]
    for label in labels:
        cells = [
            f"{_cell(rows.get(n, {}).get(label), 'ACC')} | {_paper(PAPER_ACC, label, i)}"
            for i, n in enumerate(SETTINGS)
        ]
        orders = "/".join(
            str(int(rows[n][label]["orders"])) if label in rows.get(n, {}) and "orders" in rows[n][label] else "-"
            for n in SETTINGS
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {orders} |")
    lines += [
        "",
        "## BWT (%), mean ± std over task orders",
        "",
        "| method | " + " | ".join(f"{n} tasks | paper" for n in SETTINGS) + " |",
        "|---|" + "---:|---:|" * len(SETTINGS),
    ]
    for label in labels:
        if label in ("pretrained", "fine-tuned"):
            continue
        cells = [
            f"{_cell(rows.get(n, {}).get(label), 'BWT')} | {_paper(PAPER_BWT, label, i)}"
            for i, n in enumerate(SETTINGS)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## OPCM's lead (ACC points)",
        "",
        "| over | " + " | ".join(f"{n} tasks" for n in SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
    ]
    for other in ("task_arithmetic", "average", "ties", "magmax"):
        if any(other in r for r in rows.values()):
            lines.append(f"| {other} | " + " | ".join(gaps(rows, other)) + " |")
    (root / "report.md").write_text("\n".join(lines) + "\n" + _findings(root))
    plot(rows, root, first["backbone"])
    return "\n".join(lines)


def _findings(root: Path) -> str:
    """The prose verdict lives beside the numbers, in findings.md, written after reading them."""
    path = root / "findings.md"
    return "\n" + path.read_text() if path.exists() else ""


def plot(rows: dict[int, dict[str, dict[str, float]]], root: Path, backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    settings = [n for n in SETTINGS if n in rows]
    for label in dict.fromkeys(label for r in rows.values() for label in r):
        xs = [n for n in settings if label in rows[n]]
        (line,) = ax.plot(xs, [rows[n][label]["ACC"] for n in xs], marker="o", label=label)
        if label in PAPER_ACC:
            paper = [(n, v) for n, v in zip(SETTINGS, PAPER_ACC[label]) if v is not None]
            ax.plot(*zip(*paper), linestyle="--", marker="x", color=line.get_color(), alpha=0.5)
    ax.set_xticks(SETTINGS)
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("ACC (%)")
    short = backbone.split(",")[0].split(" (")[0]
    ax.set_title(f"ACC after the last task: ours (solid, {short}) and the papers' (dashed, ViT-B/32)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(root / "acc_vs_tasks.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
