"""The inference engine (continuous batching over a paged KV cache) against independent references.

- greedy outputs against a plain full-recompute loop written here (the whole sequence through the
  model every step, argmax of the last logits, no cache), under chunked prefill, preemption and
  queueing, for MQA and GQA;
- logprobs against log_softmax of full-recompute logits;
- block accounting (allocated blocks go back to zero) under 1,000 requests with random aborts;
- seeded sampling reproducibility; stop tokens / eos / stop strings / max_tokens;
- the CUDA-graph row bookkeeping of one-token steps.
(KV sizing and the paged decode reference: test_kv_cache.py; the asyncio front: test_async_engine.py.)

The models are tiny, random and run in float64: an argmax is then never decided by rounding (the
smallest top-1/top-2 logit gap the reference saw is checked against the float64 noise level).
"""

from __future__ import annotations

import copy
import functools
import random
import weakref

import pytest
import torch
import torch.nn as nn

from moekit.config import ModelConfig
from moekit.data.tokenizer import train_tokenizer
from moekit.errors import ConfigError
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.kv_cache import kv_bytes_per_token
from moekit.infer.sampling import MAX_LOGPROBS, SamplingParams
from moekit.model.transformer import ModelOutput, Transformer, build_model

VOCAB = 128
MAX_LEN = 128
BS = 4  # KV block size in every engine here


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, n_experts=4,
                top_k=2, max_seq_len=MAX_LEN, init_std=0.3)
    base.update(kw)
    return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def get_model(n_kv_heads: int = 1, vocab: int = VOCAB, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = build_model(model_cfg(n_kv_heads=n_kv_heads, vocab_size=vocab))
    model.init_weights(seed=seed)
    return model.to(torch.float64).eval()


TEXTS = ["the quick brown fox jumps over the lazy dog.", "a stitch in time saves nine.",
         "hello world, hello moekit!", "to be or not to be, that is the question.",
         "all that glitters is not gold.", "the early bird catches the worm."]


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    return train_tokenizer(TEXTS, 300)


def tok_model() -> Transformer:
    return get_model(vocab=get_tokenizer().vocab_size, seed=1)


# ------------------------------------------------------------------------------------------------
# the independent reference: full recompute, no KV cache

_GREEDY_MEMO: "weakref.WeakKeyDictionary[Transformer, dict]" = weakref.WeakKeyDictionary()


def _memo(model) -> dict:
    return _GREEDY_MEMO.setdefault(model, {})


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the model on the full sequence each step (no cache).
    Memoised per (model, prompt); a shorter request reuses a prefix of a longer run."""
    memo = _memo(model)
    toks = memo.get(tuple(prompt), [])
    seq = list(prompt) + toks
    while len(toks) < n and len(seq) < model.cfg.max_seq_len:
        last = model(torch.tensor([seq])).logits[0, -1]
        top2 = last.topk(2).values
        # the comparison with the engine is not decided by rounding (float64 noise is ~1e-15)
        assert (top2[0] - top2[1]).item() > 1e-9
        t = int(last.argmax())
        toks.append(t)
        seq.append(t)
    memo[tuple(prompt)] = toks
    return toks[:n]


@torch.no_grad()
def full_logprobs(model: Transformer, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the logits that predicted each output token: [len(output), vocab], float64.
    One full forward of the whole sequence (no cache); causality makes row i the prefix's."""
    seq = torch.tensor([list(prompt) + list(output)])
    logits = model(seq).logits[0].double()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(output)].log_softmax(-1)


def random_prompts(rng: random.Random, lengths: list[int], vocab: int = VOCAB) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def budget_for_blocks(model: Transformer, n_blocks: int, block_size: int = BS) -> int:
    return n_blocks * block_size * kv_bytes_per_token(model.cfg, torch.float64)


def drive(engine: Engine, requests: list[tuple], initial: int | None = None, on_step=None,
          max_steps: int = 20000) -> tuple[list[str], dict]:
    """Adds `initial` requests, then one more before each step; steps until all finish.
    Checks the streaming contract on every output; returns (request ids, outputs per id)."""
    todo = list(requests)
    initial = len(todo) if initial is None else initial
    rids = [engine.add_request(*r) for r in todo[:initial]]
    todo = todo[initial:]
    streams: dict[str, list] = {}
    steps = 0
    while todo or engine.has_unfinished():
        if todo:
            rids.append(engine.add_request(*todo.pop(0)))
        outs = engine.step()
        steps += 1
        assert steps <= max_steps
        if on_step is not None:
            on_step(engine)
        for out in outs:
            s = streams.setdefault(out.request_id, [])
            assert not (s and s[-1].finished), "output after the request finished"
            prev = s[-1].output_token_ids if s else []
            assert len(out.new_token_ids) == 1
            assert out.output_token_ids == prev + out.new_token_ids
            s.append(out)
    for rid in rids:
        assert streams[rid][-1].finished
    return rids, streams


def assert_engine_idle(engine: Engine) -> None:
    st = engine.stats()
    assert engine.kv.allocator.num_used == 0 and st["kv_blocks_used"] == 0
    assert st["running"] == 0 and st["waiting"] == 0
    assert not engine.has_unfinished() and not engine.requests


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
# finishing: stop tokens, max_tokens, eos, stop strings

def test_stop_token_ids_and_max_tokens():
    model = get_model()
    rng = random.Random(9)
    prompts = random_prompts(rng, [5, 17, 33])
    engine = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS))
    reqs, expected = [], []
    for p in prompts:
        ref = greedy_reference(model, p, 20)
        j = next(i for i in range(2, 20) if ref[i] not in ref[:i])  # first occurrence at j
        reqs.append((p, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[ref[j]])))
        expected.append((ref[:j + 1], "stop"))
        # an unrelated id that never shows up does not stop anything
        absent = next(t for t in range(VOCAB) if t not in ref)
        reqs.append((p, SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[absent])))
        expected.append((ref[:7], "length"))
        # two stop ids: whichever comes first
        k = next((i for i in range(j + 1, 20) if ref[i] not in ref[:i]), None)
        if k is not None:
            reqs.append((p, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[ref[k], ref[j]])))
            expected.append((ref[:j + 1], "stop"))
    rids, streams = drive(engine, reqs, initial=2)
    for rid, (toks, reason) in zip(rids, expected):
        final = streams[rid][-1]
        assert final.output_token_ids == toks and final.finish_reason == reason
        assert all(not o.finished for o in streams[rid][:-1])
    assert_engine_idle(engine)


def test_eos_stops_unless_ignore_eos():
    tok = get_tokenizer()
    base = tok_model()
    text = "the quick brown"
    prompt = tok.encode(text)
    ref = greedy_reference(base, prompt, 16)
    j = next(i for i in range(1, 16) if ref[i] not in ref[:i])
    assert tok.eot_id not in ref
    # make the model say <|endoftext|> where it said ref[j]: swap the two lm_head rows
    model = copy.deepcopy(base)
    with torch.no_grad():
        w = model.lm_head.weight
        w[[ref[j], tok.eot_id]] = w[[tok.eot_id, ref[j]]].clone()
    ref2 = greedy_reference(model, prompt, 16)  # the independent check that it now emits eot
    assert tok.eot_id in ref2
    k = ref2.index(tok.eot_id)
    assert k >= 1
    engine = Engine(model, tok, EngineConfig(kv_budget="1MiB", block_size=BS))
    stop, ignore = engine.generate([text, text], [SamplingParams(max_tokens=16, temperature=0),
                                                  SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)])
    assert stop.output_token_ids == ref2[:k + 1] and stop.finish_reason == "stop"
    assert stop.text == tok.decode(ref2[:k]) and "<|endoftext|>" not in stop.text
    assert ignore.output_token_ids == ref2[:16] and ignore.finish_reason == "length"
    # a stop token id ends the text without being part of it, like eos
    (s,) = engine.generate([text], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[ref2[1]]))
    assert s.output_token_ids == ref2[:2] and s.text == tok.decode(ref2[:1]) and s.finish_reason == "stop"
    assert_engine_idle(engine)


def _ascii_windows(text: str, length: int) -> list[tuple[int, str]]:
    return [(i, text[i:i + length]) for i in range(len(text) - length + 1)
            if all(32 <= ord(c) < 127 for c in text[i:i + length])]


def check_text_stream(outs: list, final_text: str, stops: list[str]) -> None:
    released = ""
    for o in outs:
        released += o.delta
        assert o.text == released  # text is everything released so far
        assert final_text.startswith(o.text)
        assert not any(s in o.text for s in stops)
    assert released == final_text == outs[-1].text


def test_stop_strings_with_a_real_model():
    tok = get_tokenizer()
    model = tok_model()
    rng = random.Random(10)
    engine = Engine(model, tok, EngineConfig(kv_budget="1MiB", block_size=BS))
    reqs, cases = [], []
    for text in ["the quick", "hello", "to be or", "all that", "a stitch"]:
        ids = tok.encode(text)
        ref = greedy_reference(model, ids, 24)
        full = tok.decode(ref)
        options = [w for L in (1, 2, 3) for w in _ascii_windows(full, L) if w[0] >= 1]
        assert options
        stop_sets = [[rng.choice(options)[1]], [rng.choice(options)[1], rng.choice(options)[1], "\x7f\x7f\x7f"]]
        windows0 = _ascii_windows(full, 2)
        if windows0 and windows0[0][0] == 0:
            stop_sets.append([windows0[0][1]])  # matches right at the start: empty text
        stop_sets.append(["\x7f\x7f\x7f never"])  # never matches
        for stops in stop_sets:
            reqs.append((text, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stops)))
            # independent expectation: the first prefix of the reference whose text holds a stop
            # string; the text is cut at the earliest stop string in it
            m = next((m for m in range(1, 25) if any(s in tok.decode(ref[:m]) for s in stops)), None)
            if m is None:
                cases.append((stops, ref, full, "length"))
            else:
                t = tok.decode(ref[:m])
                cut = min(t.find(s) for s in stops if s in t)
                cases.append((stops, ref[:m], t[:cut], "stop"))
    rids, streams = drive(engine, reqs, initial=4)
    assert sum(c[3] == "stop" for c in cases) >= 8
    for rid, (stops, toks, text, reason) in zip(rids, cases):
        outs = streams[rid]
        assert outs[-1].output_token_ids == toks and outs[-1].finish_reason == reason
        check_text_stream(outs, text, stops)
    assert_engine_idle(engine)


class ScriptedModel(nn.Module):
    """Stands in for a Transformer so a test controls the exact token stream: whatever the input,
    the token predicted at absolute position p is script[p + 1 - prompt_len] (then `filler`)."""

    def __init__(self, cfg: ModelConfig, prompt_len: int, script: list[int], filler: int):
        super().__init__()
        self.cfg = cfg
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompt_len, self.script, self.filler = prompt_len, script, filler

    def forward(self, idx, caches=None, positions=None, logits_at=None):
        pos = positions[0] if logits_at is None else positions[0, logits_at]
        nxt = [int(p) + 1 - self.prompt_len for p in pos]
        toks = [self.script[i] if 0 <= i < len(self.script) else self.filler for i in nxt]
        logits = torch.full((1, len(toks), self.cfg.vocab_size), -10.0)
        logits[0, torch.arange(len(toks)), torch.tensor(toks)] = 10.0
        return ModelOutput(logits=logits)


def scripted_engine(continuation: str, prompt: str = "hello"):
    tok = get_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8,
                      n_experts=1, top_k=1, max_seq_len=MAX_LEN)
    script = tok.encode(continuation)
    model = ScriptedModel(cfg, len(tok.encode(prompt)), script, filler=tok.encode("z")[0])
    return Engine(model, tok, EngineConfig(kv_budget="64KiB", block_size=BS)), tok, script


@pytest.mark.parametrize("continuation,stops,expected", [
    ("ab cd ef gh", ["cd"], "ab "),
    ("ab cd ef gh", ["xx", "d e", "f"], "ab c"),
    ("ab cd ef gh", [" ef g"], "ab cd"),
    ("caf\u00e9 na\u00efve \u20ac5 ok", ["ok"], "caf\u00e9 na\u00efve \u20ac5 "),
    ("emoji \U0001F600 then text", [" text"], "emoji \U0001F600 then"),
    ("\u20ac\u20ac\u20ac and more", ["nd"], "\u20ac\u20ac\u20ac a"),
    ("nothing stops this", ["zz"], None),
])
def test_stop_strings_and_deltas_with_multibyte_text(continuation, stops, expected):
    engine, tok, script = scripted_engine(continuation)
    assert len(script) > len(continuation.split())  # multi-byte characters span several tokens
    outs = []
    rid = engine.add_request("hello", SamplingParams(max_tokens=len(script), stop=stops))
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    if expected is None:
        assert outs[-1].finish_reason == "length" and outs[-1].text == continuation
        expected = continuation
    else:
        assert outs[-1].finish_reason == "stop"
    check_text_stream(outs, expected, stops)
    assert not any("\ufffd" in o.text for o in outs)  # half characters are never released
    assert_engine_idle(engine)


def test_stop_string_ending_in_a_split_multibyte_character():
    engine, tok, script = scripted_engine("ab\u20accd")  # the euro sign is 3 byte tokens
    stops = ["b\u20ac"]
    rid = engine.add_request("hello", SamplingParams(max_tokens=len(script), stop=stops))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[-1].finish_reason == "stop" and outs[-1].text == "a"
    check_text_stream(outs, "a", stops)  # fails: the deltas add up to "ab"


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


def test_incremental_detokenizer_equals_full_decode():
    """Random ids (byte pieces of multi-byte characters included) decoded step by step equal
    decoding the whole list at every step, also when the engine asks again for the text before a
    stop token."""
    from moekit.infer.engine import Detokenizer

    tok = get_tokenizer()
    g = torch.Generator().manual_seed(5)
    vocab = tok.vocab_size
    text = "naïve café — 東京 🙂 " * 3
    for trial in range(20):
        ids = tok.encode(text)[trial:] if trial % 2 else torch.randint(0, vocab, (60,), generator=g).tolist()
        det = Detokenizer(tok)
        for n in range(1, len(ids) + 1):
            if n % 7 == 0:  # a stop token arrives: the text of the ids before it, asked again
                assert det.text(ids[:n - 1]) == tok.decode(ids[:n - 1])
            assert det.text(ids[:n]) == tok.decode(ids[:n])
