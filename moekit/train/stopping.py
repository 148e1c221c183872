"""Stopping a run early at a step boundary, with a checkpoint: on SIGTERM (a scheduler's
preemption or time limit), on Ctrl-C, or before a step that could end past the run's own time
limit. Every rank stops after the same step."""

from __future__ import annotations

import signal
import sys
import threading
import time

import torch

EXIT_STOPPED = 75  # EX_TEMPFAIL: the run stopped early with a checkpoint; continue it with --resume


class StopRequests:
    """Within `with StopRequests(time_limit) as stop:`, SIGTERM and SIGINT set stop.reason instead of
    ending the process; the first signal restores the usual handlers, so a second one ends it at
    once. stop.due(dist) says whether the loop should stop after the step just taken: a signal
    arrived, or the longest step so far would end past time_limit seconds since `started`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, time_limit: float = 0.0, started: float | None = None):
        self.time_limit = time_limit
        self.started = time.monotonic() if started is None else started
        self.reason: str | None = None
        self._longest = 0.0
        self._last = time.monotonic()
        self._old: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._last = time.monotonic()
        return self

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name
        self._restore()
        print(f"\n{self.reason}: stopping after this step, with a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def due(self, dist=None, device: torch.device | None = None) -> bool:
        """Called once per step, after it: whether to stop now. Under torch.distributed a
        collective (every rank calls it), true on all ranks if on any."""
        now = time.monotonic()
        self._longest = max(self._longest, now - self._last)
        self._last = now
        if self.reason is None and self.time_limit and now - self.started + self._longest > self.time_limit:
            self.reason = f"time limit of {self.time_limit:g} s"
        if dist is None:
            return self.reason is not None
        flag = torch.tensor([float(self.reason is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "another rank's stop request"
        return bool(flag.item())
