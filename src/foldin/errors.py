"""Errors foldin raises for bad input or a bad state. Each carries one sentence that tells the user
what is wrong and which file it concerns; the CLI prints it without a traceback."""


class FoldinError(Exception):
    """Base class: something the user can fix; the merge state is untouched when it is raised."""


class CheckpointError(FoldinError):
    """A checkpoint or base cannot be read, or is unsafe or corrupted."""


class MismatchError(FoldinError):
    """A checkpoint does not fit the state: other keys, shapes, dtypes, base, or already folded in."""


class StateError(FoldinError):
    """The merge state directory is missing, busy, corrupted, or used in a way it cannot support."""


def io_failure(what: str, error: OSError, where: object, then: str) -> str:
    """An OSError as the sentence foldin prints: what failed, the system's reason, the file, and
    what is left as it was ('{what} failed: Input/output error (PATH); {then}')."""
    return f"{what} failed: {error.strerror or error} ({error.filename or where}); {then}"
