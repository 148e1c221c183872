"""Context extension: RoPE scaling formulas against hand-computed values, checkpoint round trip,
and the long-context evaluation against plain computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.config import ModelConfig, RunConfig, TrainConfig
from moekit.data.tokenizer import train_tokenizer
from moekit.eval.long_context import loss_by_position, passkey_prompt
from moekit.model.layers import rope_frequencies, yarn_inv_freq
from moekit.model.transformer import build_model


def test_scaling_one_is_plain_rope_for_both_kinds():
    plain = rope_frequencies(16, 64, 10000.0)
    for kind in ("linear", "yarn"):
        cos, sin = rope_frequencies(16, 64, 10000.0, 1.0, kind=kind, original_len=64)
        assert torch.equal(cos, plain[0]) and torch.equal(sin, plain[1])


def test_yarn_by_hand():
    """head_dim 8, theta 10000, factor 4, original length 64: the band edges and ramp by hand."""
    d, theta, s, L = 8, 10000.0, 4.0, 64
    inv, att = yarn_inv_freq(d, theta, s, L)
    base = [theta ** (-2 * i / d) for i in range(d // 2)]  # 1, 0.1, 0.01, 0.001

    def dim_for(rot):
        return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_for(32)), 0), min(math.ceil(dim_for(1)), d - 1)  # 0 and 2
    assert (low, high) == (0, 2)
    for i, b in enumerate(base):
        ramp = min(max((i - low) / (high - low), 0), 1)  # 0, 0.5, 1, 1
        assert inv[i].item() == pytest.approx(b / s * ramp + b * (1 - ramp), rel=1e-12)
    assert att == pytest.approx(0.1 * math.log(4) + 1)
    # the fastest dimension keeps its frequency, the slowest ones are interpolated by the factor
    assert inv[0].item() == pytest.approx(1.0) and inv[3].item() == pytest.approx(0.001 / 4)
    cos, sin = rope_frequencies(d, 10, theta, s, kind="yarn", original_len=L)
    assert cos[0, 0].item() == pytest.approx(att) and sin[0, 0].item() == 0.0  # cos/sin carry the factor
    assert cos[3, 1].item() == pytest.approx(att * math.cos(3 * inv[1].item()), rel=1e-6)


def test_linear_interpolation_by_hand():
    cos, _ = rope_frequencies(4, 8, 100.0, 2.0)
    assert cos[6, 1].item() == pytest.approx(math.cos(3 * 100.0 ** (-2 / 4)), rel=1e-6)


def test_checkpoint_round_trip_keeps_the_scaling(tmp_path):
    from moekit.train.checkpoint import load_run_config, save_checkpoint

    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, ffn_dim=32, n_experts=2, top_k=1,
                      max_seq_len=128, rope_scaling=4.0, rope_type="yarn", rope_original_len=32)
    tok = train_tokenizer(["some text to train on"] * 5, 290)
    ckpt = save_checkpoint(tmp_path, 1, build_model(cfg), RunConfig(model=cfg, train=TrainConfig(seq_len=64)),
                           tok, {"step": 1})
    back = load_run_config(ckpt).model
    assert (back.rope_scaling, back.rope_type, back.rope_original_len) == (4.0, "yarn", 32)
    assert torch.equal(build_model(cfg).rope_cos, build_model(back).rope_cos)


def test_loss_by_position_matches_a_plain_computation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_dim=32, n_experts=2,
                                    top_k=1, max_seq_len=32))
    seqs = torch.randint(0, 64, (5, 17))
    got = loss_by_position(model, seqs, buckets=4, batch=2)
    with torch.no_grad():
        logits = model(seqs[:, :-1]).logits
        ce = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none")  # [5, 16]
    want = ce.mean(0).view(4, 4).mean(1)
    assert got == pytest.approx(want.tolist(), rel=1e-5)


def test_passkey_prompt_places_the_key_at_its_depth():
    tok = train_tokenizer(["The grass is green. The sky is blue. The pass key is 12345."] * 20, 300)
    where = []
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tok, 400, depth, 54321)
        text = tok.decode(ids)
        assert abs(len(ids) - 400) < 40 and text.endswith("The pass key is")
        key_at = text.index("54321")
        where.append(key_at / len(text))
        filler_before = text[:key_at].count("The grass is green")
        filler_after = text[key_at:].count("The grass is green")
        if depth == 0.0:
            assert filler_before == 0 and filler_after > 0
        if depth == 1.0:
            assert filler_after == 0 and filler_before > 0
        if depth == 0.5:
            assert abs(filler_before - filler_after) <= 1
    assert where == sorted(where)
