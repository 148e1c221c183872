"""The iteration-level scheduler and the KV block allocator, in pure Python (no model, no tensors).

The engine's step is simulated here: after each `schedule()`, every scheduled request advances
`num_computed` by its n; a request whose computed tokens reach its end gets one fake output token,
and is finished once it has `max_tokens` of them. Every check is against invariants and counts
computed independently in the test (ceil divisions, arrival order), never stored outputs.
"""

from __future__ import annotations

import math
import random

import pytest

from moekit.errors import ConfigError
from moekit.infer.kv_cache import BlockAllocator
from moekit.infer.sampling import SamplingParams
from moekit.infer.scheduler import Request, Scheduler, Status

FAKE_TOKEN = 7


def make_request(i: int, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), arrival=i)


def advance(sched: Scheduler, batch) -> list[Request]:
    """What the engine does after running a batch; returns the requests finished by this step."""
    done = []
    for req, n in batch.items:
        req.num_computed += n
        if req.num_computed == req.num_tokens:
            req.output_ids.append(FAKE_TOKEN)
            if len(req.output_ids) >= req.params.max_tokens:
                sched.finish(req, "length")
                done.append(req)
    return done


def check_invariants(sched: Scheduler, alloc: BlockAllocator, batch, before: dict) -> None:
    """Checks one scheduled batch. `before` maps request id -> num_computed before schedule()."""
    bs = sched.block_size
    ns = [n for _, n in batch.items]
    reqs = [r for r, _ in batch.items]
    assert len({id(r) for r in reqs}) == len(reqs), "a request scheduled twice in one step"
    assert sum(ns) == batch.num_tokens <= sched.max_num_batched_tokens
    assert all(n >= 1 for n in ns)
    # decode rows (n == 1) first: once a longer row appears, no single-token row follows
    first_long = next((i for i, n in enumerate(ns) if n != 1), len(ns))
    assert all(n != 1 for n in ns[first_long:])
    assert len(sched.running) <= sched.max_num_seqs
    for req, n in batch.items:
        assert req.status is Status.RUNNING and req in sched.running
        assert n <= req.num_tokens - req.num_computed
        # blocks are allocated exactly as needed for the tokens computed after this step
        assert len(req.blocks) == math.ceil((req.num_computed + n) / bs)
    scheduled = {id(r) for r in reqs}
    for req in sched.running:
        if id(req) not in scheduled:
            assert len(req.blocks) == math.ceil(req.num_computed / bs)
    for req in batch.preempted:
        assert id(req) not in scheduled
        assert req.status is Status.WAITING and req.blocks == [] and req.num_computed == 0
    for req in sched.waiting:
        assert req.status is Status.WAITING and req.blocks == [] and req.num_computed == 0
    # blocks: never 0, never shared, and exactly what the allocator counts as used
    held = [b for r in sched.running for b in r.blocks]
    assert 0 not in held
    assert len(held) == len(set(held)) == alloc.num_used
    assert alloc.num_used + alloc.num_free == alloc.num_blocks - 1
    if batch.preempted:  # no admission in a step that had to preempt
        assert all(before.get(r.id) is not None for r in reqs)


def run_to_completion(sched: Scheduler, alloc: BlockAllocator, requests: list[Request],
                      max_steps: int = 20000) -> dict:
    """Drives the scheduler until every request finished, checking invariants on every step."""
    admitted_order: list[str] = []  # first admission of each request
    in_queue = {r.id for r in sched.waiting}
    steps = preemptions = 0
    while sched.has_unfinished():
        steps += 1
        assert steps <= max_steps, "scheduler made no progress"
        before = {r.id: r.num_computed for r in sched.running}
        batch = sched.schedule()
        check_invariants(sched, alloc, batch, before)
        preemptions += len(batch.preempted)
        # newly admitted requests join the end of `running` in admission order (items are
        # reordered decode-first, so their order says nothing about admission)
        for req in sched.running:
            if req.id not in before and req.id not in admitted_order:
                admitted_order.append(req.id)
        # something always moves: a step with work left schedules at least one row
        assert batch.items
        advance(sched, batch)
    assert alloc.num_used == 0 and alloc.num_free == alloc.num_blocks - 1
    for r in requests:
        assert r.status is Status.FINISHED and r.finish_reason == "length"
        assert len(r.output_ids) == r.params.max_tokens and r.blocks == []
    assert in_queue >= set(admitted_order)
    return {"admitted": admitted_order, "steps": steps, "preemptions": preemptions}


# ------------------------------------------------------------------------------------------------
# FCFS admission

def test_fcfs_admission_order_with_queueing():
    alloc = BlockAllocator(200)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=2, max_num_batched_tokens=32)
    rng = random.Random(0)
    reqs = [make_request(i, rng.randint(1, 40), rng.randint(1, 6)) for i in range(12)]
    for r in reqs:
        sched.add(r)
    res = run_to_completion(sched, alloc, reqs)
    assert res["admitted"] == [r.id for r in reqs]


def test_waiting_requests_are_admitted_once_blocks_free_up():
    # 4 usable blocks of 4 tokens; A takes all 4; B and C wait until A finishes
    alloc = BlockAllocator(5)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = make_request(0, 12, 2), make_request(1, 8, 2), make_request(2, 3, 2)
    sched.add(a)
    batch = sched.schedule()
    assert [(r.id, n) for r, n in batch.items] == [("r0", 12)]
    advance(sched, batch)
    sched.add(b)
    sched.add(c)
    batch = sched.schedule()  # A decodes (13 tokens -> needs a 4th block): 0 free, B and C wait
    assert [r.id for r, _ in batch.items] == ["r0"]
    assert alloc.num_free == 0
    assert [r.id for r in sched.waiting] == ["r1", "r2"]
    advance(sched, batch)  # A finishes (max_tokens=2) and frees its blocks
    assert alloc.num_used == 0 and a.status is Status.FINISHED
    batch = sched.schedule()
    assert [r.id for r, _ in batch.items] == ["r1", "r2"]


def test_c_behind_blocked_head_waits_even_if_it_would_fit():
    alloc = BlockAllocator(4)  # 3 usable blocks
    sched = Scheduler(alloc, block_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = make_request(0, 8, 3), make_request(1, 8, 2), make_request(2, 1, 2)
    for r in (a, b, c):
        sched.add(r)
    batch = sched.schedule()  # A takes 2 blocks; B needs 2 but 1 is free; C (needs 1) must not jump B
    assert [r.id for r, _ in batch.items] == ["r0"]
    assert [r.id for r in sched.waiting] == ["r1", "r2"]
    assert alloc.num_free == 1


# ------------------------------------------------------------------------------------------------
# token budget, decode-first ordering, random simulation

# (block_size, token budget, max_num_seqs, num_blocks, tight): "tight" configurations have far
# fewer blocks than their concurrent requests need, so they must preempt
GRID = [(1, 4, 5, 12, True), (2, 3, 5, 20, True), (4, 8, 100, 12, True), (16, 64, 100, 5, True),
        (2, 64, 100, 15, True), (4, 8, 1, 30, False), (1, 3, 2, 80, False), (16, 64, 1, 19, False),
        (2, 1, 5, 200, False)]


@pytest.mark.parametrize("bs,budget,max_seqs,num_blocks,tight", GRID)
def test_random_workloads_respect_budget_blocks_and_finish(bs, budget, max_seqs, num_blocks, tight):
    rng = random.Random(num_blocks * 1000 + budget)
    capacity = (num_blocks - 1) * bs
    reqs = []
    for i in range(30):
        total = rng.randint(2, min(capacity, 60)) if capacity >= 2 else 2
        prompt = rng.randint(1, total - 1)
        reqs.append(make_request(i, prompt, total - prompt))  # fits the cache on its own
    alloc = BlockAllocator(num_blocks)
    sched = Scheduler(alloc, bs, max_seqs, budget)
    for r in reqs:
        sched.add(r)
    res = run_to_completion(sched, alloc, reqs)
    assert res["admitted"] == [r.id for r in reqs]  # first admissions are FCFS, preemption or not
    assert sched.num_preemptions == res["preemptions"] == sum(r.num_preemptions for r in reqs)
    if tight:
        assert res["preemptions"] > 0
    if max_seqs == 1:  # one request at a time never runs out of blocks (each fits on its own)
        assert res["preemptions"] == 0


def test_requests_arriving_between_steps_are_admitted_fcfs():
    rng = random.Random(11)
    alloc = BlockAllocator(30)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    reqs = [make_request(i, rng.randint(1, 30), rng.randint(1, 8)) for i in range(40)]
    pending = list(reqs)
    admitted, seen_running = [], set()
    steps = 0
    while pending or sched.has_unfinished():
        steps += 1
        assert steps < 5000
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        before = {r.id: r.num_computed for r in sched.running}
        batch = sched.schedule()
        check_invariants(sched, alloc, batch, before)
        for r in sched.running:
            if r.id not in seen_running:
                seen_running.add(r.id)
                admitted.append(r.id)
        advance(sched, batch)
    assert admitted == [r.id for r in reqs]
    assert alloc.num_used == 0


def test_decode_rows_come_first_in_items():
    alloc = BlockAllocator(50)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_request(0, 10, 3), make_request(1, 1, 3)  # B's one-token prompt is a single-token row
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [(r.id, n) for r, n in batch.items] == [("r1", 1), ("r0", 10)]
    advance(sched, batch)
    c = make_request(2, 5, 3)
    sched.add(c)
    batch = sched.schedule()  # A and B decode, C prefills: the two decodes first, in running order
    assert [(r.id, n) for r, n in batch.items] == [("r0", 1), ("r1", 1), ("r2", 5)]


# ------------------------------------------------------------------------------------------------
# chunked prefill

def test_chunked_prefill_splits_a_long_prompt():
    bs, budget, prompt, max_tokens = 4, 16, 50, 3
    alloc = BlockAllocator(64)
    sched = Scheduler(alloc, bs, max_num_seqs=4, max_num_batched_tokens=budget)
    req = make_request(0, prompt, max_tokens)
    sched.add(req)
    chunks, computed = [], []
    while sched.has_unfinished():
        batch = sched.schedule()
        (r, n), = batch.items
        assert r is req
        chunks.append(n)
        # the chunk starts where the last one ended and its K/V blocks are there
        assert len(req.blocks) == math.ceil((req.num_computed + n) / bs)
        advance(sched, batch)
        computed.append(req.num_computed)
    # independent expectation: full-budget chunks, the remainder, then one token per decode step
    full, rest = divmod(prompt, budget)
    expected = [budget] * full + ([rest] if rest else []) + [1] * (max_tokens - 1)
    assert chunks == expected
    assert computed == [sum(expected[:i + 1]) for i in range(len(expected))]
    assert len(req.output_ids) == max_tokens and alloc.num_used == 0


def test_chunked_prefill_shares_the_budget_with_decodes():
    bs, budget = 4, 16
    alloc = BlockAllocator(64)
    sched = Scheduler(alloc, bs, max_num_seqs=4, max_num_batched_tokens=budget)
    b = make_request(0, 2, 20)
    sched.add(b)
    advance(sched, sched.schedule())  # B now decodes one token per step
    a = make_request(1, 50, 2)
    sched.add(a)
    while a.num_computed < len(a.prompt_ids):
        remaining = a.num_tokens - a.num_computed
        batch = sched.schedule()
        assert batch.items[0] == (b, 1)  # the decode row first
        assert batch.items[1][0] is a
        # A gets what the decode leaves of the budget, or what it still needs
        assert batch.items[1][1] == min(remaining, budget - 1)
        assert batch.num_tokens <= budget
        advance(sched, batch)
    assert len(a.output_ids) == 1


# ------------------------------------------------------------------------------------------------
# preemption

def test_newest_running_request_is_preempted_when_blocks_run_out():
    bs = 2
    alloc = BlockAllocator(6)  # 5 usable blocks
    sched = Scheduler(alloc, bs, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = make_request(0, 3, 7), make_request(1, 3, 7), make_request(2, 1, 7)
    for r in (a, b, c):
        sched.add(r)
    for _ in range(2):  # prefill all three (2 + 2 + 1 blocks: none left), then one decode
        batch = sched.schedule()
        assert not batch.preempted
        advance(sched, batch)
    assert alloc.num_free == 0
    assert [r.num_computed for r in (a, b, c)] == [4, 4, 2]
    outputs_before = {r.id: list(r.output_ids) for r in (a, b, c)}
    # next step: A needs a 3rd block -> C (newest) goes; B then needs one -> B (now newest) goes
    batch = sched.schedule()
    assert [r.id for r in batch.preempted] == ["r2", "r1"]
    assert [(r.id, n) for r, n in batch.items] == [("r0", 1)]
    for r in (b, c):
        assert r.status is Status.WAITING and r.blocks == [] and r.num_computed == 0
        assert r.num_preemptions == 1
        assert r.output_ids == outputs_before[r.id]  # generated tokens are kept, and recomputed
        assert r not in sched.running
    assert list(sched.waiting) == [b, c]  # the preempted at the head of the queue, in FCFS order
    assert sched.num_preemptions == 2
    assert alloc.num_used == len(a.blocks) == 3
    advance(sched, batch)
    # everything still completes, B before C
    res = run_to_completion(sched, alloc, [a, b, c])
    assert res["admitted"] == ["r1", "r2"]


def test_single_preemption_frees_the_victims_blocks_for_the_older_request():
    bs = 4
    alloc = BlockAllocator(5)  # 4 usable blocks, 16 tokens
    sched = Scheduler(alloc, bs, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_request(0, 6, 10), make_request(1, 6, 10)
    sched.add(a)
    sched.add(b)
    preempted_at = None
    for step in range(12):
        free_before = alloc.num_free
        b_blocks = list(b.blocks)
        batch = sched.schedule()
        if batch.preempted:
            assert batch.preempted == [b] and preempted_at is None
            preempted_at = step
            assert free_before == 0
            assert b.num_computed == 0 and b.blocks == [] and sched.waiting[0] is b
            # B's blocks went back and A took the one it needed from them
            assert set(a.blocks[-1:]) <= set(b_blocks)
            assert alloc.num_used == len(a.blocks)
            assert [r for r, _ in batch.items] == [a]
        advance(sched, batch)
        if not sched.has_unfinished():
            break
    assert preempted_at is not None


def test_preempted_request_resumes_with_its_outputs_as_prompt():
    bs = 2
    alloc = BlockAllocator(6)
    sched = Scheduler(alloc, bs, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_request(0, 3, 7), make_request(1, 3, 7)
    sched.add(a)
    sched.add(b)
    while not b.num_preemptions:
        advance(sched, sched.schedule())
    n_out = len(b.output_ids)
    assert n_out >= 1
    while b.status is Status.WAITING:
        advance(sched, sched.schedule())
    # once re-admitted, B first recomputes prompt + generated tokens (as far as the budget allows)
    assert b.num_computed == len(b.prompt_ids) + n_out
    assert len(b.output_ids) == n_out + 1


# ------------------------------------------------------------------------------------------------
# finish

def test_finish_frees_blocks_of_running_and_removes_waiting():
    alloc = BlockAllocator(20)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = make_request(0, 9, 5), make_request(1, 4, 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert len(a.blocks) == 3 and alloc.num_used == 3 and list(sched.waiting) == [b]
    sched.finish(a, "abort")
    assert a.status is Status.FINISHED and a.finish_reason == "abort" and a.blocks == []
    assert alloc.num_used == 0 and a not in sched.running
    sched.finish(b, "abort")  # still waiting
    assert b.status is Status.FINISHED and not sched.waiting and not sched.has_unfinished()
    assert alloc.num_free == alloc.num_blocks - 1


# ------------------------------------------------------------------------------------------------
# allocator

def test_allocator_random_alloc_free_never_hands_out_block_zero_or_duplicates():
    rng = random.Random(3)
    for num_blocks in (2, 3, 17, 100):
        alloc = BlockAllocator(num_blocks)
        usable = num_blocks - 1
        held: list[list[int]] = []
        out: set[int] = set()
        for _ in range(2000):
            if held and (rng.random() < 0.45 or alloc.num_free == 0):
                blocks = held.pop(rng.randrange(len(held)))
                alloc.free(blocks)
                out -= set(blocks)
            else:
                n = rng.randint(0, min(alloc.num_free, 5))
                blocks = alloc.allocate(n)
                assert len(blocks) == n
                assert 0 not in blocks
                assert all(1 <= x < num_blocks for x in blocks)
                assert not out & set(blocks) and len(set(blocks)) == n
                out |= set(blocks)
                held.append(blocks)
            assert alloc.num_used == len(out)
            assert alloc.num_free == usable - len(out)
        # asking for more than is free raises and changes nothing
        free = alloc.num_free
        with pytest.raises(RuntimeError):
            alloc.allocate(free + 1)
        assert alloc.num_free == free


def test_allocator_needs_two_blocks():
    with pytest.raises(ConfigError):
        BlockAllocator(1)
    assert BlockAllocator(2).allocate(1) == [1]
