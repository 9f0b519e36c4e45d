"""How a trial fails on its own: it diverges, runs out of memory, or passes `train.max_minutes`.

These are the trial's own faults: running the same config again would fail the same way, so a
search records them as failed with their reason and goes on, without retrying them (Ray Tune's
retries are for a lost worker or node). Each is a `TrialFault` whose text is one line.

`TimeLimit` is checked at every batch boundary (and between epochs); `Watchdog` is for a trial
stuck where no batch boundary comes (a C call, a dead collective): a thread that, once the limit
and a grace period have passed with the trial still running, calls its `on_hang`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

import torch

from kdsearch.errors import KdsearchError

HANG_GRACE = "KDSEARCH_HANG_GRACE_MINUTES"
"""The environment variable that sets how long past `train.max_minutes` the watchdog waits for
the batch-boundary check to stop a trial (minutes; default `HANG_GRACE_MINUTES`). It is read
where the trial runs: set it where the nodes start (an embedded Ray passes the driver's on)."""
HANG_GRACE_MINUTES = 2.0


def hang_grace_minutes() -> float:
    """The watchdog's grace in minutes: `HANG_GRACE` when set, else `HANG_GRACE_MINUTES`."""
    text = os.environ.get(HANG_GRACE, "").strip()
    if not text:
        return HANG_GRACE_MINUTES
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise KdsearchError(f"{HANG_GRACE}={text}: not a number of minutes >= 0 (unset: {HANG_GRACE_MINUTES:g})")
    return value


class TrialFault(RuntimeError):
    """A failure that is the trial's own (its config's): recorded as failed, never retried.
    `line()` is what trials.parquet's error column holds: the kind, then the text."""

    def line(self) -> str:
        return f"{type(self).__name__}: {self}"


class TrialTimedOut(TrialFault):
    """Training passed `train.max_minutes`; stopped at a batch boundary."""

    def __init__(self, max_minutes: float, minutes: float, epoch: int):
        self.max_minutes, self.minutes, self.epoch = max_minutes, minutes, epoch
        super().__init__(f"trained {minutes:.2f} min, exceeded train.max_minutes={max_minutes:g} after epoch {epoch}")

    def __reduce__(self):  # picklable across Ray processes
        return (TrialTimedOut, (self.max_minutes, self.minutes, self.epoch))


class TrialOutOfMemory(TrialFault):
    """torch.cuda.OutOfMemoryError or MemoryError during an epoch, as one line."""

    def __init__(self, epoch: int, detail: str):
        self.epoch, self.detail = epoch, detail
        super().__init__(f"out of memory ({detail}) at epoch {epoch}")

    def __reduce__(self):
        return (TrialOutOfMemory, (self.epoch, self.detail))

    @classmethod
    def of(cls, error: BaseException, epoch: int) -> TrialOutOfMemory:
        """From torch's or Python's error: its first line (torch's runs on with advice about
        PYTORCH_CUDA_ALLOC_CONF), or the kind of memory when it says nothing."""
        lines = str(error).strip().splitlines()
        kind = "GPU memory" if isinstance(error, torch.cuda.OutOfMemoryError) else "host memory"
        first = lines[0].strip() if lines else kind
        return cls(epoch, first[:300].rstrip("."))


OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)
"""What a trial's step raises when the device or the host runs out of memory."""


class TimeLimit:
    """`train.max_minutes` for one attempt of a trial, measured from its start (a retry starts
    its own clock). `check(epoch)` raises TrialTimedOut once the limit has passed; `epoch` is
    the last epoch completed."""

    def __init__(self, max_minutes: float | None, clock: Callable[[], float] = time.monotonic):
        self.max_minutes, self._clock = max_minutes, clock
        self._start = clock()

    @property
    def minutes(self) -> float:
        return (self._clock() - self._start) / 60

    def check(self, epoch: int) -> None:
        if self.max_minutes is not None and self.minutes > self.max_minutes:
            raise TrialTimedOut(self.max_minutes, self.minutes, epoch)


class Watchdog:
    """A daemon thread that calls `on_hang(reason)` if the block it guards has not ended
    `seconds` after it began. Use as a context manager; leaving the block stops it."""

    def __init__(self, seconds: float, on_hang: Callable[[str], None], reason: str):
        self.seconds, self.on_hang, self.reason = seconds, on_hang, reason
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kdsearch-watchdog", daemon=True)

    def _watch(self) -> None:
        if not self._done.wait(self.seconds):
            self.on_hang(self.reason)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
