"""Shared pieces of the engine tests: tiny float64 models, a tokenizer, and the independent
reference (greedy decoding by full recompute, no KV cache)."""

from __future__ import annotations

import functools
import random
import weakref

import torch

from moekit.config import ModelConfig
from moekit.data.tokenizer import train_tokenizer
from moekit.infer.engine import Engine
from moekit.infer.kv_cache import kv_bytes_per_token
from moekit.model.transformer import Transformer, build_model

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
