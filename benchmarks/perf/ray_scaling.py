"""OPCM on a Ray cluster: step time against the number of worker nodes, the per-tensor task
timings, and from them an estimate of a 70B OPCM step on N machines.

    python benchmarks/perf/ray_scaling.py                      # workers 1,2 on this machine
    python benchmarks/perf/ray_scaling.py --workers 1,2,4 --repeats 3

The model is the CLIP-ViT-B/32-shaped parity case (random base, low-rank plus noise task
vectors). The anchor is the local backend at one torch thread, in the same run. Each Ray run
starts a fresh local cluster on loopback (a head with no CPUs and N worker nodes of one CPU each),
folds checkpoint 1 in and then times step 2 (the projecting step); its result is checked bit for
bit against the anchor's. Medians over --repeats, alternating anchor and Ray runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback cluster (see tests/test_ray.py)
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "parity"))
from cases import make_case  # noqa: E402
from foldin import MergeState  # noqa: E402
from foldin.runners.ray import RayBackend  # noqa: E402

# Llama-3-70B: 80 layers, hidden 8192, MLP 28672, 8 key/value heads of 128, vocabulary 128256
LLAMA_70B_LINEAR = [
    (8192, 8192),
    (1024, 8192),
    (1024, 8192),
    (8192, 8192),
    (28672, 8192),
    (28672, 8192),
    (8192, 28672),
]
LLAMA_70B_LAYERS, LLAMA_70B_VOCAB, LLAMA_70B_PARAMS = 80, 128256, 70.6e9


def step_seconds(case: Path, work: Path, backend: RayBackend | None) -> tuple[float, dict[str, str], dict[str, float]]:
    """Seconds of step 2, the merged checksums, and (Ray) seconds per tensor of step 2's tasks."""
    shutil.rmtree(work, ignore_errors=True)
    state = MergeState.create(work, case / "base", "opcm")
    state.add(case / "ckpt_1", progress=False, backend=backend)
    started = time.perf_counter()
    state.add(case / "ckpt_2", progress=False, backend=backend)
    seconds = time.perf_counter() - started
    per_tensor = backend.timings[-1]["seconds"] if backend else {}
    return seconds, state.meta["checksums"]["merged"], per_tensor


def local_step(case: Path, work: Path) -> tuple[float, dict[str, str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return step_seconds(case, work, None)[:2]
    finally:
        torch.set_num_threads(threads)


def ray_step(case: Path, work: Path, workers: int) -> tuple[float, dict[str, str], dict[str, float]]:
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        return step_seconds(case, work, RayBackend(cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()


def fit_svd_rate(
    per_tensor: dict[str, float], shapes: dict[str, tuple[int, ...]], linear: set[str]
) -> tuple[float, float]:
    """Least-squares rates: seconds per m*n*min(m,n) for projected matrices (SVD-bound), and
    seconds per element for the other tensors (element-wise)."""
    cubic = [(math.prod(shapes[n]) * min(shapes[n]), s) for n, s in per_tensor.items() if n in linear]
    flat = [(math.prod(shapes[n]), s) for n, s in per_tensor.items() if n not in linear]
    rate = lambda pairs: sum(x * s for x, s in pairs) / sum(x * x for x, _ in pairs)  # noqa: E731
    return rate(cubic), rate(flat) if flat else 0.0


def calibrate(shapes: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Seconds of OPCM's projection (thin SVD and products) on larger random matrices at one
    thread: how far the rate fitted on ViT-B/32's matrices carries towards 70B shapes."""
    from foldin.methods.opcm import project_task_vector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for m, n in shapes:
            g = torch.Generator().manual_seed(m + n)
            merged, task = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
            started = time.perf_counter()
            project_task_vector(merged, task, 0.5)
            rows.append({"shape": [m, n], "seconds": time.perf_counter() - started, "mn_min": m * n * min(m, n)})
    finally:
        torch.set_num_threads(threads)
    return rows


def estimate_70b(
    svd_rate: float, elem_rate: float, machines: list[int], cores: int, read_gbps: float
) -> list[dict[str, float]]:
    """Seconds of one 70B OPCM step: compute spread over machines x cores one-thread tasks (never
    below the largest single tensor), plus I/O at read_gbps per machine (bf16 base and checkpoint,
    float32 merged task vector read and written: 12 bytes per parameter)."""
    mats = [shape for _ in range(LLAMA_70B_LAYERS) for shape in LLAMA_70B_LINEAR] + [
        (LLAMA_70B_VOCAB, 8192)
    ]  # + lm_head
    svd = [svd_rate * m * n * min(m, n) for m, n in mats]
    linear_params = sum(m * n for m, n in mats)
    other = elem_rate * (LLAMA_70B_PARAMS - linear_params)
    rows = []
    for n in machines:
        compute = max((sum(svd) + other) / (n * cores), max(svd))
        io = 12 * LLAMA_70B_PARAMS / (n * read_gbps * 1e9)
        rows.append(
            {"machines": n, "cores_each": cores, "compute_s": compute, "io_s": io, "total_h": (compute + io) / 3600}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="worker node counts, one CPU each")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE.parent / "_work" / "ray_scaling")
    ap.add_argument("--out", type=Path, help="write the results as JSON here (and a .md beside it)")
    a = ap.parse_args()
    case = a.work / "case"
    if not (case / "ckpt_2").exists():
        make_case("clip-vit-b32", case, n_checkpoints=2)
    counts = [int(w) for w in a.workers.split(",")]
    local, ray_runs, per_tensor = [], {w: [] for w in counts}, {}
    for r in range(a.repeats):
        seconds, anchor = local_step(case, a.work / "local")
        local.append(seconds)
        for w in counts:
            seconds, digests, per_tensor = ray_step(case, a.work / f"ray-{w}", w)
            if digests != anchor:
                raise SystemExit(f"Ray with {w} workers did not give the local bits")
            ray_runs[w].append(seconds)
            print(f"repeat {r + 1}: local {local[-1]:.1f} s, ray x{w} {seconds:.1f} s", file=sys.stderr)
    with MergeState.open(a.work / "local").reading() as (base, _):
        shapes = {n: base.spec(n)[1] for n in base.names()}
    linear = set(MergeState.open(a.work / "local").meta["linear_weights"])
    svd_rate, elem_rate = fit_svd_rate(per_tensor, shapes, linear)
    checks = calibrate([(2048, 2048), (2048, 8192)])
    svd_rate = max([svd_rate] + [c["seconds"] / c["mn_min"] for c in checks])  # the slower rate: a cautious estimate
    anchor_s = statistics.median(local)
    rows = [{"backend": "local, 1 thread", "workers": 1, "seconds": anchor_s, "speedup": 1.0}]
    rows += [
        {"backend": "ray", "workers": w, "seconds": statistics.median(s), "speedup": anchor_s / statistics.median(s)}
        for w, s in ray_runs.items()
    ]
    by_shape: dict[str, list[float]] = {}
    for n, s in per_tensor.items():
        by_shape.setdefault(f"{'x'.join(map(str, shapes[n]))}{' (projected)' if n in linear else ''}", []).append(s)
    estimate = estimate_70b(svd_rate, elem_rate, [1, 4, 16, 64], cores=16, read_gbps=1.0)
    result = {
        "model": "clip-vit-b32 shape (parity case), OPCM step 2",
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "rows": rows,
        "repeats": a.repeats,
        "per_tensor_seconds": per_tensor,
        "svd_seconds_per_mn_min": svd_rate,
        "elementwise_seconds_per_element": elem_rate,
        "calibration": checks,
        "estimate_70b": estimate,
    }
    lines = ["| backend | worker nodes | step 2 seconds (median) | speed-up vs local |", "|---|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['workers']} | {r['seconds']:.2f} | {r['speedup']:.2f} |" for r in rows]
    lines += ["", "| tensor shape | tensors | median seconds per task tensor |", "|---|---:|---:|"]
    lines += [
        f"| {k} | {len(v)} | {statistics.median(v):.4f} |"
        for k, v in sorted(by_shape.items(), key=lambda kv: -max(kv[1]))
    ]
    lines += [
        "",
        "| calibration: projection of a random matrix, 1 thread | seconds | s per m*n*min(m,n) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {c['shape'][0]}x{c['shape'][1]} | {c['seconds']:.2f} | {c['seconds'] / c['mn_min']:.3e} |" for c in checks
    ]
    lines += [
        "",
        f"Rate used: {svd_rate:.3e} s per m*n*min(m,n) for a projected matrix (the slowest of the ViT-B/32 fit "
        f"and the calibration), {elem_rate:.3e} s per element otherwise.",
        "",
        "| 70B step on N machines (16 one-thread tasks each, 1 GB/s storage each) | compute s | I/O s | total hours |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {e['machines']} | {e['compute_s']:.0f} | {e['io_s']:.0f} | {e['total_h']:.2f} |" for e in estimate]
    print("\n".join(lines))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        a.out.with_suffix(".md").write_text(
            f"# OPCM on Ray\n\n`python benchmarks/perf/ray_scaling.py --workers {a.workers} --repeats "
            f"{a.repeats} --out {a.out}`\n"
            f"({result['machine']})\n\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
