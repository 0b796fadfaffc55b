"""The Ray backend on a real local cluster (a head and two worker nodes on loopback, one CPU
each, bounded object stores, stopped at the end): every weight-only method gives the local
backend's bits over several steps and in the export; a worker killed in the middle of a step is
retried; with no retries the step fails in one sentence and the state stays where it was."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PARITY
from foldin import MergeState, available_methods
from foldin.errors import FoldinError
from foldin.io.checkpoint import open_checkpoint
from foldin.runners.ray import RayBackend
from foldin.state.stored import generation_file

# Ray resolves 127.0.0.1 to the machine's outward address unless told it runs a loopback-only cluster
# (on hosts that block connections to their own outward address, such as CI sandboxes, nothing else works)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra: pip install 'foldin[ray]'")

CLIP = PARITY / "clip-vision-tiny"
METHODS = [name for name, cls in available_methods().items() if not cls.needs_data]  # every weight-only method


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    c = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(**node) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


def _one_thread(fn):
    """The local backend at one torch thread, as each Ray task runs (the bits depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _tensors(state: MergeState) -> dict[str, torch.Tensor]:
    with open_checkpoint(generation_file(state.dir, state.meta)) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.mark.parametrize("method", METHODS)
def test_ray_gives_the_local_bits(cluster, tmp_path, method):
    states = {}
    for backend in ("local", "ray"):
        state = MergeState.create(tmp_path / backend, CLIP / "base", method)
        for i in (1, 2, 3):
            if backend == "ray":
                state.add(CLIP / f"ckpt_{i}", progress=False, backend=RayBackend(cluster[0].address, tasks_per_cpu=3))
            else:
                _one_thread(lambda: state.add(CLIP / f"ckpt_{i}", progress=False))
        states[backend] = state
    local, remote = states["local"], states["ray"]
    assert (
        remote.dir / remote.meta["generation"] / "merged.safetensors.index.json"
    ).exists()  # written in shards by the tasks
    assert len({*generation_file(remote.dir, remote.meta).parent.glob("merged-*.safetensors")}) > 1
    assert local.meta["stats"] == remote.meta["stats"]
    assert local.meta["checksums"]["merged"] == remote.meta["checksums"]["merged"]
    assert [e["hash"] for e in local.history] == [e["hash"] for e in remote.history]
    a, b = _tensors(local), _tensors(remote)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert remote.verify() > 0
    out_local = _one_thread(lambda: local.export(tmp_path / "out-local", max_shard_size="40KB", progress=False))
    out_ray = remote.export(
        tmp_path / "out-ray", max_shard_size="40KB", progress=False, backend=RayBackend(cluster[0].address)
    )
    shards = sorted(p.name for p in out_local.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in out_ray.glob("*.safetensors"))
    assert all((out_local / s).read_bytes() == (out_ray / s).read_bytes() for s in shards)


def test_a_bad_checkpoint_fails_on_ray_in_one_sentence(cluster, tmp_path):
    state = MergeState.create(tmp_path / "s", CLIP / "base", "opcm")
    state.add(CLIP / "ckpt_1", progress=False, backend=RayBackend(cluster[0].address))
    bad = load_file(CLIP / "ckpt_2" / "model.safetensors")
    name = next(n for n, t in bad.items() if t.is_floating_point())
    bad[name][0] = float("nan")
    save_file(bad, tmp_path / "bad.safetensors")
    before = (state.meta["generation"], state.meta["meta_sha256"] if "meta_sha256" in state.meta else None)
    with pytest.raises(FoldinError, match="NaN or Inf") as e:
        state.add(tmp_path / "bad.safetensors", progress=False, backend=RayBackend(cluster[0].address))
    assert "\n" not in str(e.value)
    again = MergeState.open(state.dir)
    assert again.step == 1 and (again.meta["generation"], again.meta.get("meta_sha256")) == before
    assert sorted(p.name for p in state.dir.glob("gen-*")) == [
        again.meta["generation"]
    ]  # the failed step left nothing


def _big_model(folder: Path, seed: int) -> Path:
    """A model whose linear weights are large enough for one OPCM task to take about a second."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    tensors = {f"layer{i}.weight": torch.randn(768, 768, generator=g) for i in range(6)}
    save_file(tensors, folder / "model.safetensors")
    return folder / "model.safetensors"


def _kill_first_task(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker process seen running a fold task."""
    while not stop.is_set() and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"ray::fold_chunk" in cmdline:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.01)


@pytest.mark.parametrize("retries", [2, 0])
def test_a_killed_worker_is_retried_or_the_step_fails_cleanly(cluster, tmp_path, retries):
    base = _big_model(tmp_path / "base", 0)
    base_tensors = load_file(base)
    ckpts = []
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        path = tmp_path / f"ckpt{i}.safetensors"
        save_file({n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base_tensors.items()}, path)
        ckpts.append(path)
    state = MergeState.create(tmp_path / "ray", base, "opcm", linear_weights=r".*weight")
    backend = RayBackend(cluster[0].address, retries=retries, tasks_per_cpu=3)
    state.add(ckpts[0], progress=False, backend=backend)
    before = dict(state.meta)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_task, args=(stop, killed))
    killer.start()
    try:
        if retries:
            state.add(ckpts[1], progress=False, backend=backend)
        else:
            with pytest.raises(FoldinError, match="Ray worker was lost"):
                state.add(ckpts[1], progress=False, backend=backend)
    finally:
        stop.set()
        killer.join()
    assert killed, "no fold task was seen running"
    if retries:
        local = MergeState.create(tmp_path / "local", base, "opcm", linear_weights=r".*weight")
        for c in ckpts:
            _one_thread(lambda: local.add(c, progress=False))
        assert (
            state.meta["checksums"]["merged"] == local.meta["checksums"]["merged"]
            and state.meta["stats"] == local.meta["stats"]
        )
    else:
        again = MergeState.open(state.dir)
        assert again.step == 1 and again.meta["generation"] == before["generation"]
        assert again.verify() > 0
