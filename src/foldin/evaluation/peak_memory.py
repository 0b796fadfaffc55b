"""The peak resident memory of one stretch of work inside a long-lived process (a bench step).

`getrusage`'s high-water mark only grows, so in a bench that runs several methods one after the
other it would charge every step with the largest step before it. Linux lets a process reset its
own mark (writing "5" to /proc/self/clear_refs, Linux >= 4.0) and read it back as VmHWM; where that
is not possible the process-wide maximum is returned and `resettable` says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak() -> bool:
    """Start a new high-water mark; False where the platform keeps only the process-wide one."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The high-water mark of resident memory since the last `reset_peak` (or the process start), in MB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
