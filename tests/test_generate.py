"""Sampling and generation: temperature/top-k/top-p against a numpy reference, seeded
reproducibility, KV-cache generation against a no-cache greedy loop, stop tokens and the context
limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.infer.generate import generate, sample_next
from moekit.model.transformer import Transformer


def tiny_model(seed: int = 0, **kw) -> Transformer:
    cfg = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, n_experts=4,
               top_k=2, max_seq_len=64, init_std=0.3)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg))
    model.init_weights(seed=seed)
    return model.eval()


def draws(logits_row: torch.Tensor, n: int, seed: int = 0, **kw) -> np.ndarray:
    """n independent samples from one logits row (the row repeated n times in a batch)."""
    g = torch.Generator().manual_seed(seed)
    return sample_next(logits_row[None].expand(n, -1).clone(), generator=g, **kw).numpy()


def top_p_set_reference(probs: np.ndarray, p: float) -> set[int]:
    """The smallest set of most likely tokens whose total probability is >= p."""
    order = np.argsort(-probs, kind="stable")
    total, keep = 0.0, []
    for i in order:
        keep.append(int(i))
        total += probs[i]
        if total >= p:
            break
    return set(keep)


# ------------------------------------------------------------------------------------------------
# sample_next

def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 100) * 3
    np.testing.assert_array_equal(sample_next(logits, temperature=0).numpy(), logits.numpy().argmax(-1))
    # top-k / top-p do not matter when greedy
    np.testing.assert_array_equal(sample_next(logits, temperature=0, top_k=5, top_p=0.1).numpy(),
                                  logits.numpy().argmax(-1))


def test_plain_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    for temperature in (1.0, 0.5, 2.0):
        x = draws(logits, 40000, seed=1, temperature=temperature)
        freq = np.bincount(x, minlength=5) / len(x)
        z = logits.double().numpy() / temperature
        ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(freq, ref, atol=0.01)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_samples_outside_the_k_largest(k):
    torch.manual_seed(k)
    logits = torch.randn(50) * 0.5  # flat enough that tokens outside top-k would show up
    allowed = set(np.argsort(-logits.numpy())[:k].tolist())
    x = draws(logits, 20000, seed=2, top_k=k)
    assert set(x.tolist()) == allowed  # nothing outside, and every kept token is reachable
    # renormalised softmax over the kept tokens
    ids = sorted(allowed)
    z = logits.double().numpy()[ids]
    ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    freq = np.array([(x == i).mean() for i in ids])
    np.testing.assert_allclose(freq, ref, atol=0.015)
    # k larger than the vocabulary is the whole vocabulary
    assert sample_next(logits[None], top_k=1000, generator=torch.Generator().manual_seed(0)).shape == (1,)


def test_top_p_fixed_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    for p, expected in [(0.8, {0, 1}), (0.75, {0, 1}), (0.5, {0}), (0.4, {0}), (0.9, {0, 1, 2}),
                        (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        assert top_p_set_reference(probs, p) == expected  # the reference agrees with the definition
        x = draws(logits, 20000, seed=3, top_p=p)
        assert set(x.tolist()) == expected, p
        ids = sorted(expected)
        freq = np.array([(x == i).mean() for i in ids])
        np.testing.assert_allclose(freq, probs[ids] / probs[ids].sum(), atol=0.015)


def test_top_p_random_distributions_match_numpy_reference():
    rng = np.random.default_rng(0)
    for trial in range(20):
        V = int(rng.integers(3, 12))
        logits = torch.tensor(rng.normal(size=V) * 1.5, dtype=torch.float32)
        probs = torch.softmax(logits.double(), -1).numpy()
        cum = np.cumsum(np.sort(probs)[::-1])
        # a p well away from every cumulative mass, so float32 rounding cannot move the cut
        while True:
            p = float(rng.uniform(0.05, 0.99))
            if np.min(np.abs(cum - p)) > 1e-4:
                break
        expected = top_p_set_reference(probs, p)
        x = draws(logits, 4000, seed=trial, top_p=p)
        assert set(x.tolist()) <= expected, (trial, p)
        # every kept token with non-negligible mass does appear
        assert {i for i in expected if probs[i] / probs[list(expected)].sum() > 0.01} <= set(x.tolist())


def test_top_k_and_top_p_combined():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    # top_k=2 leaves [0.4, 0.3] -> renormalised [4/7, 3/7]; top_p=0.5 then keeps only token 0
    assert set(draws(logits, 5000, seed=4, top_k=2, top_p=0.5).tolist()) == {0}
    assert set(draws(logits, 5000, seed=4, top_k=3, top_p=0.95).tolist()) == {0, 1, 2}


def test_same_seed_same_samples_different_seed_different():
    torch.manual_seed(0)
    logits = torch.randn(8, 200)
    kw = dict(temperature=0.9, top_k=50, top_p=0.9)
    a = sample_next(logits, generator=torch.Generator().manual_seed(7), **kw)
    b = sample_next(logits, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)
    many = [sample_next(logits, generator=torch.Generator().manual_seed(s), **kw) for s in range(5)]
    assert any(not torch.equal(many[0], m) for m in many[1:])


# ------------------------------------------------------------------------------------------------
# generate

def greedy_no_cache(model: Transformer, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Full forward on the growing sequence, argmax of the last position; also the smallest
    top-1/top-2 logit gap seen (to show the comparison is not decided by rounding)."""
    seq, gap = prompt.clone(), float("inf")
    with torch.no_grad():
        for _ in range(n):
            last = model(seq).logits[:, -1]
            top2 = last.topk(2, -1).values
            gap = min(gap, (top2[:, 0] - top2[:, 1]).min().item())
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq, gap


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_kv_cache_generation_equals_no_cache_greedy(impl):
    model = tiny_model(seed=1, expert_impl=impl)
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (2, 7))
    n = 30
    ref, gap = greedy_no_cache(model, prompt, n)
    assert gap > 1e-4
    out = generate(model, prompt, n, temperature=0)
    assert out.shape == (2, 7 + n)
    assert torch.equal(out[:, :7], prompt)
    assert torch.equal(out, ref)
    assert not torch.equal(out[0, 7:], out[1, 7:])  # the two rows really are different sequences


def test_sampled_generation_is_seeded_and_in_vocab():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 512, (2, 4), generator=torch.Generator().manual_seed(0))
    a = generate(model, prompt, 20, temperature=1.0, top_k=40, seed=11)
    b = generate(model, prompt, 20, temperature=1.0, top_k=40, seed=11)
    c = generate(model, prompt, 20, temperature=1.0, top_k=40, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 24) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 512


def test_stop_token_stops_generation():
    model = tiny_model(seed=3)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    ref, _ = greedy_no_cache(model, prompt, 20)
    new = ref[0, 5:].tolist()
    j = next(i for i in range(2, len(new)) if new[i] not in new[:i])  # a token first produced at step j
    stop = new[j]
    out = generate(model, prompt, 20, temperature=0, stop_token=stop)
    assert out.shape == (1, 5 + j + 1)
    assert torch.equal(out, ref[:, :5 + j + 1])
    assert out[0, -1].item() == stop


def test_stop_token_batch_pads_finished_rows():
    model = tiny_model(seed=4)
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    n = 20
    ref, _ = greedy_no_cache(model, prompt, n)
    rows = [ref[r, 5:].tolist() for r in range(2)]
    shared = sorted(set(rows[0]) & set(rows[1]), key=lambda t: max(rows[0].index(t), rows[1].index(t)))
    only0 = [t for t in rows[0] if t not in rows[1]]
    assert shared and only0
    # a token both rows reach (generation stops early) and one only row 0 reaches (runs to the end)
    for stop in (shared[0], only0[0]):
        firsts = [row.index(stop) if stop in row else None for row in rows]
        end = n if None in firsts else max(firsts) + 1
        out = generate(model, prompt, n, temperature=0, stop_token=stop)
        assert out.shape == (2, 5 + end)
        for r, first in enumerate(firsts):
            got = out[r, 5:].tolist()
            if first is None:
                assert got == rows[r][:end]
            else:
                # identical to greedy up to the stop token, then only stop tokens
                assert got[:first + 1] == rows[r][:first + 1]
                assert all(t == stop for t in got[first:])
    assert max(rows[0].index(shared[0]), rows[1].index(shared[0])) + 1 < n  # the early stop happened


def test_output_never_exceeds_max_seq_len():
    model = tiny_model(seed=5, max_seq_len=16)
    for T in (1, 10, 13, 15):
        prompt = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(T))
        out = generate(model, prompt, 100, temperature=0)
        assert out.shape == (2, 16)
        assert torch.equal(out[:, :T], prompt)
        ref, _ = greedy_no_cache(model, prompt, 16 - T)
        assert torch.equal(out, ref)
    assert generate(model, torch.zeros(1, 4, dtype=torch.long), 3, temperature=0).shape == (1, 7)


@pytest.mark.parametrize("T", [16, 17, 40])
def test_prompt_filling_the_context_is_a_config_error(T):
    model = tiny_model(seed=6, max_seq_len=16)
    with pytest.raises(ConfigError, match="context"):
        generate(model, torch.zeros(1, T, dtype=torch.long), 5)
