"""foldin: continual model merging. Fold fine-tuned checkpoints of one base model into a single
merged model as they arrive, streaming tensor by tensor, with a resumable on-disk state."""

from importlib.metadata import version

from foldin.api import ContinualMerger, merge
from foldin.data import Learning, TaskData
from foldin.errors import CheckpointError, FoldinError, MismatchError, StateError
from foldin.io.checkpoint import open_checkpoint
from foldin.methods import available_methods, get_method, register
from foldin.runners import Options
from foldin.state import MergeState

__version__ = version("foldin")  # one source of truth: pyproject.toml

__all__ = [
    "CheckpointError",
    "ContinualMerger",
    "FoldinError",
    "Learning",
    "MergeState",
    "MismatchError",
    "Options",
    "StateError",
    "TaskData",
    "available_methods",
    "get_method",
    "merge",
    "open_checkpoint",
    "register",
]
