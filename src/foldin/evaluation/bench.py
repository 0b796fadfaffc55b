"""The benchmark in the shape of the OPCM paper's Table 1: every method over the same seeded task
orders, plus the references (pretrained, individually fine-tuned, continual fine-tuning).

Merging runs in memory through `foldin.ContinualMerger` (the same engine as the CLI); after each
step the merged backbone is scored with the tasks' frozen heads. Orders listed in
`full_matrix_orders` get the whole accuracy matrix (T(T+1)/2 evaluations); the others only its
diagonal and final row (2T - 1), which is all ACC and BWT need. Finished orders are saved in
OUT/bench-progress.json as they finish, so a bench that is stopped resumes where it stopped; the
continual fine-tuning reference, hours in one sequence, is saved after every task as well.
`first_order` runs only the later orders of the same seeded sequence, so that one bench can be split
over processes or machines and its parts joined with `bench_results.extend_results`.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from foldin.api import ContinualMerger
from foldin.errors import FoldinError
from foldin.evaluation.bench_progress import load_progress, saved_or_scored_references
from foldin.evaluation.bench_results import extend_results, summarize_runs
from foldin.evaluation.continual_finetuning import (
    clear_cft_partial,
    continual_finetuning_order,
    load_cft_partial,
)
from foldin.evaluation.peak_memory import peak_mb, reset_peak
from foldin.evaluation.scoring import (
    Scorer,
    base_talk,
    final_model_checks,
    run_order,
    run_record,
)
from foldin.evaluation.zoo import Zoo
from foldin.io.atomic import make_dirs, write_json_atomic
from foldin.methods import get_method
from foldin.progress import progress as progress_bar


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    linear_weights: str | None = None  # a regex over tensor names; None: the backbone's nn.Linear modules


def parse_method_specs(text: str) -> list[MethodSpec]:
    """'average,opcm,opcm:alpha=0.8,task_arithmetic:scaling_factor=0.5' -> specs (validated).
    The setting linear_weights=REGEX chooses the tensors OPCM projects (e.g. convolution kernels)."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *settings = item.split(":")
        params = {}
        for s in settings:
            key, sep, value = s.partition("=")
            if not sep:
                raise FoldinError(f"method spec {item!r}: expected name:key=value.")
            params[key] = yaml.safe_load(value)
        linear_weights = params.pop("linear_weights", None)
        get_method(name)(**params)  # validate now, not an hour into the run
        specs.append(MethodSpec(item, name, params, None if linear_weights is None else str(linear_weights)))
    return specs


def task_orders(names: list[str], n: int, seed: int) -> list[list[str]]:
    return [random.Random(seed + i).sample(names, len(names)) for i in range(n)]


def without_head_refit(spec: MethodSpec) -> MethodSpec | None:
    """For a spec that refits heads, the same spec without: head refit never changes the merged
    weights, so one run scores both (with the refit heads and with the zoo's), the ablation for free."""
    if spec.params.get("head_refit") is not True:
        return None
    name, *settings = spec.label.split(":")
    label = ":".join([name, *(s for s in settings if s.partition("=")[0] != "head_refit")])
    return MethodSpec(
        label, spec.method, {k: v for k, v in spec.params.items() if k != "head_refit"}, spec.linear_weights
    )


def run_bench(
    zoo: Zoo,
    specs: list[MethodSpec],
    n_orders: int,
    out: Path,
    seed: int = 0,
    full_matrix_orders: int = 3,
    cft_orders: int = 1,
    tasks: list[str] | None = None,
    max_test: int | None = None,
    progress: bool = True,
    command: str = "",
    extend: bool = False,
    matrix_test: int | None = None,
    first_order: int = 1,
    adapter_ranks: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Run the benchmark and write results.json, report.md and plots to `out`. With `extend`, the
    methods are added to the results already in `out` (same suite, tasks, seed and test sets).
    `matrix_test`: in fully evaluated orders, the cells ACC and BWT do not read are scored on the
    first `matrix_test` test examples of each task (a 20-task matrix has 210 cells, 39 of them read).
    `first_order`: run orders first_order..n_orders (1-based) of the seeded sequence, one part of a
    bench split over processes; the full-matrix and continual fine-tuning orders keep their numbers.
    `adapter_ranks`: the first order's final merge of each method is also exported as an adapter of
    each rank and scored as PEFT loads it (see `adapter_out`); with the suite's talk check (LLMs),
    that model's, the adapters' and the base's generation are checked too."""
    if not 1 <= first_order <= n_orders:
        raise FoldinError(f"--first-order {first_order}: expected a number from 1 to --orders ({n_orders}).")
    names = tasks or zoo.task_names
    orders = task_orders(names, n_orders, seed)
    skipped = first_order - 1
    scorer = Scorer(zoo, names, max_test, matrix_test)
    base = zoo.base_state()
    progress_file = out / "bench-progress.json"
    references_key = {
        "zoo": zoo.meta["settings"],
        "finetuned_in_zoo": {n: zoo.meta["tasks"][n]["finetuned_acc"] for n in names},
        "max_test": max_test,
    }
    references = saved_or_scored_references(progress_file, references_key, scorer, base, zoo.task_state)
    pretrained, finetuned = references["pretrained"], references["finetuned"]
    results: dict[str, Any] = {
        "suite": zoo.meta["suite"],
        "backbone": zoo.suite.backbone_label(),
        "command": command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "settings": {
            "orders": n_orders,
            "seed": seed,
            "full_matrix_orders": full_matrix_orders,
            "cft_orders": cft_orders,
            "max_test": max_test,
            **({"matrix_test": matrix_test} if matrix_test else {}),
            **({"adapter_ranks": list(adapter_ranks)} if adapter_ranks else {}),
            **({"first_order": first_order} if first_order > 1 else {}),
            "zoo": zoo.meta["settings"],
        },
        "tasks": {
            n: {
                "source": zoo.meta["tasks"][n]["source"],
                "labels": zoo.meta["tasks"][n]["labels"],
                "n_train": zoo.meta["tasks"][n]["n_train"],
                "n_test": len(scorer.test[n].labels),
                "pretrained_acc": pretrained[n],
                "finetuned_acc": finetuned[n],
            }
            for n in names
        },
        "methods": {},
        "references": {},
    }
    previous = out / "results.json"
    if extend and previous.exists():
        extend_results(json.loads(previous.read_text()), results)  # refuse an incomparable run before it starts
    train_data = {}
    if any(get_method(s.method).needs_data for s in specs):  # data-driven methods learn from the train splits only
        train_data = {n: scorer.suite.task_data(scorer.tasks[n], scorer.zoo_heads[n]) for n in names}
    done = load_progress(progress_file, results["settings"], orders)
    partial = load_cft_partial(out, results["settings"]) if cft_orders > skipped else None

    def method_bar(label: str, orders_to_run: int, steps_done: int = 0) -> Any:
        """One bar per method, counting only the steps this run does: methods differ in cost by 1000x
        (0.2 s a step against 3 min on the vit suite), so a time left measured across them would be
        wrong by as much, and one measured over a resumed run's finished steps too."""
        return progress_bar(
            total=len(names) * max(orders_to_run, 0) - steps_done,
            desc=f"bench {label}",
            unit="step",
            enabled=progress,
        )

    def record(**runs: list[dict[str, Any]]) -> None:
        """Save finished orders as they finish: a killed bench resumes where it stopped."""
        done.update(runs)
        make_dirs(out)  # durably: a crash must not lose the folder
        write_json_atomic(
            progress_file,
            {"settings": results["settings"], "orders": orders, "runs": done, "references": references},
        )

    for spec in specs:
        variants = {True: spec, **({False: ablation} if (ablation := without_head_refit(spec)) else {})}
        runs = {refit: list(done.get(v.label, [])) for refit, v in variants.items()}
        needs_data = get_method(spec.method).needs_data
        bar = method_bar(spec.label, n_orders - skipped - len(runs[True]))
        for i, order in enumerate(orders):
            if i < skipped + len(runs[True]):
                continue
            merger = ContinualMerger(
                base,
                spec.method,
                linear_weights=spec.linear_weights or scorer.model,
                module=scorer.model,
                features=scorer.suite.batch_features,
                **spec.params,
            )
            scorer.use_heads({})
            step_stats: list[dict[str, float]] = []
            peaks: list[float] = []

            def advance(name: str) -> float:
                reset_peak()
                t0 = time.perf_counter()
                merger.partial_fit(zoo.task_state(name), data=train_data[name] if needs_data else None)
                seconds = time.perf_counter() - t0
                peaks.append(round(peak_mb(), 1))
                step_stats.append(dict(merger.stats_))
                scorer.load(merger.merged_state_dict())
                scorer.use_heads(getattr(merger, "heads_", {}))
                bar.update(1)
                return seconds

            bar.set_postfix_str(f"order {i + 1} of {n_orders}")
            accs, seconds = run_order(order, advance, scorer, i < full_matrix_orders, tuple(variants))
            final = final_model_checks(scorer, zoo, base, merger, adapter_ranks) if i == 0 else None
            for refit in variants:
                runs[refit].append(run_record(order, accs[refit], seconds, step_stats, peaks, final))
            record(**{v.label: runs[refit] for refit, v in variants.items()})
        bar.close()
        for refit, v in variants.items():
            method = get_method(v.method)(**v.params)
            results["methods"][v.label] = {
                "method": v.method,
                "params": method.params.model_dump(),
                "data_use": method.data_use(),
                "linear_weights": v.linear_weights or "nn.Linear modules of the backbone",
                **(
                    {}
                    if refit
                    else {
                        "scored_from": f"the {spec.label} runs: the same merged weights, scored with the zoo's heads"
                    }
                ),
                **summarize_runs(runs[refit], finetuned),
            }
    results["references"]["pretrained"] = {"final_acc": pretrained}
    if skipped == 0 and (talk := base_talk(scorer, base)) is not None:
        results["references"]["pretrained"]["talk"] = talk
    results["references"]["finetuned"] = {"final_acc": finetuned}
    for ref in ("pretrained", "finetuned"):
        results["references"][ref]["ACC_mean"] = sum(results["references"][ref]["final_acc"].values()) / len(names)
    if cft_orders > skipped:
        cft_runs = list(done.get("continual_finetuning", []))
        bar = method_bar(
            "continual fine-tuning",
            min(cft_orders, n_orders) - skipped - len(cft_runs),
            len(partial["seconds"]) if partial else 0,
        )
        for i, order in enumerate(orders[:cft_orders]):
            if i < skipped + len(cft_runs):
                continue
            bar.set_postfix_str(f"order {i + 1} of {min(cft_orders, n_orders)}")
            resume = partial if partial and partial["order"] == order else None
            cft_runs.append(
                continual_finetuning_order(
                    scorer, base, order, i < full_matrix_orders, resume, out, results["settings"], bar.update
                )
            )
            record(continual_finetuning=cft_runs)
        bar.close()
        results["references"]["continual_finetuning"] = {
            "method": "continual fine-tuning",
            **summarize_runs(cft_runs, finetuned),
        }
    make_dirs(out)  # durably: a crash must not lose the folder
    if extend and previous.exists():
        results = extend_results(json.loads(previous.read_text()), results)
    write_json_atomic(out / "results.json", results)
    progress_file.unlink(missing_ok=True)
    clear_cft_partial(out)
    from foldin.evaluation.report import write_report

    write_report(results, out)
    return results
