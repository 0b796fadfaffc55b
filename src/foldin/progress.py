"""Progress on long work: a tqdm bar on a terminal, and a plain line every LOG_INTERVAL seconds
when stderr goes to a log (CI, nohup, `> log`), where a bar would stay silent and a long step
would read as a hang. Both measure the time left from the first unit done, and say "estimating"
until the rate has settled."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
SETTLED = 0.02  # the share of the work done, after the first unit, before a time left is estimated
LOG_INTERVAL = float(os.environ.get("FOLDIN_PROGRESS_SECONDS", 15))  # seconds between two progress lines in a log


class LogProgress:
    """The part of tqdm's interface foldin uses, printed as occasional lines: what, how far, time left."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        interval: float | None = None,
        stream: Any = None,
    ):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc, self.unit = desc, unit
        self.interval = LOG_INTERVAL if interval is None else interval
        self.stream = stream or sys.stderr
        self.n = 0.0
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.first: tuple[float, float] | None = None  # (time, n) at the first update: the rate starts there

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.n)
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def _print(self, now: float) -> None:
        elapsed = now - self.started
        where = f"{self.n:g}/{self.total:g} {self.unit}" if self.total else f"{self.n:g} {self.unit}"
        left = ""
        if self.total and self.first is not None:
            since, at = self.first
            done = self.n - at  # the rate leaves out the set-up before the first unit (loading, warm-up)
            if done >= max(2, SETTLED * self.total) and now > since:
                left = f", about {_duration((now - since) * (self.total - self.n) / done)} left"
            else:
                left = ", estimating the time left"
        postfix = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {where}{postfix}, {_duration(elapsed)} elapsed{left}", file=self.stream, flush=True)


class SettlingBar(tqdm):
    """tqdm's terminal bar, whose time left is measured like LogProgress's: from the first unit
    done (not from the start, which includes loading and warm-up), and shown only once SETTLED of
    the work has been done since; until then it says so."""

    SETTLING = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, estimating the time left{postfix}]"

    def __init__(self, *args: Any, **kwargs: Any):
        self.first: tuple[float, float] | None = None  # (time, n) when the first unit was seen done
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        if not self.total or self.disable:
            return d
        now = self._time()
        if self.first is None and self.n > 0:
            self.first = (now, self.n)
        since, at = self.first or (now, self.n)
        done = self.n - at
        if done >= max(2, SETTLED * self.total) and now > since:
            d["rate"] = done / (now - since)
        else:
            d["bar_format"] = self.SETTLING
        return d


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
) -> Any:
    """A progress display for `iterable` (or for manual `update` calls up to `total`): a bar on a
    terminal, occasional lines in a log, nothing when not `enabled`."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return SettlingBar(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr)
    return LogProgress(iterable, total, desc, unit)
