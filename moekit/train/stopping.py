"""Stopping a run early at a step boundary, with a checkpoint: on SIGTERM (a scheduler's
preemption or time limit), on Ctrl-C, or before a step that could end past the run's own time
limit. Every rank stops after the same step."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

EXIT_STOPPED = 75  # EX_TEMPFAIL: the run stopped early with a checkpoint; continue it with --resume


class StopRequests:
    """Within `with StopRequests(time_limit) as stop:`, SIGTERM and SIGINT set stop.reason instead of
    ending the process. Further SIGTERMs are absorbed (a scheduler and torchrun may both send one);
    a second Ctrl-C ends the process at once. stop.due(dist) says whether the loop should stop
    after the step just taken: a signal arrived, or the longest step so far plus the longest
    checkpoint write (stop.saved) would end past time_limit seconds since `started`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, time_limit: float = 0.0, started: float | None = None):
        self.time_limit = time_limit
        self.started = time.monotonic() if started is None else started
        self.reason: str | None = None
        self._longest = self._save = 0.0
        self._last = time.monotonic()
        self._old: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._last = time.monotonic()
        return self

    def __exit__(self, *exc) -> bool:
        for s in list(self._old):
            self._restore(s)
        return False

    def _restore(self, s) -> None:
        handler = self._old.pop(s, None)
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        first = self.reason is None
        self.reason = self.reason or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._restore(signal.SIGINT)  # the next Ctrl-C interrupts at once
        if first:  # os.write: safe inside a handler, even during another write to stderr
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{self.reason}: stopping after this step, with a checkpoint{again}\n".encode())

    def saved(self, seconds: float) -> None:
        """A checkpoint write took this long: the time limit keeps room for one more."""
        self._save = max(self._save, seconds)

    def due(self, dist=None, device: torch.device | None = None) -> bool:
        """Called once per step, after it: whether to stop now. Under torch.distributed a
        collective (every rank calls it), true on all ranks if on any."""
        now = time.monotonic()
        self._longest = max(self._longest, now - self._last)
        self._last = now
        if (self.reason is None and self.time_limit
                and now - self.started + self._longest + self._save > self.time_limit):
            self.reason = f"time limit of {self.time_limit:g} s"
        if dist is None:
            return self.reason is not None
        flag = torch.tensor([float(self.reason is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "another rank's stop request"
        return bool(flag.item())
