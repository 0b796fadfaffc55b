"""The local backend: a step's passes in this process, tensor by tensor, optionally several tensors
at once on threads; the merged task vector goes to a sink (a generation file, or a dict)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from foldin.data import Learning
from foldin.engine import CheckedReader, ModelLayout, StepPasses, TensorSource, resolve_device, tensor_loader
from foldin.errors import FoldinError
from foldin.io.checkpoint import tensor_digest
from foldin.io.safetensors_file import SafetensorsWriter
from foldin.io.shards import MERGED_FILE
from foldin.io.specs import Spec
from foldin.methods.base import MergeMethod, TensorSlot
from foldin.progress import progress
from foldin.runners import GenerationJob, Options, StateFiles

BUFFERED_PER_WORKER = 4


class LocalStep(StepPasses):
    """Passes over the layout's tensors in this process; the update pass sends each new tensor to `sink`."""

    def __init__(
        self,
        step: int,
        stats: Mapping[str, float],
        layout: ModelLayout,
        load: Callable[[str, str], torch.Tensor],
        sink: Callable[[str, torch.Tensor], None],
        options: Options,
        learning: Learning | None = None,
        on_merged: Callable[[TensorSlot, torch.Tensor], None] | None = None,
    ):
        super().__init__(step, stats, layout, learning)
        self._load, self._sink, self._options, self._on_merged = load, sink, options, on_merged
        # a data-driven method holds the model whole anyway: one tensor at a time
        self._workers = 1 if learning is not None else options.workers or 1  # None: LocalRunner.context decides

    def _slots(self, desc: str) -> Iterator[TensorSlot]:
        names = progress(
            self.layout.merged_names, desc=f"step {self.step}: {desc}", unit="tensor", enabled=self._options.progress
        )
        for name in names:
            yield TensorSlot(name, name in self.layout.linear, self._load)

    def _map(self, fn: Callable[[TensorSlot], Any], desc: str) -> Iterator[tuple[TensorSlot, Any]]:
        """fn over every slot, in tensor order. With workers > 1, `workers` tensors are computed at
        once on threads (torch releases the GIL in its kernels), each with its share of torch's
        threads; results still come back in order, so reductions are done in the same order and the
        bits equal those of a one-worker run with that many threads. Finished results wait behind an
        unfinished earlier one (a bias done before its weight's SVD), at most `BUFFERED_PER_WORKER`
        x workers tensors in all: a window of `workers` tensors would leave a worker idle whenever
        a small tensor sits between two large ones, as every layer's bias does."""
        if self._workers <= 1:
            for slot in self._slots(desc):
                yield slot, fn(slot)
            return
        share = max(1, torch.get_num_threads() // self._workers)  # set in each worker thread: the
        # count is per thread, so the caller's own (and another step's in this process) stays as it is
        cap = BUFFERED_PER_WORKER * self._workers
        with ThreadPoolExecutor(self._workers, initializer=torch.set_num_threads, initargs=(share,)) as pool:
            in_flight: deque = deque()
            for slot in self._slots(desc):
                in_flight.append((slot, pool.submit(fn, slot)))
                while in_flight:
                    if in_flight[0][1].done():
                        done, future = in_flight.popleft()
                        yield done, future.result()
                        continue
                    running = [f for _, f in in_flight if not f.done()]
                    if len(running) < self._workers and len(in_flight) < cap:
                        break  # a worker is free and the buffer has room: submit the next tensor
                    wait(running, return_when=FIRST_COMPLETED)
            while in_flight:
                done, future = in_flight.popleft()
                yield done, future.result()

    def run_pass(self, fn: Callable[[TensorSlot], Any], desc: str, write: bool) -> list[Any]:
        results = []
        for slot, out in self._map(fn, desc):
            if write:
                tensor, out = out
                stored = self.layout.as_stored(slot.name, tensor).cpu()
                self._sink(slot.name, stored)
                if self._on_merged is not None:
                    self._on_merged(slot, stored)
            results.append(out)
        return results


def default_workers(method: MergeMethod, device: torch.device) -> int:
    """One worker per torch thread, each with one thread, where a step decomposes matrices on the
    CPU (OPCM's SVDs): LAPACK's SVD of a 768 x 768 matrix is no faster on two threads than on one,
    so two at once on one thread each take 0.83x the time of one worker with both threads
    (ViT-B/32 shape, docs/performance.md). Elementwise methods are bound by reading and writing: one."""
    if method.uses_linear_weights and not method.needs_data and device.type == "cpu":
        return torch.get_num_threads()
    return 1


def step_workers(requested: int | None, method: MergeMethod, device: torch.device) -> int:
    """The workers a step runs with: the default where none are asked for; on the CPU, at most one
    per torch thread, since more would run more threads than cores (each worker has at least one)."""
    if requested is None:
        return default_workers(method, device)
    return min(requested, torch.get_num_threads()) if device.type == "cpu" else requested


class LocalRunner:
    """Runs steps in this process, reading the base and the previous merged task vector from
    sources and writing the new one to `sink`."""

    def __init__(
        self,
        base: TensorSource,
        previous: TensorSource | None,
        sink: Callable[[str, torch.Tensor], None],
        options: Options | None = None,
    ):
        options = options or Options()
        if options.workers is not None and options.workers < 1:
            raise FoldinError(f"--workers must be at least 1, not {options.workers}.")
        self.base, self.previous, self.sink, self.options = base, previous, sink, options
        self.device = resolve_device(options.device)
        # also called with each tensor of the new merged task vector and its slot (e.g. to export in the same pass)
        self.on_merged: Callable[[TensorSlot, torch.Tensor], None] | None = None

    def context(
        self,
        method: MergeMethod,
        step: int,
        stats: Mapping[str, float],
        layout: ModelLayout,
        new: CheckedReader,
        learning: Learning | None,
    ) -> LocalStep:
        if method.needs_data and self.device.type != "cpu":
            raise FoldinError(f"--device applies to the weight-only methods; {method.name!r} runs on the CPU.")
        # tensors that are not merged (integer buffers) are hashed first,
        # so that `on_hashed` fires once the merged ones are read
        for name in [n for n in new.specs if n not in layout.specs or not layout.specs[n][0].is_floating_point]:
            new.read(name)
        load = tensor_loader(layout, self.base, new, self.previous, self.device)
        options = replace(self.options, workers=step_workers(self.options.workers, method, self.device))
        return LocalStep(step, stats, layout, load, self.sink, options, learning, self.on_merged)


class GenerationFileRunner(LocalRunner):
    """A LocalRunner writing the merged task vector to one safetensors file, with each tensor's checksum."""

    def __init__(
        self,
        writer: SafetensorsWriter,
        base: TensorSource,
        previous: TensorSource | None,
        options: Options,
        checksum: str,
    ):
        super().__init__(base, previous, self._write, options)
        self.writer, self.checksum = writer, checksum
        self.digests: dict[str, str] = {}

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        self.digests[name] = tensor_digest(tensor, self.checksum)
        self.writer.write(name, tensor)


class LocalBackend:
    """A merge state's steps and exports in this process."""

    @contextmanager
    def generation_runner(self, options: Options, job: GenerationJob) -> Iterator[GenerationFileRunner]:
        """A runner writing the step's merged task vector to gen_dir/merged.safetensors."""
        metadata = {"format": "pt", "foldin_step": str(job.step)}
        with SafetensorsWriter(job.gen_dir / MERGED_FILE, job.layout.state_specs(), metadata) as writer:
            yield GenerationFileRunner(writer, job.base, job.previous, options, job.files.checksum)

    def shard_writer(
        self,
        options: Options,
        files: StateFiles,
        method: MergeMethod,
        stats: dict[str, float],
        specs: dict[str, Spec],
    ) -> None:
        return None  # the export writes its shards in this process
