"""Decoding one step ahead: greedy graph steps are launched before the previous step's tokens are
read. Outputs, finish reasons and KV accounting must equal reading every step, whatever stops
a request (length, a stop token, a stop string, an abort) and whoever arrives meanwhile.

Off the GPU the graph path runs its static step eagerly (runner.graph_sizes set by hand)."""

from __future__ import annotations

import random

import pytest
import torch

from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import SamplingParams

from engine_helpers import (BS, assert_engine_idle, budget_for_blocks, get_model, get_tokenizer, greedy_reference,
                            random_prompts, tok_model)


def _engine(model, tokenizer=None, lookahead: bool = True, steps: int = 1, **kw) -> Engine:
    eng = Engine(model, tokenizer, EngineConfig(block_size=BS, lookahead=lookahead, decode_steps=steps,
                                                **{"kv_budget": "1MiB", "max_num_seqs": 6, **kw}))
    eng.runner.graph_sizes = [1, 2, 4, 8]  # as on GPU with cuda_graphs
    if steps > 1:  # greedy steps chained in one graph on the model path (on a GPU: where the fused step runs)
        eng.runner.steps_fit = eng.runner.graph_fits
    return eng


def _params(rng: random.Random, prompts, model) -> list[SamplingParams]:
    """Mixed limits; a third of the requests stop on a token their greedy output reaches."""
    out = []
    for i, p in enumerate(prompts):
        n = rng.randint(1, 14)
        stop = []
        if i % 3 == 0:
            ref = greedy_reference(model, p, n)
            stop = [ref[len(ref) // 2]]
        out.append(SamplingParams(max_tokens=n, temperature=0, stop_token_ids=stop))
    return out


@pytest.mark.parametrize("steps", [1, 3])  # 3: chained in one graph where every request has room for them
@pytest.mark.parametrize("budget_blocks", [None, 10, 12])  # 10, 12 blocks: preemption between lookahead runs
def test_lookahead_equals_reading_every_step(budget_blocks, steps):
    model = get_model()
    rng = random.Random(0)
    prompts = random_prompts(rng, [rng.randint(1, 20) for _ in range(12)])
    params = _params(rng, prompts, model)
    kw = {} if budget_blocks is None else {"kv_budget": str(budget_for_blocks(model, budget_blocks))}
    ref = _engine(model, lookahead=False, **kw).generate(prompts, params)
    eng = _engine(model, steps=steps, **kw)
    out = eng.generate(prompts, params)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]
    assert [o.finish_reason for o in out] == [o.finish_reason for o in ref]
    if steps == 1 or budget_blocks is None:  # (10 blocks: too few for a chain to find its blocks)
        assert (len(eng.runner.multi_graphs) > 0) == (steps > 1)
    assert {o.finish_reason for o in out} == {"stop", "length"}
    assert eng.lookahead_steps > 0
    if budget_blocks is not None:
        assert eng.scheduler.num_preemptions > 0
    assert_engine_idle(eng)


@pytest.mark.parametrize("steps", [1, 3])
def test_lookahead_with_arrivals_and_aborts(steps):
    """Requests join one per step (the lookahead pauses to admit them) and two are aborted while a
    step is in flight; the others decode exactly their greedy reference."""
    model = get_model()
    rng = random.Random(1)
    prompts = random_prompts(rng, [rng.randint(1, 12) for _ in range(8)])
    params = [SamplingParams(max_tokens=10 + i, temperature=0) for i in range(len(prompts))]
    eng = _engine(model, max_num_seqs=4, steps=steps)
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    final, aborted, later = {}, set(), list(zip(prompts[3:], params[3:]))
    while later or eng.has_unfinished():
        if later:
            rids.append(eng.add_request(*later.pop(0)))
        for out in eng.step():
            assert out.request_id not in final and out.request_id not in aborted
            if out.finished:
                final[out.request_id] = out
        if eng._ahead is not None and len(aborted) < 2:  # a step launched, not yet read
            rid = next((r.id for r in eng._ahead.reqs if r.id in eng.requests), None)
            if rid is not None:
                assert eng.abort(rid)
                aborted.add(rid)
    assert len(aborted) == 2 and eng.lookahead_steps > 0
    for rid, prompt, sp in zip(rids, prompts, params):
        if rid not in aborted:
            assert final[rid].output_token_ids == greedy_reference(model, prompt, sp.max_tokens)
    assert_engine_idle(eng)


@pytest.mark.parametrize("steps", [1, 3])
def test_lookahead_stop_strings_and_text(steps):
    """Text, stop strings and the released deltas are those of reading every step."""
    model, tok = tok_model(), get_tokenizer()
    prompts = ["the quick", "a stitch", "the lazy dog"]
    ref_eng = _engine(model, tok, lookahead=False)
    ref = ref_eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    stops = [o.text[5:8] for o in ref]  # strings the greedy text reaches
    params = [SamplingParams(max_tokens=24, temperature=0, stop=[s]) for s in stops]
    want = _engine(model, tok, lookahead=False).generate(prompts, params)
    eng = _engine(model, tok, steps=steps)
    got = eng.generate(prompts, params)
    assert [(o.text, o.finish_reason, o.output_token_ids) for o in got] == \
        [(o.text, o.finish_reason, o.output_token_ids) for o in want]
    assert all(o.finish_reason == "stop" for o in got) and eng.lookahead_steps > 0
    assert_engine_idle(eng)


@pytest.mark.parametrize("kind", ["draft", "prompt lookup"])
def test_lookahead_above_the_speculative_batch_size(kind):
    """With speculation configured, batches above speculative_max_batch decode one step ahead (the
    draft skips them and catches up later); smaller batches speculate; output equals plain
    decoding."""
    import copy

    model = get_model()
    rng = random.Random(3)
    prompts = [p * 3 for p in random_prompts(rng, [rng.randint(1, 6) for _ in range(8)])]  # repeats to look up
    params = [SamplingParams(max_tokens=rng.randint(4, 24), temperature=0) for _ in prompts]
    ref = _engine(model, lookahead=False).generate(prompts, params)
    kw = dict(num_speculative_tokens=3, speculative_max_batch=2)
    if kind == "prompt lookup":
        eng = _engine(model, prompt_lookup_max=2, **kw)
    else:
        eng = Engine(model, None, EngineConfig(block_size=BS, kv_budget="1MiB", max_num_seqs=6, **kw),
                     draft=copy.deepcopy(model))
        eng.runner.graph_sizes = [1, 2, 4, 8]
    out = eng.generate(prompts, params)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]
    assert eng.lookahead_steps > 0 and eng.spec.stats.proposed > 0
    assert_engine_idle(eng)


def test_tokens_of_the_last_graph_feed_a_step_outside_the_graphs():
    """decode_rows(prev_rows=...) where no graph serves the rows: the last decode graph's greedy
    tokens (rows reordered) are looked up on the device and run through the packed forward, the
    same logits as staging those token ids."""
    model = get_model()
    eng = _engine(model)
    for p in random_prompts(random.Random(5), [5, 9]):
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0))
    while eng._ahead is None:  # a decode graph launched, its tokens not yet read
        eng.step()
    reqs = eng._ahead.reqs
    toks = eng._ahead.host[0, :len(reqs)].tolist()
    rows = [(r, r.num_computed, None) for r in reversed(reqs)]
    eng.runner.graph_sizes = [1]  # no graph for two rows: the packed forward
    got = eng.runner.decode_rows(rows, prev_rows=[1, 0])
    want = eng.runner.forward_chunks([(r, p, [t]) for (r, p, _), t in zip(rows, reversed(toks))])
    assert torch.equal(got, want)


def test_a_chain_without_blocks_decodes_one_step_ahead():
    """When the blocks a chain of steps needs are not free, the engine still decodes one step ahead
    where the request's last block has room for it."""
    model = get_model()
    eng = _engine(model, steps=4)
    eng.add_request(random_prompts(random.Random(0), [2])[0], SamplingParams(max_tokens=20, temperature=0,
                                                                             ignore_eos=True))
    while eng._ahead is None:
        eng.step()
    r = eng._ahead.reqs[0]
    assert len(r.blocks) * BS > r.num_computed  # room for one more position, not for four
    eng.kv.allocator.allocate(eng.kv.allocator.num_free)  # the cache is full
    eng.step()
    assert eng._ahead is not None and eng._ahead.host.shape[0] == 1
