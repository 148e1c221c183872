"""Prompt lookup decoding (speculation from the request's own history): the incremental n-gram
index against a direct search, greedy output identical to the target alone, sampled output in the
target's distribution, no KV blocks left behind."""

from __future__ import annotations

import random

import pytest
import torch

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.ngram import extend_index, lookup
from moekit.infer.sampling import SamplingParams
from moekit.infer.speculative import accept_batched
from moekit.model.transformer import build_model

TARGET = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, n_experts=4,
                     top_k=2, max_seq_len=128)


def _search(ids: list[int], k: int, min_n: int, max_n: int) -> list[int] | None:
    """The latest earlier occurrence of the longest suffix, found directly; its continuation,
    extended periodically past the end."""
    L = len(ids)
    for n in range(min(max_n, L), min_n - 1, -1):
        for j in range(L - 1, n - 1, -1):  # occurrences ending before the last token, latest first
            if ids[j - n:j] == ids[L - n:]:
                ext = list(ids)
                while len(ext) < j + k:
                    ext.append(ext[len(ext) - (L - j)])
                return ext[j:j + k]
    return None


@pytest.mark.parametrize("seed", range(4))
def test_index_finds_what_a_direct_search_finds(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(4) for _ in range(rng.randrange(1, 5))]
    index, start = {n: {} for n in range(1, 4)}, 0
    for _ in range(60):
        start = extend_index(ids, index, start, 1, 3)
        assert lookup(ids, index, 5, 1, 3) == _search(ids, 5, 1, 3)
        assert lookup(ids, index, 5, 2, 3) == _search(ids, 5, 2, 3)  # longer matches only
        ids += [rng.randrange(4) for _ in range(rng.randrange(1, 4))]  # several tokens per step


def test_a_repeat_is_proposed_past_its_end():
    ids = [7, 1, 2, 3, 1, 2]
    index = {n: {} for n in range(1, 4)}
    extend_index(ids, index, 0, 1, 3)
    assert lookup(ids, index, 5, 1, 3) == [3, 1, 2, 3, 1]  # (1, 2) came before at 1..2, then 3, 1, 2
    assert lookup([5, 6], {n: {} for n in range(1, 4)}, 3, 1, 3) is None


def _target():
    torch.manual_seed(0)
    return build_model(TARGET).double()


def _prompts():
    g = torch.Generator().manual_seed(2)
    motif = lambda: torch.randint(0, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    return [motif() * int(torch.randint(1, 5, (1,), generator=g)) + motif() for _ in range(10)]  # repeats


@pytest.mark.parametrize("budget", ["1MiB", "40KiB"])
def test_greedy_output_is_identical_with_prompt_lookup(budget):
    target = _target()
    prompts, params = _prompts(), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ref = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(prompts, params)
    eng = Engine(target, None, EngineConfig(kv_budget=budget, block_size=4, num_speculative_tokens=4,
                                            prompt_lookup_max=3, max_num_seqs=6))
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == [o.output_token_ids for o in ref]
    stats = eng.stats()
    assert stats["kv_blocks_used"] == 0  # rejected positions leave no blocks behind
    assert eng.spec.stats.proposed > 0 and eng.spec.stats.accepted > 0
    assert stats["spec_mean_accepted_length"] > 1.0
    if budget == "40KiB":
        assert stats["preemptions"] > 0


def test_sampled_prompt_lookup_is_plain_sampling():
    """Seeded sampled requests (temperature, top-k, top-p) give the tokens plain decoding samples,
    alone or among others; greedy ones in the same batch give the target's tokens; aborts midway
    leave no blocks."""
    target = _target()
    prompts = _prompts()[:6]
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_k=8 * i, top_p=0.9, seed=i, ignore_eos=True)
              if i % 3 else SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) for i in range(6)]
    plain = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(prompts, params)
    cfg = EngineConfig(kv_budget="1MiB", block_size=4, num_speculative_tokens=3, prompt_lookup_max=2)
    eng = Engine(target, None, cfg)
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == [o.output_token_ids for o in plain]
    assert eng.spec.stats.accepted > 0 and eng.stats()["kv_blocks_used"] == 0
    alone = Engine(target, None, cfg).generate(prompts[1:2], params[1:2])
    assert alone[0].output_token_ids == plain[1].output_token_ids
    eng = Engine(target, None, cfg)
    ids = [eng.add_request(p, prm) for p, prm in zip(prompts, params)]
    for step in range(8):
        eng.step()
        if step == 3:
            for rid in ids[::2]:
                eng.abort(rid)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats()["kv_blocks_used"] == 0


def test_one_hot_proposals_keep_the_target_distribution():
    """A proposal that is always the same token (q one-hot, as prompt lookup proposes): over 40000
    rows the first emitted token follows p (chi-square, fixed seed) and the proposal is accepted
    with probability p(x)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.2, 0.3, 0.2, 0.2]], dtype=torch.float64)
    n = 40000
    props = torch.full((n, 1), 2)
    q = torch.nn.functional.one_hot(props, 5).double()
    u = torch.rand(n, 1, generator=g, dtype=torch.float64)
    e = torch.empty(n, 5, dtype=torch.float64).exponential_(generator=g)
    out, emitted = accept_batched(props, q, p.expand(n, 2, 5), u, e)
    counts = torch.bincount(out[:, 0], minlength=5).double()
    assert float(((counts - p[0] * n) ** 2 / (p[0] * n)).sum()) < 18.47  # 99.9% quantile, 4 dof
    assert float((emitted > 1).double().mean()) == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("bad", [dict(prompt_lookup_max=2, prompt_lookup_min=3), dict(prompt_lookup_max=17),
                                 dict(prompt_lookup_max=2, prompt_lookup_min=-1),
                                 dict(prompt_lookup_max=2, num_speculative_tokens=0)])
def test_prompt_lookup_settings_are_checked(bad):
    with pytest.raises(ConfigError):
        Engine(_target(), None, EngineConfig(kv_budget="1MiB", **bad))


def _hybrid_run(target, draft, prompts, params, min_n: int = 0, lookup_tokens: int = 0) -> tuple[list[list[int]], Engine]:
    """Requests arriving while others decode, under a KV budget that forces preemption."""
    eng = Engine(target, None, EngineConfig(kv_budget="40KiB", block_size=4, num_speculative_tokens=3,
                                            prompt_lookup_max=3, prompt_lookup_min=min_n, max_num_seqs=3,
                                            prompt_lookup_tokens=lookup_tokens), draft=draft)
    ids = [eng.add_request(p, prm) for p, prm in zip(prompts[:3], params[:3])]
    out, later = {}, list(zip(prompts[3:], params[3:]))
    while eng.has_unfinished() or later:
        if later and len(out) % 2 == 0:
            ids.append(eng.add_request(*later.pop(0)))
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.output_token_ids
    return [out[i] for i in ids], eng


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_draft_with_prompt_lookup(temperature, monkeypatch):
    """A draft model and prompt lookup together: steps where every request matches its history
    verify the lookup's proposals, the others draft (the draft catching up on what lookup steps
    accepted). Which one a step uses depends only on the tokens so far, and each is lossless, so
    the output keeps the target's distribution: greedy output is the target's tokens. Seeded
    sampled output is reproducible for the same requests. Both proposers take turns (lookup on
    n-grams of 3 by default; sampled text repeats less, so down to 1 there), preemption
    happens, and no KV blocks are left behind. A lookup step brings the draft up to date, so a
    drafting step never catches up more than the two rows its step graph holds."""
    from moekit.infer.speculative import SpeculativeDecoder

    lags = []
    real = SpeculativeDecoder._catch_up_rows

    def spy(self, reqs):
        rows, last = real(self, reqs)
        lags.append(max(b - a for a, b in zip([-1] + last, last)))  # rows of the request lagging most
        return rows, last

    monkeypatch.setattr(SpeculativeDecoder, "_catch_up_rows", spy)
    target = _target()
    torch.manual_seed(5)
    draft = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    n_experts=2, top_k=1, max_seq_len=128)).double()
    prompts = _prompts()[:6] + [torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i)).tolist()
                                for i in range(3)]  # no repeats: the draft's turn
    params = [SamplingParams(max_tokens=24, temperature=temperature, top_k=16, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    min_n = 0 if temperature == 0 else 1
    out, eng = _hybrid_run(target, draft, prompts, params, min_n)
    assert len(eng.spec.stats.accepted_at) == 3
    if temperature == 0:
        plain = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(prompts, params)
        assert out == [o.output_token_ids for o in plain]
    else:
        assert out == _hybrid_run(target, draft, prompts, params, min_n)[0]
        assert all(len(o) == 24 for o in out)
    stats = eng.stats()
    assert stats["kv_blocks_used"] == 0 and stats["preemptions"] > 0
    assert 0 < stats["spec_lookup_steps"] < eng.spec.stats.steps  # both proposers took turns
    assert lags and max(lags) <= 2


def test_lookup_steps_may_propose_more_than_drafting_ones():
    """Next to a draft proposing 3 tokens, lookup steps proposing 7 (prompt_lookup_tokens): greedy
    output is still the target's, no KV blocks are left behind, acceptance is counted per
    position up to 7, and the mean accepted length counts every verified request once."""
    target = _target()
    torch.manual_seed(5)
    draft = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    n_experts=2, top_k=1, max_seq_len=128)).double()
    prompts = _prompts()[:6] + [torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i)).tolist()
                                for i in range(3)]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in prompts]
    out, eng = _hybrid_run(target, draft, prompts, params, lookup_tokens=7)
    plain = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(prompts, params)
    assert out == [o.output_token_ids for o in plain]
    st, stats = eng.spec.stats, eng.stats()
    assert stats["kv_blocks_used"] == 0 and 0 < stats["spec_lookup_steps"] < st.steps
    assert len(st.accepted_at) == 7 and sum(st.accepted_at) == st.accepted
    assert st.accepted_at[3:] != [0, 0, 0, 0]  # lookup steps accepted past the draft's 3
    assert st.mean_accepted_length == (st.accepted + st.request_steps) / st.request_steps
    with pytest.raises(ConfigError):
        Engine(target, None, EngineConfig(kv_budget="1MiB", prompt_lookup_max=2, prompt_lookup_tokens=-1))
