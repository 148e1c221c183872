"""Transformer-level behaviour: causality, KV-cache decoding, MQA/GQA, RoPE, dense fallback.

Every check compares against an independent reference (a perturbed input, a full forward, a
hand-built module, or a closed form computed here in float64), never against stored outputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import ModelConfig
from moekit.model.attention import Attention, KVCache
from moekit.model.layers import SwiGLU, apply_rope, rope_frequencies
from moekit.model.moe import Experts, MoELayer, Router
from moekit.model.transformer import Transformer


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32,
                n_experts=4, top_k=2, capacity_factor=0.0, max_seq_len=32, init_std=0.1,
                expert_impl="loop")
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# 1. Causality and KV-cache decoding

@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_future_tokens_do_not_change_past_logits(impl):
    model = build(tiny_cfg(expert_impl=impl))
    torch.manual_seed(1)
    B, T, V = 2, 12, model.cfg.vocab_size
    idx = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref = model(idx).logits
        for t in range(T - 1):
            other = idx.clone()
            # every token after t is replaced by a different token
            other[:, t + 1:] = (idx[:, t + 1:] + torch.randint(1, V, (B, T - t - 1))) % V
            assert (other[:, t + 1:] != idx[:, t + 1:]).all()
            got = model(other).logits
            torch.testing.assert_close(got[:, :t + 1], ref[:, :t + 1], rtol=1e-5, atol=1e-5)
            # sanity: the perturbation is visible where it is allowed to be
            assert (got[:, t + 1] - ref[:, t + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_past_logits_have_zero_gradient_wrt_future_embeddings(impl):
    model = build(tiny_cfg(expert_impl=impl))
    torch.manual_seed(2)
    B, T = 2, 10
    idx = torch.randint(0, model.cfg.vocab_size, (B, T))
    saved = {}

    def keep_embedding(_module, _inp, out):
        out.retain_grad()
        saved["emb"] = out

    handle = model.embed.register_forward_hook(keep_embedding)
    try:
        for t in (0, 3, T - 2):
            model.zero_grad(set_to_none=True)
            logits = model(idx).logits
            logits[:, t].pow(2).sum().backward()
            g = saved["emb"].grad  # [B, T, d]
            assert torch.count_nonzero(g[:, t + 1:]) == 0, f"position {t} depends on later tokens"
            assert g[:, :t + 1].abs().sum() > 0
    finally:
        handle.remove()


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_one_token_at_a_time_matches_full_forward(n_kv_heads):
    model = build(tiny_cfg(n_kv_heads=n_kv_heads))
    torch.manual_seed(3)
    B, T = 2, 11
    idx = torch.randint(0, model.cfg.vocab_size, (B, T))
    with torch.no_grad():
        full = model(idx).logits
        caches = model.new_caches(B)
        assert len(caches) == model.cfg.n_layers
        assert all(c.k.dtype == torch.float32 for c in caches)
        steps = [model(idx[:, t:t + 1], caches=caches).logits for t in range(T)]
    assert all(c.pos == T for c in caches)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_kv_cache_prefill_then_chunks_and_single_tokens(n_kv_heads):
    model = build(tiny_cfg(n_kv_heads=n_kv_heads))
    torch.manual_seed(4)
    B, T = 2, 13
    idx = torch.randint(0, model.cfg.vocab_size, (B, T))
    with torch.no_grad():
        full = model(idx).logits
        caches = model.new_caches(B, max_len=16)
        pieces = [model(idx[:, :5], caches=caches).logits]  # prefill (start == 0)
        pieces.append(model(idx[:, 5:8], caches=caches).logits)  # a chunk with start > 0
        pieces += [model(idx[:, t:t + 1], caches=caches).logits for t in range(8, T)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_raises():
    cache = KVCache(1, 1, 4, 8)
    cache.update(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8))
    with pytest.raises(ValueError):
        cache.update(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))


def test_loss_is_cross_entropy_plus_weighted_aux_losses():
    model = build(tiny_cfg(balance_loss_coef=0.3, z_loss_coef=0.05))
    torch.manual_seed(5)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9))
    targets = torch.randint(0, model.cfg.vocab_size, (2, 9))
    targets[0, :3] = -100
    with torch.no_grad():
        out = model(idx, targets)
    logp = out.logits.double().log_softmax(-1)
    nll = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(9) if targets[b, t] != -100]
    ce = torch.stack(nll).mean()
    torch.testing.assert_close(out.ce_loss.double(), ce, rtol=1e-5, atol=1e-6)
    assert len(out.router_stats) == model.cfg.n_layers
    bal = torch.stack([s.balance_loss for s in out.router_stats]).mean()
    z = torch.stack([s.z_loss for s in out.router_stats]).mean()
    torch.testing.assert_close(out.loss, out.ce_loss + 0.3 * bal + 0.05 * z)


# ------------------------------------------------------------------------------------------------
# 6. MQA / GQA equal MHA with repeated K/V weights

def _reference_attention(x, wq, wk, wv, wo, n_heads, hd, cos, sin):
    """float64 causal MHA with explicit per-head softmax; wk/wv already have n_heads heads."""
    x, wq, wk, wv, wo = (t.double() for t in (x, wq, wk, wv, wo))
    B, T, _ = x.shape
    q = (x @ wq.T).view(B, T, n_heads, hd).transpose(1, 2)
    k = (x @ wk.T).view(B, T, n_heads, hd).transpose(1, 2)
    v = (x @ wv.T).view(B, T, n_heads, hd).transpose(1, 2)
    cos, sin = cos.double(), sin.double()

    def rot(t):
        h = hd // 2
        return torch.cat([t[..., :h] * cos[:, :h] - t[..., h:] * sin[:, :h],
                          t[..., h:] * cos[:, h:] + t[..., :h] * sin[:, h:]], -1)

    q, k = rot(q), rot(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, n_heads * hd) @ wo.T


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_weights(n_kv_heads):
    n_heads, d, T = 4, 32, 9
    cfg = tiny_cfg(n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d)
    mha_cfg = tiny_cfg(n_heads=n_heads, n_kv_heads=n_heads, d_model=d)
    hd, group = cfg.hd, n_heads // n_kv_heads
    torch.manual_seed(6)
    gqa = Attention(cfg)
    mha = Attention(mha_cfg)
    assert gqa.wk.weight.shape == (n_kv_heads * hd, d)

    def repeat(w):  # [n_kv * hd, d] -> [n_heads * hd, d], head h uses kv head h // group
        heads = w.view(n_kv_heads, hd, d)
        return torch.cat([heads[h // group] for h in range(n_heads)], 0)

    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        mha.wk.weight.copy_(repeat(gqa.wk.weight))
        mha.wv.weight.copy_(repeat(gqa.wv.weight))
    cos, sin = rope_frequencies(hd, T)
    x = torch.randn(2, T, d)
    with torch.no_grad():
        y_gqa, y_mha = gqa(x, cos, sin), mha(x, cos, sin)
        ref = _reference_attention(x, mha.wq.weight, mha.wk.weight, mha.wv.weight, mha.wo.weight,
                                   n_heads, hd, cos, sin)
    torch.testing.assert_close(y_gqa, y_mha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_gqa.double(), ref, rtol=1e-5, atol=1e-6)

    # the cached (masked) path agrees too: prefill 4, then one token at a time
    with torch.no_grad():
        cache = KVCache(2, n_kv_heads, T, hd)
        parts = [gqa(x[:, :4], cos[:4], sin[:4], cache)]
        parts += [gqa(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache) for t in range(4, T)]
    torch.testing.assert_close(torch.cat(parts, 1), y_mha, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 8. RoPE

def _textbook_angle(pos: float, i: int, hd: int, theta: float) -> float:
    """Angle of rotary pair i at (possibly fractional) position pos: pos * theta^(-2i/hd)."""
    return pos * theta ** (-2.0 * i / hd)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_tables_match_textbook_formula(theta):
    hd, L = 16, 24
    cos, sin = rope_frequencies(hd, L, theta=theta)
    assert cos.shape == sin.shape == (L, hd)
    exp_cos = torch.empty(L, hd, dtype=torch.float64)
    exp_sin = torch.empty(L, hd, dtype=torch.float64)
    for p in range(L):
        for i in range(hd // 2):
            a = _textbook_angle(p, i, hd, theta)
            # rotate-half layout: pair i is (i, i + hd/2)
            exp_cos[p, i] = exp_cos[p, i + hd // 2] = math.cos(a)
            exp_sin[p, i] = exp_sin[p, i + hd // 2] = math.sin(a)
    torch.testing.assert_close(cos.double(), exp_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), exp_sin, rtol=0, atol=1e-6)


def test_apply_rope_rotates_each_pair_by_its_angle():
    hd, L, theta = 8, 10, 10000.0
    cos, sin = rope_frequencies(hd, L, theta=theta)
    torch.manual_seed(7)
    x = torch.randn(2, 3, L, hd)
    got = apply_rope(x, cos, sin).double()
    exp = torch.empty_like(got)
    h = hd // 2
    for p in range(L):
        for i in range(h):
            a = _textbook_angle(p, i, hd, theta)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[:, :, p, i].double(), x[:, :, p, i + h].double()
            exp[:, :, p, i] = x1 * c - x2 * s
            exp[:, :, p, i + h] = x2 * c + x1 * s
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    hd, L = 16, 20
    cos, sin = rope_frequencies(hd, L)
    torch.manual_seed(8)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(pq, pk):
        rq = apply_rope(q.view(1, 1, 1, hd), cos[pq:pq + 1], sin[pq:pq + 1]).flatten()
        rk = apply_rope(k.view(1, 1, 1, hd), cos[pk:pk + 1], sin[pk:pk + 1]).flatten()
        return (rq.double() @ rk.double()).item()

    for delta in (0, 1, 5):
        vals = [score(p + delta, p) for p in range(0, L - delta, 3)]
        assert max(vals) - min(vals) < 1e-4 * max(1.0, abs(vals[0]))


@pytest.mark.parametrize("scaling", [2.0, 4.0, 2.5])
def test_rope_scaling_reads_position_p_as_p_over_s(scaling):
    hd, L, theta = 16, 32, 10000.0
    cos, sin = rope_frequencies(hd, L, theta=theta, scaling=scaling)
    for p in range(L):
        for i in range(hd // 2):
            a = _textbook_angle(p / scaling, i, hd, theta)
            assert abs(cos[p, i].item() - math.cos(a)) < 1e-6
            assert abs(sin[p, i + hd // 2].item() - math.sin(a)) < 1e-6
    if float(scaling).is_integer():
        s = int(scaling)
        cos1, sin1 = rope_frequencies(hd, L, theta=theta)
        torch.testing.assert_close(cos[::s], cos1[:len(cos[::s])], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[::s], sin1[:len(sin[::s])], rtol=0, atol=1e-6)


def test_transformer_uses_scaled_rope_tables():
    cfg = tiny_cfg(rope_scaling=3.0, rope_theta=1000.0, max_seq_len=16)
    model = build(cfg)
    hd = cfg.hd
    for p in (0, 1, 7, 15):
        for i in range(hd // 2):
            a = _textbook_angle(p / 3.0, i, hd, 1000.0)
            assert abs(model.rope_cos[p, i].item() - math.cos(a)) < 1e-6
            assert abs(model.rope_sin[p, i].item() - math.sin(a)) < 1e-6


# ------------------------------------------------------------------------------------------------
# 7. n_experts = 1 is a plain dense model

def test_dense_transformer_has_no_router_or_moe_modules():
    cfg = tiny_cfg(n_experts=1, top_k=1, dense_ffn_dim=24)
    model = build(cfg)
    kinds = {type(m) for m in model.modules()}
    assert Router not in kinds and MoELayer not in kinds and Experts not in kinds
    assert all(isinstance(b.ffn, SwiGLU) and not b.is_moe for b in model.blocks)
    assert all(b.ffn.w1.weight.shape == (24, cfg.d_model) for b in model.blocks)
    idx = torch.randint(0, cfg.vocab_size, (1, 6))
    out = model(idx, idx)
    assert out.router_stats == [] and out.balance_loss is None and out.z_loss is None
    torch.testing.assert_close(out.loss, out.ce_loss)


def test_moe_every_places_moe_layers():
    model = build(tiny_cfg(n_layers=4, moe_every=2))
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert [isinstance(b.ffn, MoELayer) for b in model.blocks] == [False, True, False, True]
    idx = torch.randint(0, model.cfg.vocab_size, (1, 5))
    assert len(model(idx).router_stats) == 2


def test_activation_checkpointing_gives_same_loss_and_grads():
    from moekit.config import ModelConfig
    from moekit.model.transformer import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      n_experts=4, top_k=2, max_seq_len=32)
    model = build_model(cfg)
    idx = torch.randint(0, 64, (2, 16))
    grads = []
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        out = model(idx, idx.roll(-1, 1))
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(grads[0][0], grads[1][0])
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-6, atol=1e-7)
