"""Stopping a run early: the time-limit rule against its closed form (a fake clock), and every rank
of a gloo group stopping after the same step when only one asks."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.train import stopping
from moekit.train.stopping import StopRequests
from tests.dist_helpers import free_port, init_gloo


@pytest.mark.parametrize("steps,limit,stop_after", [
    ([1.0, 1.0, 1.0, 1.0, 1.0], 4.5, 4),  # after 3 s a 4th step ends by 4 s; after 4 s a 5th could end at 5
    ([1.0, 3.0, 1.0, 1.0, 1.0], 7.5, 3),  # after 4 s a step as long as the longest (3 s) ends by 7; after 5 s, 8
    ([0.5] * 5, 0.0, None),  # no limit
])
def test_time_limit_stops_before_a_step_that_could_end_past_it(monkeypatch, steps, limit, stop_after):
    """Set-up takes 0 s here; after each step the run stops if now + its longest step so far
    would pass the limit."""
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    got = None
    with StopRequests(limit, started=100.0) as stop:
        for i, dt in enumerate(steps, 1):
            clock[0] += dt
            if stop.due():
                got = i
                break
    assert got == stop_after
    elapsed = sum(steps[:got]) if got else None
    if got:  # the closed form: the first i with sum(steps[:i]) + max(steps[:i]) > limit
        assert elapsed + max(steps[:got]) > limit
        assert all(sum(steps[:j]) + max(steps[:j]) <= limit for j in range(1, got))
        assert stop.reason == f"time limit of {limit:g} s"


def test_sigterm_repeats_are_absorbed_and_a_second_ctrl_c_is_left_to_the_usual_handler():
    before = {s: signal.getsignal(s) for s in StopRequests.SIGNALS}
    with StopRequests() as stop:
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGTERM, None)  # torchrun forwarding the scheduler's signal
        assert stop.reason == "SIGTERM" and signal.getsignal(signal.SIGTERM) == stop._handle and stop.due()
        stop._handle(signal.SIGINT, None)  # as the first Ctrl-C does
        assert stop.reason == "SIGTERM" and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in StopRequests.SIGNALS} == before


def test_the_time_limit_keeps_room_for_a_checkpoint_write(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    with StopRequests(10.0, started=0.0) as stop:
        clock[0] = 1.0
        assert not stop.due()  # 1 s spent, a 1 s step would end at 2
        stop.saved(7.5)
        clock[0] = 2.0
        assert stop.due()  # 2 + 1 + 7.5 > 10


def _worker(rank: int, world: int, port: int, asker: int | None, out: dict) -> None:
    init_gloo(rank, world, port)
    try:
        stop = StopRequests()
        results = []
        for step in range(3):
            if rank == asker and step == 1:
                stop.reason = "SIGTERM"  # as the handler sets it on this rank only
            results.append(stop.due(dist=True, device=torch.device("cpu")))
        out[rank] = (results, stop.reason)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("asker", [1, None])
def test_every_rank_stops_after_the_same_step(asker):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, free_port(), asker, out), nprocs=2, join=True)
        out = dict(out)
    if asker is None:
        assert out == {0: ([False] * 3, None), 1: ([False] * 3, None)}
    else:
        assert out[0] == ([False, True, True], "another rank's stop request")
        assert out[1] == ([False, True, True], "SIGTERM")
