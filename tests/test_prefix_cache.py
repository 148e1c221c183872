"""Prefix caching: the block allocator's registry (match, shared references, reuse of the least
recently freed), and the engine with it on: greedy output equals full recompute for requests that
share prefixes, under chunked prefill, preemption, aborts and speculative decoding, with tokens
found in the cache instead of computed, and no block left held."""

from __future__ import annotations

import random

import pytest

from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.kv_cache import BlockAllocator
from moekit.infer.sampling import SamplingParams
from tests.engine_helpers import BS, VOCAB, assert_engine_idle, budget_for_blocks, drive, get_model, greedy_reference


def test_allocator_registry_matches_shares_and_reuses_least_recently_freed():
    a = BlockAllocator(7, caching=True)  # blocks 1 .. 6
    blocks = a.allocate(3)
    toks = list(range(12))  # three full blocks of 4
    assert a.register(blocks, toks, 4, 0, 0) == a.key_id(blocks[2])
    a.free(blocks)
    assert a.num_used == 0 and a.num_free == 6
    assert a.match(toks + [99], 4, most=9) == blocks
    assert a.match(toks, 4, most=2) == blocks[:2]
    assert a.match([0, 1, 2, 3, 9, 9, 9, 9], 4, most=9) == blocks[:1]  # the second block differs
    assert a.match([5, 1, 2, 3] + toks[4:], 4, most=9) == []  # a block matches only after its prefix
    assert a.match(toks[:7], 4, most=9) == blocks[:1]  # whole blocks only
    # two holders of one block: free again only when both let go
    a.acquire(blocks[:2])
    a.acquire(blocks[:1])
    assert a.num_used == 2 and a.num_reclaimed(blocks) == 1
    a.free(blocks[:1])
    assert a.num_used == 2
    a.free(blocks[:2])
    assert a.num_used == 0
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(blocks[:1])
    # never-used blocks go first, then registered ones, the least recently freed first
    fresh = a.allocate(3)
    assert set(fresh).isdisjoint(blocks) and a.match(toks, 4, most=9) == blocks
    reused = a.allocate(1)
    assert reused == [blocks[2]]  # freed before blocks 0 and 1 were freed again
    assert a.match(toks, 4, most=9) == blocks[:2]
    a.free(fresh + reused)
    # a block whose contents another already holds stays unregistered; the chain goes on through it
    dup = a.allocate(3)
    a.register(dup, toks[:8] + [7, 7, 7, 7], 4, 0, 0)
    assert a.match(toks[:8] + [7, 7, 7, 7], 4, most=9) == blocks[:2] + [dup[2]]
    a.free(dup)
    assert a.num_used == 0
    assert BlockAllocator(4).match(toks, 4, most=9) == []  # caching off


def _shared_prefix_requests(rng: random.Random, n: int) -> list[tuple]:
    """Requests over a few shared prefixes (system prompts) of 13 to 30 tokens, then own suffixes."""
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(13, 30))] for _ in range(3)]
    reqs = []
    for i in range(n):
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 9))]
        reqs.append((prompt, SamplingParams(max_tokens=rng.randint(1, 12), temperature=0)))
    reqs.append((prefixes[0][:12], SamplingParams(max_tokens=5, temperature=0)))  # a prompt of 3 whole blocks
    return reqs


@pytest.mark.parametrize("case", ["large_budget", "chunked_prefill", "preemption"])
def test_greedy_with_prefix_caching_matches_full_recompute(case):
    model = get_model()
    opts = {"large_budget": dict(kv_budget="1MiB"),
            "chunked_prefill": dict(kv_budget="1MiB", max_num_batched_tokens=8),
            "preemption": dict(kv_budget=budget_for_blocks(model, 24), max_num_batched_tokens=16)}[case]
    engine = Engine(model, None, EngineConfig(block_size=BS, prefix_caching=True, **opts))
    computed = []
    real = engine.runner.forward_chunks
    engine.runner.forward_chunks = lambda chunks, **kw: computed.append(sum(len(c[2]) for c in chunks)) or real(chunks, **kw)
    reqs = _shared_prefix_requests(random.Random(7), 24)
    rids, streams = drive(engine, reqs, initial=3)
    for rid, (prompt, sp) in zip(rids, reqs):
        assert streams[rid][-1].output_token_ids == greedy_reference(model, prompt, sp.max_tokens)
    assert_engine_idle(engine)
    st = engine.stats()
    prompt_tokens = sum(len(p) for p, _ in reqs)
    assert st["prefix_cache_query_tokens"] >= prompt_tokens and st["prefix_cache_hit_tokens"] > prompt_tokens // 4
    if case == "preemption":
        assert st["preemptions"] > 0
    else:  # the prompts' cached tokens were not computed again (decode steps add one token a request)
        assert sum(computed) == st["prefix_cache_query_tokens"] - st["prefix_cache_hit_tokens"] + sum(
            sp.max_tokens - 1 for _, sp in reqs)


def test_a_prefix_loses_its_tail_first_when_blocks_are_reused():
    """A 10-block system prompt is cached; an unrelated request needs 3 of the cached blocks for
    itself; the system prompt then still finds its first 7 blocks (freed last to first, so the
    blocks reused are the tail's, and the head's chain stays whole)."""
    model = get_model()
    engine = Engine(model, None, EngineConfig(block_size=BS, kv_budget=budget_for_blocks(model, 14), prefix_caching=True))
    rng = random.Random(2)
    system = [rng.randrange(VOCAB) for _ in range(40)]
    greedy = SamplingParams(max_tokens=2, temperature=0)
    engine.generate([system + [5]], greedy)  # 42 positions: 10 full blocks registered, 11 held in all
    engine.generate([[rng.randrange(VOCAB) for _ in range(20)]], greedy)  # 6 blocks: 3 never used + 3 cached
    before = engine.stats()["prefix_cache_hit_tokens"]
    (out,) = engine.generate([system + [9]], greedy)
    assert engine.stats()["prefix_cache_hit_tokens"] - before == 7 * BS
    assert out.output_token_ids == greedy_reference(model, system + [9], 2)
    assert_engine_idle(engine)


def test_prefix_caching_off_finds_nothing_and_aborts_leave_no_blocks():
    model = get_model()
    off = Engine(model, None, EngineConfig(block_size=BS, kv_budget="1MiB"))
    reqs = _shared_prefix_requests(random.Random(3), 8)
    drive(off, reqs)
    assert off.stats()["prefix_cache_hit_tokens"] == 0
    engine = Engine(model, None, EngineConfig(block_size=BS, kv_budget=budget_for_blocks(model, 40), prefix_caching=True,
                                              max_num_batched_tokens=4096))
    rng = random.Random(11)
    reqs = _shared_prefix_requests(rng, 300)
    added, done = [], set()
    while reqs or engine.has_unfinished():
        for _ in range(rng.randint(0, 8)):
            if reqs:
                added.append(engine.add_request(*reqs.pop()))
        live = [r for r in added if r not in done and r in engine.requests]
        for rid in rng.sample(live, min(len(live), rng.randint(0, 2))):
            assert engine.abort(rid) is True
            done.add(rid)
        for out in engine.step():
            if out.finished:
                done.add(out.request_id)
        held = {b for r in engine.scheduler.running for b in r.blocks}
        assert engine.kv.allocator.num_used == len(held)
    assert_engine_idle(engine)
    assert engine.stats()["prefix_cache_hit_tokens"] > 0 and engine.stats()["preemptions"] > 0


@pytest.mark.parametrize("proposer", ["draft", "prompt lookup"])
def test_prefix_caching_with_speculative_decoding(proposer):
    """A draft model recomputes its own K/V over a cached prefix; prompt lookup reads the
    request's tokens. Either way greedy output is the target's, with caching on and off."""
    model = get_model()
    draft = get_model(seed=2) if proposer == "draft" else None
    reqs = _shared_prefix_requests(random.Random(5), 10)
    for on in (False, True):
        eng = Engine(model, None, EngineConfig(block_size=BS, kv_budget="1MiB", prefix_caching=on, max_num_seqs=3,
                                               num_speculative_tokens=3,
                                               prompt_lookup_max=3 if draft is None else 0), draft=draft)
        out = eng.generate([p for p, _ in reqs], [sp for _, sp in reqs])
        assert [o.output_token_ids for o in out] == [greedy_reference(model, p, sp.max_tokens) for p, sp in reqs]
        assert eng.spec.stats.proposed > 0 and (eng.stats()["prefix_cache_hit_tokens"] > 0) == on
        assert_engine_idle(eng)


def test_seeded_sampling_is_the_same_with_prefix_caching():
    model = get_model()
    reqs = _shared_prefix_requests(random.Random(5), 10)
    sampled = [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(len(reqs))]
    runs = [Engine(model, None, EngineConfig(block_size=BS, kv_budget="1MiB", prefix_caching=on, max_num_seqs=2)
                   ).generate([p for p, _ in reqs], sampled) for on in (False, True)]
    assert [o.output_token_ids for o in runs[0]] == [o.output_token_ids for o in runs[1]]
