"""--device: the arithmetic on another device gives the CPU's result (up to float rounding), and
a device this machine lacks is refused in one sentence. The GPU half runs where one is lent."""

from __future__ import annotations

import pytest
import torch

from conftest import PARITY
from foldin import MergeState, available_methods
from foldin.cli import main

METHODS = [name for name, cls in available_methods().items() if not cls.needs_data]  # every weight-only method


def _merged(tmp_path, method: str, device: str | None) -> dict[str, torch.Tensor]:
    state = MergeState.create(tmp_path / f"{method}-{device}", PARITY / "clip-vision-tiny" / "base", method)
    for i in (1, 2, 3):
        state.add(PARITY / "clip-vision-tiny" / f"ckpt_{i}", progress=False, device=device)
    return state.merged_state_dict()


def test_device_cpu_is_the_default_bit_for_bit(tmp_path):
    for method in ("opcm", "ties"):
        a, b = _merged(tmp_path, method, None), _merged(tmp_path, method, "cpu")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_device_is_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    state = tmp_path / "s"
    assert main(["init", str(state), "--base", str(PARITY / "bert-tiny" / "base"), "--method", "opcm"]) == 0
    capsys.readouterr()
    assert main(["add", str(state), str(PARITY / "bert-tiny" / "ckpt_1"), "--device", "cuda", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is not available here" in err and err.count("\n") == 1
    assert MergeState.open(state).step == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_cpu(tmp_path, method):
    cpu, gpu = _merged(tmp_path, method, "cpu"), _merged(tmp_path, method, "cuda")
    for k in cpu:
        if cpu[k].is_floating_point():
            err = float((gpu[k].double() - cpu[k].double()).norm() / cpu[k].double().norm().clamp(min=1e-30))
            assert err < 1e-5, (k, err)


@pytest.mark.parametrize("method", METHODS)
def test_workers_give_the_same_bits(tmp_path, method):
    """Threads change when tensors are processed, never what comes out (results are consumed in order)."""
    outs = []
    for workers in (1, 3):
        state = MergeState.create(tmp_path / f"{method}-{workers}", PARITY / "clip-vision-tiny" / "base", method)
        for i in (1, 2, 3):
            state.add(PARITY / "clip-vision-tiny" / f"ckpt_{i}", progress=False, workers=workers)
        outs.append((state.dir / state.meta["generation"] / "merged.safetensors").read_bytes())
        assert state.meta["stats"] == MergeState.open(state.dir).meta["stats"]
    assert outs[0] == outs[1]


def test_workers_default_and_cap_follow_the_threads():
    """One worker per torch thread for a method that decomposes matrices, one for an elementwise
    method; on the CPU never more workers than threads (each worker has at least one)."""
    from foldin.methods.registry import get_method
    from foldin.runners.local import step_workers

    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    assert step_workers(None, get_method("opcm")(), cpu) == threads
    assert step_workers(None, get_method("task_arithmetic")(), cpu) == 1
    assert step_workers(threads + 3, get_method("opcm")(), cpu) == threads
    assert step_workers(1, get_method("opcm")(), cpu) == 1
