"""Runs one merge step: streams the base, the previous merged task vector and the new checkpoint
tensor by tensor through a method's passes, validating and hashing the checkpoint on the way.

Where the passes run (threads in this process, Ray tasks on a cluster) is a `Runner`'s business
(foldin.runners); where the merged task vector goes, the runner's too. Nothing here knows about
directories, atomic commits or clusters.

sources.py: what tensors are read from; layout.py: the base's tensors and which checkpoints fit;
checks.py: NaN/Inf checks and hashing of what is read, and verification of a state's own tensors;
step.py: the passes of one step; merged.py: the merged model's tensors.
"""

from __future__ import annotations

from foldin.engine.checks import CheckedReader, VerifiedSource, all_finite, hash_source
from foldin.engine.layout import ModelLayout
from foldin.engine.merged import export_tensor, read_export_tensor
from foldin.engine.sources import DictSource, Spec, TensorSource, architecture
from foldin.engine.step import Runner, StepPasses, fold_step, resolve_device, tensor_loader

__all__ = [
    "CheckedReader",
    "DictSource",
    "ModelLayout",
    "Runner",
    "Spec",
    "StepPasses",
    "TensorSource",
    "VerifiedSource",
    "all_finite",
    "architecture",
    "export_tensor",
    "fold_step",
    "hash_source",
    "read_export_tensor",
    "resolve_device",
    "tensor_loader",
]
