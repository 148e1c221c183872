"""How the engine ends requests and releases text: stop token ids, eos, max_tokens, stop strings
(with multi-byte characters split across tokens), and incremental detokenization, against
independent references (full-recompute greedy decoding, full decoding of the ids)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn

from moekit.config import ModelConfig
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import SamplingParams
from moekit.model.transformer import ModelOutput
from tests.engine_helpers import (
    BS,
    MAX_LEN,
    VOCAB,
    assert_engine_idle,
    drive,
    get_model,
    get_tokenizer,
    greedy_reference,
    random_prompts,
    tok_model,
)

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
