"""The inference engine (continuous batching over a paged KV cache) against independent references.

- greedy outputs against a plain full-recompute loop written here (the whole sequence through the
  model every step, argmax of the last logits, no cache), under chunked prefill, preemption and
  queueing, for MQA and GQA;
- logprobs against log_softmax of full-recompute logits;
- block accounting (allocated blocks go back to zero) under 1,000 requests with random aborts;
- seeded sampling reproducibility;
- the CUDA-graph row bookkeeping of one-token steps.
(Stop tokens, eos, stop strings, max_tokens and detokenization: test_engine_text.py; KV sizing and
the paged decode reference: test_kv_cache.py; the asyncio front: test_async_engine.py; shared
models and references: engine_helpers.py.)

The models are tiny, random and run in float64: an argmax is then never decided by rounding (the
smallest top-1/top-2 logit gap the reference saw is checked against the float64 noise level).
"""

from __future__ import annotations

import random

import pytest
import torch

from moekit.errors import ConfigError
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import MAX_LOGPROBS, SamplingParams
from tests.engine_helpers import (
    BS,
    MAX_LEN,
    VOCAB,
    assert_engine_idle,
    budget_for_blocks,
    drive,
    full_logprobs,
    get_model,
    greedy_reference,
    random_prompts,
)

# ------------------------------------------------------------------------------------------------
# greedy == full recompute, under every scheduling regime

CASES = {
    "large_budget": dict(kv_budget="1MiB"),
    "chunked_prefill": dict(kv_budget="1MiB", max_num_batched_tokens=8),
    "preemption": dict(kv_blocks=24, max_num_batched_tokens=16),  # 23 usable blocks = 92 tokens
    "queueing": dict(kv_budget="1MiB", max_num_seqs=2),
}


@pytest.mark.parametrize("n_kv_heads", [1, 2], ids=["mqa", "gqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_full_recompute(case, n_kv_heads):
    model = get_model(n_kv_heads)
    opts = dict(CASES[case])
    if "kv_blocks" in opts:
        opts["kv_budget"] = budget_for_blocks(model, opts.pop("kv_blocks"))
    cfg = EngineConfig(block_size=BS, **opts)
    engine = Engine(model, None, cfg)
    rng = random.Random(1234 + n_kv_heads)
    lengths = [1, 60, 2, 59] + [rng.randint(1, 60) for _ in range(16)]
    prompts = random_prompts(rng, lengths)
    max_tokens = [rng.randint(1, 16) for _ in prompts]
    reqs = [(p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(prompts, max_tokens)]

    seen = {"max_running": 0, "max_waiting": 0, "max_batch": 0}
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        seen["max_batch"] = max(seen["max_batch"], batch.num_tokens)
        return batch

    engine.scheduler.schedule = recording_schedule

    def on_step(e):
        st = e.stats()
        seen["max_running"] = max(seen["max_running"], st["running"])
        seen["max_waiting"] = max(seen["max_waiting"], st["waiting"])

    rids, streams = drive(engine, reqs, initial=12, on_step=on_step)
    for rid, (prompt, sp) in zip(rids, reqs):
        final = streams[rid][-1]
        assert final.output_token_ids == greedy_reference(model, prompt, sp.max_tokens)
        assert final.finish_reason == "length" and final.num_prompt_tokens == len(prompt)
    assert_engine_idle(engine)
    assert seen["max_running"] <= cfg.max_num_seqs
    assert seen["max_batch"] <= cfg.max_num_batched_tokens
    if case == "preemption":
        assert engine.stats()["preemptions"] > 0
    else:
        assert engine.stats()["preemptions"] == 0
    if case == "queueing":
        assert seen["max_running"] == 2 and seen["max_waiting"] > 0
    if case == "chunked_prefill":
        assert seen["max_batch"] == 8  # long prompts were cut into budget-sized chunks


def test_context_window_ends_generation_with_length():
    model = get_model()
    engine = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, max_model_len=40))
    prompt = random_prompts(random.Random(5), [37])[0]
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))
    assert out.output_token_ids == greedy_reference(model, prompt, 40 - 37)
    assert out.finish_reason == "length"
    with pytest.raises(ConfigError, match="context window"):
        engine.add_request(prompt + [1, 2, 3], SamplingParams(max_tokens=1))
    assert_engine_idle(engine)


def test_request_exactly_filling_the_cache_completes():
    model = get_model()
    n_blocks = 9  # 8 usable = 32 tokens
    engine = Engine(model, None, EngineConfig(kv_budget=budget_for_blocks(model, n_blocks), block_size=BS))
    capacity = (n_blocks - 1) * BS
    p1, p2 = random_prompts(random.Random(6), [20, 3])
    ids = [engine.add_request(p1, SamplingParams(max_tokens=capacity - 20, temperature=0)),
           engine.add_request(p2, SamplingParams(max_tokens=capacity - 3, temperature=0))]
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final[ids[0]].output_token_ids == greedy_reference(model, p1, capacity - 20)
    assert final[ids[1]].output_token_ids == greedy_reference(model, p2, capacity - 3)
    assert engine.stats()["preemptions"] > 0  # the two could never run side by side to the end
    assert_engine_idle(engine)


# ------------------------------------------------------------------------------------------------
# 1,000 requests with random aborts

def test_random_aborts_leave_no_blocks_allocated():
    model = get_model()
    engine = Engine(model, None, EngineConfig(kv_budget=budget_for_blocks(model, 60), block_size=BS,
                                              max_num_seqs=64, max_num_batched_tokens=4096))
    rng = random.Random(42)
    n_total = 1000
    specs = [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))],
              SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0.0, 1.0])))
             for _ in range(n_total)]
    added: list[str] = []
    spec_of: dict[str, SamplingParams] = {}
    finished: dict[str, object] = {}
    aborted: set[str] = set()
    counts = {"waiting": 0, "running": 0, "false": 0}
    steps = 0
    while len(added) < n_total or engine.has_unfinished():
        steps += 1
        assert steps < 5000
        for _ in range(rng.randint(0, 25)):
            if len(added) < n_total:
                spec = specs[len(added)]
                added.append(engine.add_request(*spec))
                spec_of[added[-1]] = spec[1]
        for _ in range(rng.randint(0, 5)):
            live = [r for r in added if r not in finished and r not in aborted]
            kind = rng.random()
            waiting = [r.id for r in engine.scheduler.waiting]
            if kind < 0.3 and waiting:  # a request that has not started (or was preempted)
                rid = rng.choice(waiting)
                assert engine.abort(rid) is True
                aborted.add(rid)
                counts["waiting"] += 1
            elif kind < 0.7 and live:
                rid = rng.choice(live)
                running = engine.requests[rid] in engine.scheduler.running
                assert engine.abort(rid) is True
                aborted.add(rid)
                counts["running"] += running
            else:  # finished, already aborted, or unknown ids: nothing to abort
                pool = list(finished)[-20:] + list(aborted)[-20:] + [f"nope-{rng.randrange(10**6)}"]
                assert engine.abort(rng.choice(pool)) is False
                counts["false"] += 1
        for out in engine.step():
            assert out.request_id not in aborted
            if out.finished:
                finished[out.request_id] = out
        used = sum(len(r.blocks) for r in engine.scheduler.running)
        assert engine.kv.allocator.num_used == used
    assert_engine_idle(engine)
    assert len(finished) + len(aborted) == n_total and not set(finished) & aborted
    for rid, out in finished.items():
        assert out.finish_reason == "length" and len(out.output_token_ids) == spec_of[rid].max_tokens
    assert counts["waiting"] > 0 and counts["running"] > 0 and counts["false"] > 0
    assert engine.stats()["preemptions"] > 0
    # the engine is still usable afterwards
    p = [3, 1, 4, 1, 5]
    (out,) = engine.generate([p], SamplingParams(max_tokens=5, temperature=0))
    assert out.output_token_ids == greedy_reference(model, p, 5)
    assert_engine_idle(engine)


# ------------------------------------------------------------------------------------------------
# seeded sampling

def test_seeded_sampling_is_reproducible_and_batch_invariant():
    model = get_model()
    rng = random.Random(7)
    prompt = random_prompts(rng, [9])[0]

    def seeded(s):
        return SamplingParams(temperature=1.0, seed=s, max_tokens=24)

    alone = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)).generate([prompt], seeded(11))[0]
    again = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, seed=5)).generate(
        [prompt], seeded(11))[0]
    assert again.output_token_ids == alone.output_token_ids
    # the same request in a crowded engine: other sampled / greedy / seeded requests, chunked
    # prefill, arrivals mid-stream and preemption all change the batch around it
    engine = Engine(model, None, EngineConfig(kv_budget=budget_for_blocks(model, 30), block_size=BS,
                                              max_num_batched_tokens=16, seed=3))
    others = [(p, SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), max_tokens=rng.randint(4, 30),
                                 seed=rng.choice([None, 11, 12]), top_k=rng.choice([0, 20])))
              for p in random_prompts(rng, [rng.randint(1, 50) for _ in range(12)])]
    reqs = others[:6] + [(prompt, seeded(11)), (prompt, seeded(11))] + others[6:]
    rids, streams = drive(engine, reqs, initial=3)
    assert engine.stats()["preemptions"] > 0
    assert streams[rids[6]][-1].output_token_ids == alone.output_token_ids
    assert streams[rids[7]][-1].output_token_ids == alone.output_token_ids  # own generator each
    # a different seed gives a different sequence
    other = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)).generate([prompt], seeded(12))[0]
    assert other.output_token_ids != alone.output_token_ids
    assert len(set(alone.output_token_ids)) > 3  # really sampled, not a greedy-like constant


def test_unseeded_sampling_follows_the_engine_seed():
    model = get_model()
    rng = random.Random(8)
    prompts = random_prompts(rng, [rng.randint(1, 30) for _ in range(6)])
    params = [SamplingParams(temperature=1.0, max_tokens=16, top_p=rng.choice([1.0, 0.9])) for _ in prompts]

    def run(seed):
        e = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, seed=seed))
        return [o.output_token_ids for o in e.generate(prompts, params)]

    a, b, c = run(123), run(123), run(124)
    assert a == b
    assert a != c


# ------------------------------------------------------------------------------------------------
# logprobs

def test_logprobs_match_full_recompute_log_softmax():
    model = get_model(2)
    rng = random.Random(12)
    prompts = random_prompts(rng, [3, 25, 48, 1])
    engine = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, max_num_batched_tokens=16))
    ks = [5, 0, MAX_LOGPROBS, 3]
    params = [SamplingParams(max_tokens=10, temperature=0, logprobs=ks[0]),
              SamplingParams(max_tokens=10, temperature=0, logprobs=ks[1]),
              SamplingParams(max_tokens=10, temperature=1.0, seed=1, logprobs=ks[2]),
              SamplingParams(max_tokens=10, temperature=0.7, top_k=10, seed=2, logprobs=ks[3])]
    rids, streams = drive(engine, list(zip(prompts, params)), initial=2)
    for rid, prompt, sp, k in zip(rids, prompts, params, ks):
        outs = streams[rid]
        toks = outs[-1].output_token_ids
        ref = full_logprobs(model, prompt, toks)
        for i, o in enumerate(outs):
            (chosen, top), = o.new_logprobs
            tok_id = o.new_token_ids[0]
            # the logprob of the sampled token under the model (not the temperature-scaled one)
            assert chosen == pytest.approx(ref[i, tok_id].item(), abs=1e-5)
            assert len(top) == k
            ids = [t for t, _ in top]
            vals = [v for _, v in top]
            assert len(set(ids)) == k
            assert vals == sorted(vals, reverse=True)
            ref_top = ref[i].topk(k) if k else None
            if k:
                assert ids == ref_top.indices.tolist()
                torch.testing.assert_close(torch.tensor(vals, dtype=torch.float64), ref_top.values,
                                           atol=1e-5, rtol=0)
            if sp.temperature == 0:
                assert tok_id == int(ref[i].argmax())
                if k:
                    assert ids[0] == tok_id and vals[0] == pytest.approx(chosen, abs=1e-6)
    # requests without logprobs get none
    (plain,) = engine.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0))
    assert plain.new_logprobs == []


# ------------------------------------------------------------------------------------------------
# validation

def test_invalid_requests_raise_config_error_and_engine_keeps_working():
    model = get_model()
    n_blocks = 9  # 32 tokens of KV
    engine = Engine(model, None, EngineConfig(kv_budget=budget_for_blocks(model, n_blocks), block_size=BS))
    ok = SamplingParams(max_tokens=4, temperature=0)
    bad = [
        (list(range(MAX_LEN)), ok, "context window"),  # prompt as long as the context window
        ([1] * (MAX_LEN + 5), ok, "context window"),
        ([1, 2, VOCAB], ok, "token ids"),
        ([-1, 2], ok, "token ids"),
        ([1] * 20, SamplingParams(max_tokens=13, temperature=0), "KV cache"),  # 33 > 32 tokens
        ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        ([1, 2], SamplingParams(logprobs=-1), "logprobs"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(top_k=-1), "top_k"),
        ("a text prompt", ok, "tokenizer"),
    ]
    for prompt, sp, words in bad:
        with pytest.raises(ConfigError, match=words):
            engine.add_request(prompt, sp)
        assert_engine_idle(engine)
    # the boundary cases are accepted: 20 + 12 tokens fill the cache, a 127-token prompt fits the window
    rid = engine.add_request([1] * 20, SamplingParams(max_tokens=12, temperature=0), request_id="mine")
    with pytest.raises(ConfigError, match="already in use"):
        engine.add_request([1], ok, request_id="mine")
    assert engine.abort(rid)
    p = random_prompts(random.Random(13), [11])[0]
    (out,) = engine.generate([p], SamplingParams(max_tokens=6, temperature=0))
    assert out.output_token_ids == greedy_reference(model, p, 6)
    assert_engine_idle(engine)


def test_non_integer_token_ids_are_rejected():
    model = get_model()
    engine = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS))
    try:
        with pytest.raises(ConfigError):
            engine.add_request([1.5, 2.0], SamplingParams(max_tokens=2, temperature=0))
    finally:  # whatever happened, the engine must still serve a valid request
        p = [5, 6, 7]
        (out,) = engine.generate([p], SamplingParams(max_tokens=3, temperature=0))
        assert out.output_token_ids == greedy_reference(model, p, 3)


def test_graph_path_does_not_sample_mid_prompt_chunks():
    """With a small token budget a prompt can get a one-token chunk that is not its last while
    every item of the step has one token, so the step takes the CUDA-graph path: only requests
    whose chunk ends their tokens may sample. Off the GPU the graph path runs its static step
    eagerly (staged inputs, padded buckets); outputs equal the packed path's."""
    model = get_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
    params = SamplingParams(max_tokens=4, temperature=0)
    cfg = dict(kv_budget="1MiB", block_size=4, max_num_batched_tokens=2)
    ref = Engine(model, None, EngineConfig(**cfg)).generate(prompts, params)

    eng = Engine(model, None, EngineConfig(**cfg))
    runner = eng.runner
    runner.graph_sizes = [1, 2, 4]  # as on GPU with cuda_graphs
    out = eng.generate(prompts, params)
    assert runner.graphs  # the graph path ran
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]


def test_graph_path_equals_packed_path_for_many_requests():
    """The static decode step (one staged int32 row per request, padded to a bucket, unpacked
    inside the step) gives the packed path's greedy tokens for requests of different lengths
    joining and leaving, including rows whose buckets were last used by longer requests."""
    model = get_model()
    prompts = [[1 + i] * (2 + 3 * i) for i in range(7)]
    params = [SamplingParams(max_tokens=3 + 2 * (i % 4), temperature=0) for i in range(7)]
    cfg = dict(kv_budget="1MiB", block_size=4, max_num_seqs=5)
    ref = Engine(model, None, EngineConfig(**cfg)).generate(prompts, params)
    eng = Engine(model, None, EngineConfig(**cfg))
    eng.runner.graph_sizes = [1, 2, 4, 8]
    eng.warmup()
    assert sorted(eng.runner.graphs) == [1, 2, 4, 8]
    out = eng.generate(prompts, params)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]
    assert [o.output_token_ids for o in out] == [greedy_reference(model, p, sp.max_tokens)
                                                 for p, sp in zip(prompts, params)]


def test_bench_moves_a_staged_row_back_to_an_earlier_context():
    """bench.common.row_at_context: the staged decode row of a request's last step, moved back to
    the step that sees `context` tokens, equals the row the runner stages for that step (position,
    cache slot from the block table, context length), for contexts across block boundaries."""
    import numpy as np

    from bench.common import row_at_context

    eng = Engine(get_model(), None, EngineConfig(kv_budget="1MiB", block_size=BS, max_model_len=40))
    rid = eng.add_request(list(range(1, 3 * BS)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    req = eng.requests[rid]
    eng.step()
    r, meta, last_pos = eng.runner, eng.runner._META, 3 * BS - 2
    width = meta + r.max_blocks
    last = np.zeros((1, width), dtype=np.int32)
    r.stage_rows(last, [(req, last_pos, 5)])
    for context in (1, BS, BS + 1, 2 * BS + 3, last_pos + 1):
        want = np.zeros((1, width), dtype=np.int32)
        r.stage_rows(want, [(req, context - 1, 5)])
        assert row_at_context(torch.from_numpy(last[0]), context, r.block_size, meta).tolist() == want[0].tolist()
    with pytest.raises(ValueError, match=f"context {last_pos + 2}"):
        row_at_context(torch.from_numpy(last[0]), last_pos + 2, r.block_size, meta)


@pytest.mark.parametrize("steps,words", [(0, "decode_steps must be >= 1"), (17, "decode_steps must be <= 16")])
def test_decode_steps_out_of_range_is_a_config_error(steps, words):
    with pytest.raises(ConfigError, match=words):
        Engine(get_model(), None, EngineConfig(kv_budget="1MiB", block_size=BS, decode_steps=steps))
