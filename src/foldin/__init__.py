"""foldin: continual model merging. Fold fine-tuned checkpoints of one base model into a single
merged model as they arrive, streaming tensor by tensor, with a resumable on-disk state."""

__version__ = "0.1.0"

from foldin.api import ContinualMerger, merge  # noqa: E402
from foldin.errors import CheckpointError, FoldinError, MismatchError, StateError  # noqa: E402
from foldin.io.checkpoint import open_checkpoint  # noqa: E402
from foldin.methods import available_methods, get_method, register  # noqa: E402
from foldin.methods.learned import TaskData  # noqa: E402
from foldin.state import MergeState  # noqa: E402

__all__ = [
    "CheckpointError",
    "ContinualMerger",
    "FoldinError",
    "MergeState",
    "MismatchError",
    "StateError",
    "TaskData",
    "available_methods",
    "get_method",
    "merge",
    "open_checkpoint",
    "register",
]
