"""`--backend ray`: a merge step's passes, and the export, as Ray tasks over chunks of tensors. This
module is the driver's side; what a task runs on its node is `ray_tasks.py`.

Every task gets file locations and tensor names, never tensors: it opens the base, the new
checkpoint and the state's current generation itself (storage every node can see), runs the
method's per-tensor function, and in the writing pass writes its own shard of the new merged task
vector. Back to the driver come only what the local engine would have kept: the per-tensor results
(scalars, in tensor order, so the driver's reductions such as OPCM's global norm are the local
ones, bit for bit), tensor checksums and timings. The driver writes the shard index and commits
the step exactly as the local backend does; a failed or lost task leaves the state at its last
good step. A killed worker's task is run again (`retries`), which is safe: a task only writes its
own shard, from scratch.

The bits equal the local backend's when each tensor gets the same number of torch threads
(`threads`, default 1: `OMP_NUM_THREADS=1 foldin add ...` gives the same files), the same dtype and
device, and the same torch version on every node (checked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from foldin.data import Learning
from foldin.engine import CheckedReader, ModelLayout, StepPasses
from foldin.errors import FoldinError
from foldin.io.export import plan_shards
from foldin.io.shards import MERGED_INDEX, MERGED_PREFIX, shard_name, write_index
from foldin.io.specs import Spec, spec_bytes
from foldin.methods.base import MergeMethod, R, TensorSlot
from foldin.progress import progress as progress_bar
from foldin.runners import GenerationJob, Options, ShardWriter, StateFiles
from foldin.runners.ray_tasks import ChunkResult, StepFiles, export_shard, fold_chunk, versions


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FoldinError("--backend ray needs Ray: pip install 'foldin[ray]'.") from None
    return ray


class RayBackend:
    """Where and how steps run on Ray. `address`: an existing cluster ("auto", "HOST:PORT",
    "ray://HOST:10001"); None starts a local one (or joins RAY_ADDRESS). `threads`: torch threads
    per task (the bits depend on it). `retries`: how often a task whose worker died is run again.
    `tasks_per_cpu`: chunks per CPU of the cluster, for balance (tensors differ in cost)."""

    def __init__(self, address: str | None = None, threads: int = 1, retries: int = 2, tasks_per_cpu: int = 4):
        if threads < 1 or retries < 0 or tasks_per_cpu < 1:
            raise FoldinError("--backend ray: threads and tasks per CPU must be at least 1, retries at least 0.")
        self.address, self.threads, self.retries, self.tasks_per_cpu = address, threads, retries, tasks_per_cpu
        self.timings: list[dict[str, Any]] = []  # per pass: description and seconds per tensor

    def connect(self):
        ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    logging_level="ERROR",
                    log_to_driver=False,
                    **({} if self.address else {"include_dashboard": False}),
                )
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise FoldinError(
                    f"could not reach the Ray cluster at {self.address or 'a new local cluster'}: {e}"
                ) from None
        return ray

    def chunks(self, layout: ModelLayout, names: list[str]) -> list[list[str]]:
        """Consecutive tensors grouped into about tasks_per_cpu chunks per CPU of the cluster."""
        ray = self.connect()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        sizes = {n: spec_bytes((layout.compute_dtype, layout.specs[n][1])) for n in names}
        return plan_shards(sizes, max(1, math.ceil(sum(sizes.values()) / (cpus * self.tasks_per_cpu))))

    def run(
        self, function: Callable[..., R], calls: list[tuple], desc: str, progress: bool, weights: list[int]
    ) -> list[R]:
        """Run `function(*call)` for each call as a Ray task; results in call order. A task that
        raises a foldin error re-raises it here; a task lost for good fails the step clearly."""
        ray = self.connect()
        remote = ray.remote(num_cpus=self.threads, max_retries=self.retries)(function)
        futures = [remote.remote(*call) for call in calls]
        pending = {f: w for f, w in zip(futures, weights)}
        with progress_bar(total=sum(weights), desc=desc, unit="tensor", enabled=progress) as bar:
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    bar.update(pending.pop(done[0]))
                    ray.get(done[0])  # raise now, not after the other tasks
                return ray.get(futures)
            except ray.exceptions.RayTaskError as e:
                for f in pending:
                    ray.cancel(f, force=True)
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                if isinstance(cause, FoldinError):
                    raise cause from None
                raise FoldinError(f"a Ray task failed during {desc}: {cause or e}") from None
            except ray.exceptions.RayError as e:
                for f in pending:
                    ray.cancel(f, force=True)
                raise FoldinError(
                    f"a Ray worker was lost during {desc} and {self.retries} retries did not bring it back "
                    f"({type(e).__name__})."
                ) from None

    @contextmanager
    def generation_runner(self, options: Options, job: GenerationJob) -> Iterator[RayRunner]:
        """A step as Ray tasks writing the merged task vector in shards into gen_dir, then their index."""
        if options.device not in (None, "cpu"):
            raise FoldinError(
                "--device with --backend ray is not supported yet; the Ray tasks compute on their nodes' CPUs."
            )
        step_files = StepFiles(job.files, str(job.checkpoint.resolve()), job.layout, "cpu", self.threads)
        runner = RayRunner(self, step_files, job.gen_dir, MERGED_PREFIX, options.progress)
        yield runner
        weight_map = {n: runner.weight_map[n] for n in job.layout.merged_names}
        write_index(job.gen_dir / MERGED_INDEX, weight_map, {"format": "pt", "foldin_step": str(job.step)})

    def shard_writer(
        self,
        options: Options,
        files: StateFiles,
        method: MergeMethod,
        stats: dict[str, float],
        specs: dict[str, Spec],
    ) -> ShardWriter:
        """Each shard of an export written by a Ray task (the output folder's parent must be shared storage)."""

        def write(shards: list[tuple[Path, list[str]]]) -> None:
            calls = [
                (files, names, method, stats, {n: specs[n] for n in names}, str(path.resolve()), self.threads)
                for path, names in shards
            ]
            timings = self.run(export_shard, calls, "exporting", options.progress, [len(names) for _, names in shards])
            self.timings.append({"pass": "export", "seconds": {k: v for t in timings for k, v in t.items()}})

        return write

    def check_versions(self, results: list[ChunkResult]) -> None:
        driver = versions()
        for r in results:
            if r.versions != driver:
                raise FoldinError(
                    f"a Ray worker runs foldin {r.versions[0]} with torch {r.versions[1]}, the driver foldin "
                    f"{driver[0]} with torch {driver[1]}: install the same versions on every node."
                )


class RayRunner:
    """Runs one step as Ray tasks that write the merged task vector's shards into `out_dir`."""

    def __init__(self, backend: RayBackend, files: StepFiles, out_dir: Path, shard_prefix: str, progress: bool):
        self.backend, self.files, self.out_dir, self.shard_prefix, self.progress = (
            backend,
            files,
            out_dir,
            shard_prefix,
            progress,
        )
        self.weight_map: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        self.on_merged: Callable[[TensorSlot, torch.Tensor], None] | None = None  # never set: fused exports are local

    def context(
        self,
        method: MergeMethod,
        step: int,
        stats: Mapping[str, float],
        layout: ModelLayout,
        new: CheckedReader,
        learning: Learning | None,
    ) -> RayStep:
        if method.needs_data:
            raise FoldinError(
                f"--backend ray applies to the weight-only methods; {method.name!r} learns on one machine (use "
                f"the local backend)."
            )
        return RayStep(self, step, stats, layout, new)


class RayStep(StepPasses):
    """The StepContext of a step on Ray: each pass is a round of tasks over chunks of tensors."""

    def __init__(
        self, runner: RayRunner, step: int, stats: Mapping[str, float], layout: ModelLayout, new: CheckedReader
    ):
        super().__init__(step, stats, layout)
        self._runner, self._new = runner, new
        self._chunks = runner.backend.chunks(layout, layout.merged_names)
        self._unmerged = [n for n in new.specs if n not in set(layout.merged_names)]  # hashed, never merged

    def run_pass(self, fn: Callable[[TensorSlot], Any], desc: str, write: bool) -> list[Any]:
        r, n = self._runner, len(self._chunks)
        shards = [shard_name(r.shard_prefix, i, n) for i in range(n)] if write else [None] * n
        calls = [
            (r.files, names, fn, str(r.out_dir / s) if s else None, self._unmerged if i == 0 else [])
            for i, (names, s) in enumerate(zip(self._chunks, shards))
        ]
        outs: list[ChunkResult] = r.backend.run(
            fold_chunk, calls, f"step {self.step}: {desc}", r.progress, [len(c) for c in self._chunks]
        )
        r.backend.check_versions(outs)
        for names, shard, out in zip(self._chunks, shards, outs):
            self._new.add_digests(out.new_digests)
            if shard:
                r.digests.update(out.digests)
                r.weight_map.update(dict.fromkeys(names, shard))
        r.backend.timings.append(
            {"step": self.step, "pass": desc, "seconds": {k: v for o in outs for k, v in o.seconds.items()}}
        )
        return [x for out in outs for x in out.results]
