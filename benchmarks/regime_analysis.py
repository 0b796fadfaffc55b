"""Why does OPCM lead continual task arithmetic by 5-8 points on CLIP and by about 1 on our text
suite? Measurements of the zoo's own task vectors, in one regime (one zoo) per run.

    python benchmarks/regime_analysis.py --zoo zoo/text-zeroshot --label text --out benchmarks/results/regime
    python benchmarks/regime_analysis.py --zoo zoo/vit --label vit --max-test 500 --out benchmarks/results/regime
    python benchmarks/regime_analysis.py --zoo zoo/vit --label vit-no-permuted --max-test 500
        --tasks mnist,digits,fashion_mnist,animal_mnist,rotated_mnist,rotated_animal_mnist   (one line)

For the first 8 and 14 tasks of the zoo, or for exactly the tasks --tasks names (task vectors
tau_i = checkpoint - base), it measures:
- global pairwise cosine of whole-model task vectors, and of their linear-layer part;
- per-layer cosine: the cosine of two tasks' deltas of one weight matrix, |.| averaged over layers;
- per-layer subspace overlap: ||U_i,k^T U_j,k||_F^2 / k for the top-k left singular vectors of
  two tasks' deltas of one matrix (and likewise for the right ones), k chosen by OPCM's own rule
  (the first index where the cumulative share of singular values exceeds alpha = 0.5), and the
  same overlap for random k-dimensional subspaces (k / d) as the chance level;
- the share of each new task vector's linear-layer energy that OPCM removes at each step of a
  seeded order (the part lying in the running merge's dominant singular block, plus its diagonal
  coefficients), taken from OPCM's own running merge;
- the size of the task vectors: ||tau|| / ||theta_0|| (linear layers), and OPCM's split rank k
  as a share of min(m, n);
and, with --score, the accuracy decomposition of OPCM's lead over task arithmetic on the same
orders: task arithmetic (scaling 0.3), "rescaled task arithmetic" (the plain sum of task vectors
rescaled to the mean task-vector norm, OPCM's own rescale without its projection) and OPCM. The
lead splits into rescale (rescaled TA - TA) and projection (OPCM - rescaled TA).
Writes OUT/LABEL.json and OUT/LABEL.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path

import torch

from foldin.api import ContinualMerger
from foldin.evaluation.bench import task_orders
from foldin.evaluation.scoring import Scorer, reference_accuracies
from foldin.evaluation.zoo import Zoo
from foldin.layers import resolve_linear_weights
from foldin.methods.opcm import project_task_vector, split_rank
from foldin.progress import progress

ALPHA = 0.5  # OPCM's default


def task_vectors(zoo: Zoo, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    base = zoo.base_state()
    floats = [k for k, v in base.items() if v.is_floating_point()]
    tvs = {}
    for n in names:
        sd = zoo.task_state(n)
        tvs[n] = {k: (sd[k].double() - base[k].double()) for k in floats}
    return base, tvs


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-300))


def _top(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = max(split_rank(s, ALPHA), 1)
    return u[:, :k], vh[:k].T, k


def pairwise(tvs: dict[str, dict[str, torch.Tensor]], names: list[str], linear: list[str]) -> dict[str, float]:
    """Cosines (global, linear part, per layer) and per-layer top-k subspace overlaps over all pairs."""
    tops = {n: {k: _top(tvs[n][k]) for k in linear} for n in names}
    flat = {n: torch.cat([v.flatten() for v in tvs[n].values()]) for n in names}
    flat_linear = {n: torch.cat([tvs[n][k].flatten() for k in linear]) for n in names}
    glob, glob_lin, layer_abs, layer_max, left, right, chance = [], [], [], [], [], [], []
    for a, b in itertools.combinations(names, 2):
        glob.append(_cos(flat[a], flat[b]))
        glob_lin.append(_cos(flat_linear[a], flat_linear[b]))
        per_layer = [abs(_cos(tvs[a][k], tvs[b][k])) for k in linear]
        layer_abs.append(statistics.fmean(per_layer))
        layer_max.append(max(per_layer))
        for k in linear:
            (ua, va, ka), (ub, vb, kb) = tops[a][k], tops[b][k]
            kk = min(ka, kb)
            left.append(float((ua.T @ ub).square().sum()) / kk)
            right.append(float((va.T @ vb).square().sum()) / kk)
            m, n = tvs[a][k].shape
            chance.append((max(ka, kb) / m + max(ka, kb) / n) / 2)
    return {
        "global_cosine_mean": statistics.fmean(glob),
        "global_cosine_max": max(glob),
        "linear_cosine_mean": statistics.fmean(glob_lin),
        "per_layer_abs_cosine_mean": statistics.fmean(layer_abs),
        "per_layer_abs_cosine_max": max(layer_max),
        "subspace_overlap_left_mean": statistics.fmean(left),
        "subspace_overlap_right_mean": statistics.fmean(right),
        "subspace_overlap_chance_mean": statistics.fmean(chance),
        "opcm_rank_share_mean": statistics.fmean(tops[n][k][2] / min(tvs[n][k].shape) for n in names for k in linear),
    }


def magnitudes(base: dict[str, torch.Tensor], tvs: dict[str, dict[str, torch.Tensor]], linear: list[str]) -> dict:
    w0 = math.sqrt(sum(float(base[k].double().square().sum()) for k in linear))
    rel = [math.sqrt(sum(float(tv[k].square().sum()) for k in linear)) / w0 for tv in tvs.values()]
    return {"relative_norm_mean": statistics.fmean(rel), "relative_norm_min": min(rel), "relative_norm_max": max(rel)}


def removed_shares(
    tvs: dict[str, dict[str, torch.Tensor]], order: list[str], linear: list[str]
) -> list[dict[str, float]]:
    """Per step t >= 2 of OPCM along `order`: the share of the new task vector's linear-layer energy
    that OPCM's projection removes, and the share of it in the merge's dominant r x r block
    (the projection is scale-invariant in the merge, so OPCM's unscaled running sum is used)."""
    merged = {k: tvs[order[0]][k].clone() for k in linear}
    steps = []
    for name in order[1:]:
        removed = block = total = 0.0
        for k in linear:
            tau = tvs[name][k]
            projected = project_task_vector(merged[k], tau, ALPHA)
            u, s, vh = torch.linalg.svd(merged[k], full_matrices=False)
            r = split_rank(s, ALPHA)
            removed += float((tau - projected).square().sum())
            block += float((u[:, :r].T @ tau @ vh[:r].T).square().sum())
            total += float(tau.square().sum())
            merged[k] = merged[k] + projected
        steps.append({"removed_share": removed / total, "block_share": block / total})
    return steps


def decomposition(
    zoo: Zoo, names: list[str], orders: list[list[str]], max_test: int | None, scaling: float = 0.3
) -> dict[str, float]:
    """Final ACC (mean over orders) of task arithmetic, rescaled task arithmetic and OPCM, beside the
    pretrained and the fine-tuned models' on the same test sets: how much of the fine-tuned accuracy
    the plain sum keeps is the interference OPCM's projection has to undo."""
    scorer = Scorer(zoo, names, max_test)
    base = zoo.base_state()
    ckpts = {n: zoo.task_state(n) for n in names}
    pretrained, finetuned = reference_accuracies(scorer, base, ckpts.__getitem__)
    floats = [k for k, v in base.items() if v.is_floating_point()]
    accs: dict[str, list[float]] = {"task_arithmetic": [], "rescaled_task_arithmetic": [], "opcm": []}
    bar = progress(total=len(orders) * 3, desc=f"scoring {len(names)} tasks", unit="model")
    for order in orders:
        total = {k: sum(ckpts[n][k].double() - base[k].double() for n in order) for k in floats}
        mean_norm = statistics.fmean(
            math.sqrt(sum(float((ckpts[n][k].double() - base[k].double()).square().sum()) for k in floats))
            for n in order
        )
        rescale = mean_norm / math.sqrt(sum(float(v.square().sum()) for v in total.values()))
        merger = ContinualMerger(base, "opcm", linear_weights=scorer.model, alpha=ALPHA)
        for n in order:
            merger.partial_fit(ckpts[n])
        models = {
            "task_arithmetic": {k: (base[k].double() + scaling * total[k]).float() for k in floats},
            "rescaled_task_arithmetic": {k: (base[k].double() + rescale * total[k]).float() for k in floats},
            "opcm": merger.merged_state_dict(),
        }
        for label, sd in models.items():
            scorer.load(sd)
            accs[label].append(statistics.fmean(scorer.score(n) for n in names))
            bar.update(1)
    bar.close()
    return {
        "pretrained": 100 * statistics.fmean(pretrained.values()),
        "finetuned": 100 * statistics.fmean(finetuned.values()),
        **{label: 100 * statistics.fmean(v) for label, v in accs.items()},
    }


def analyse(
    zoo: Zoo, sizes: list[int], n_orders: int, score: bool, max_test: int | None, tasks: list[str] | None = None
) -> dict:
    """Each setting is the first N of `tasks` (default: the zoo's tasks in their order)."""
    names_all = tasks or zoo.task_names
    if unknown := sorted(set(names_all) - set(zoo.task_names)):
        raise SystemExit(f"the zoo has no task {', '.join(unknown)}.")
    base, tvs = task_vectors(zoo, names_all[: max(sizes)])
    specs = {k: tuple(v.shape) for k, v in base.items()}
    linear, _ = resolve_linear_weights(specs, module=zoo.suite.load_backbone())
    out = {"zoo_settings": zoo.settings, "suite": zoo.meta["suite"], "linear_layers": len(linear), "settings": {}}
    if tasks:
        out["tasks"] = tasks
    for size in sizes:
        if size > len(names_all):
            raise SystemExit(f"the zoo has {len(names_all)} tasks, fewer than {size}.")
        names = names_all[:size]
        orders = task_orders(names, n_orders, seed=0)  # the bench's own first orders
        shares = [removed_shares(tvs, order, linear) for order in orders]
        result = {
            **pairwise(tvs, names, linear),
            **magnitudes(base, {n: tvs[n] for n in names}, linear),
            "removed_share_per_step": [
                statistics.fmean(s[t]["removed_share"] for s in shares) for t in range(size - 1)
            ],
            "block_share_per_step": [statistics.fmean(s[t]["block_share"] for s in shares) for t in range(size - 1)],
            "orders": n_orders,
        }
        result["removed_share_mean"] = statistics.fmean(result["removed_share_per_step"])
        if score:
            result["final_acc"] = decomposition(zoo, names, orders, max_test)
        out["settings"][str(size)] = result
    return out


def write_markdown(label: str, result: dict, path: Path) -> None:
    rows = [
        ("global cosine, mean over pairs", "global_cosine_mean", "{:.4f}"),
        ("global cosine, largest pair", "global_cosine_max", "{:.4f}"),
        ("linear-layer cosine, mean", "linear_cosine_mean", "{:.4f}"),
        ("per-layer abs(cosine), mean", "per_layer_abs_cosine_mean", "{:.4f}"),
        ("per-layer abs(cosine), largest", "per_layer_abs_cosine_max", "{:.4f}"),
        ("top-k subspace overlap, left", "subspace_overlap_left_mean", "{:.3f}"),
        ("top-k subspace overlap, right", "subspace_overlap_right_mean", "{:.3f}"),
        ("overlap of random subspaces (chance)", "subspace_overlap_chance_mean", "{:.3f}"),
        ("OPCM split rank k / min(m, n)", "opcm_rank_share_mean", "{:.3f}"),
        ("new task vector's energy OPCM removes", "removed_share_mean", "{:.3f}"),
        ("norm(tau) / norm(theta_0), linear layers", "relative_norm_mean", "{:.4f}"),
    ]
    sizes = list(result["settings"])
    lines = [f"# Task-vector geometry: {label} ({result['suite']} zoo)", ""]
    if "tasks" in result:
        lines += [f"Tasks: {', '.join(result['tasks'])}.", ""]
    lines += ["| measure | " + " | ".join(f"{s} tasks" for s in sizes) + " |", "|---" + "|---:" * len(sizes) + "|"]
    for text, key, fmt in rows:
        lines.append(f"| {text} | " + " | ".join(fmt.format(result["settings"][s][key]) for s in sizes) + " |")
    if all("final_acc" in result["settings"][s] for s in sizes):
        methods = ("pretrained", "finetuned", "task_arithmetic", "rescaled_task_arithmetic", "opcm")
        for method in (m for m in methods if all(m in result["settings"][s]["final_acc"] for s in sizes)):
            cells = " | ".join(f"{result['settings'][s]['final_acc'][method]:.1f}" for s in sizes)
            lines.append(f"| ACC, {method.replace('_', ' ')} | {cells} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--sizes", default="8,14", help="the settings: the first N tasks of the zoo, comma-separated")
    ap.add_argument(
        "--tasks", help="comma-separated task names: one setting of exactly these tasks (a subset), instead of --sizes"
    )
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--max-test", type=int)
    ap.add_argument("--no-score", action="store_true", help="geometry only, no accuracy decomposition")
    ap.add_argument("--out", default="benchmarks/results/regime")
    args = ap.parse_args()
    tasks = args.tasks.split(",") if args.tasks else None
    sizes = [len(tasks)] if tasks else [int(x) for x in args.sizes.split(",")]
    result = analyse(Zoo.open(args.zoo), sizes, args.orders, not args.no_score, args.max_test, tasks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.label, result, out / f"{args.label}.md")
    print((out / f"{args.label}.md").read_text())


if __name__ == "__main__":
    main()
