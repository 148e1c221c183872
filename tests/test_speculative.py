"""Speculative decoding: lossless against the target alone, exact in distribution, no KV blocks
left behind."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import SamplingParams
from moekit.infer.speculative import accept
from moekit.model.transformer import build_model

TARGET = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, n_experts=4,
                     top_k=2, max_seq_len=128)
DRAFT = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, n_experts=2,
                    top_k=1, max_seq_len=128)


def _models():
    torch.manual_seed(0)
    target = build_model(TARGET).double()
    torch.manual_seed(1)
    return target, build_model(DRAFT).double()


def _prompts(n: int = 12):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 64, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("draft_kind", ["small", "self"])
@pytest.mark.parametrize("budget", ["1MiB", "40KiB"])
def test_greedy_output_is_identical_with_speculation(draft_kind, budget):
    target, small = _models()
    draft = small if draft_kind == "small" else copy.deepcopy(target)
    prompts, params = _prompts(), SamplingParams(max_tokens=25, temperature=0)
    ref = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(prompts, params)
    eng = Engine(target, None, EngineConfig(kv_budget=budget, block_size=4, num_speculative_tokens=3,
                                            max_num_seqs=6), draft=draft)
    outs = eng.generate(prompts, params)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in ref]
    stats = eng.stats()
    assert stats["kv_blocks_used"] == 0  # rejected positions leave no blocks behind
    if draft_kind == "self":  # the target as its own draft: every proposal accepted
        assert stats["spec_acceptance_rate"] == 1.0 and stats["spec_mean_accepted_length"] == 4.0
    if budget == "40KiB":
        assert stats["preemptions"] > 0


def test_speculation_switches_off_above_its_batch_size():
    target, small = _models()
    eng = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4, speculative_max_batch=2), draft=small)
    eng.generate(_prompts(6), SamplingParams(max_tokens=5, temperature=0))
    # six concurrent requests: no speculative step until only two are left
    assert eng.spec.stats.steps < 5


def test_acceptance_rule_reproduces_the_target_distribution():
    """Chi-square with a fixed seed: drafts from q, emitted first tokens follow p."""
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=gen))
        out = accept([x], q, p, gen)
        counts[out[0]] += 1
        accepted += len(out) == 2
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # 99.9% quantile of chi-square with 4 degrees of freedom
    # acceptance probability is sum_x min(p(x), q(x)) in closed form
    assert accepted / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.01)


def test_draft_must_share_the_vocabulary():
    target, _ = _models()
    other = build_model(ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, ffn_dim=32, n_experts=2,
                                    top_k=1, max_seq_len=128))
    with pytest.raises(ConfigError, match="vocabulary"):
        Engine(target, None, EngineConfig(kv_budget="1MiB"), draft=other)
