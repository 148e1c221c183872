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
from moekit.infer.speculative import accept, accept_batched
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


def _perturbed(target, scale: float = 0.25):
    """The target with noise on its LM head: a draft that agrees with it only sometimes."""
    draft = copy.deepcopy(target)
    with torch.no_grad():
        w = draft.lm_head.weight
        w += scale * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=w.dtype)
    return draft


@pytest.mark.parametrize("draft_kind", ["small", "self", "perturbed"])
@pytest.mark.parametrize("budget", ["1MiB", "40KiB"])
def test_greedy_speculation_on_the_graph_path(draft_kind, budget):
    """The graph path (run eagerly off the GPU): the whole step, k draft steps with proposals fed
    back on the device and one verification of k + 1 rows per request, in one graph; greedy output
    identical, no blocks left behind, every proposal accepted when the target drafts for itself."""
    target, small = _models()
    draft = {"small": small, "self": copy.deepcopy(target), "perturbed": _perturbed(target)}[draft_kind]
    prompts, params = _prompts(), SamplingParams(max_tokens=25, temperature=0)
    ref = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(prompts, params)
    eng = Engine(target, None, EngineConfig(kv_budget=budget, block_size=4, num_speculative_tokens=3,
                                            max_num_seqs=6), draft=draft)
    eng.runner.graph_sizes = eng.spec.runner.graph_sizes = [1, 2, 4, 8, 16, 32]
    eng.warmup()
    assert sorted(eng.spec.step_graphs) == [1, 2, 3, 4, 5, 6]  # a step graph for each number of requests
    replays = []
    for graph, *_ in eng.spec.step_graphs.values():
        graph.replay = lambda run=graph.replay: (replays.append(1), run())
    outs = eng.generate(prompts, params)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in ref]
    assert eng.spec.stats.steps > 0 and len(replays) > eng.spec.stats.steps / 2
    stats = eng.stats()
    assert stats["kv_blocks_used"] == 0
    if draft_kind == "self":
        assert stats["spec_acceptance_rate"] == 1.0
    if draft_kind == "perturbed":  # partly accepted runs: rollback after each kind of disagreement
        assert 0.1 < stats["spec_acceptance_rate"] < 0.95


@pytest.mark.parametrize("graphs", [False, True])
def test_no_speculation_while_a_prefill_is_unfinished(graphs):
    """A tiny token budget gives a prompt one-token chunks that are not its last: such a step is no
    decode step, and speculating on it would verify at the wrong positions."""
    target, small = _models()
    prompts, params = [[5, 9, 11], [7, 3], [1, 2, 3, 4, 5]], SamplingParams(max_tokens=12, temperature=0)
    cfg = dict(kv_budget="1MiB", block_size=4, max_num_batched_tokens=2)
    ref = Engine(target, None, EngineConfig(**cfg)).generate(prompts, params)
    eng = Engine(target, None, EngineConfig(**cfg, num_speculative_tokens=3), draft=copy.deepcopy(target))
    if graphs:
        eng.runner.graph_sizes = eng.spec.runner.graph_sizes = [1, 2, 4, 8, 16]
    outs = eng.generate(prompts, params)
    assert [o.output_token_ids for o in outs] == [o.output_token_ids for o in ref]
    assert eng.spec.stats.steps > 0 and eng.stats()["kv_blocks_used"] == 0


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


def test_batched_acceptance_reproduces_the_target_distribution():
    """accept_batched on 40000 rows at once, k = 2 (chi-square, fixed seed): the first emitted token
    follows p[0], the second (where a second is emitted) follows p[1]; the first proposal is
    accepted with probability sum_x min(p(x), q(x))."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2] * 5], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2], [0.3, 0.3, 0.2, 0.1, 0.1]], dtype=torch.float64)
    n, k = 40000, 2
    props = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(k)], 1)
    u = torch.rand(n, k, generator=g, dtype=torch.float64)
    e = torch.empty(n, 5, dtype=torch.float64).exponential_(generator=g)
    out, emitted = accept_batched(props, q.expand(n, k, 5), p.expand(n, k + 1, 5), u, e)
    assert out.shape == (n, k + 1) and int(emitted.min()) >= 1 and int(emitted.max()) <= k + 1
    for pos in range(2):
        toks = out[emitted > pos, pos]
        counts = torch.bincount(toks, minlength=5).double()
        expected = p[pos] * len(toks)
        assert float(((counts - expected) ** 2 / expected).sum()) < 18.47  # 99.9% quantile, 4 dof
    first_accepted = (emitted > 1).double().mean()
    assert float(first_accepted) == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.01)


def test_sampled_speculation_in_the_engine():
    """Sampling through the engine with speculation: seeded requests reproduce their outputs, the
    target drafting for itself has every proposal accepted (p = q), greedy requests in the same
    batch give the target's greedy tokens, and no blocks are left behind."""
    target, _ = _models()
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=i) if i % 3 else
              SamplingParams(max_tokens=20, temperature=0) for i in range(6)]

    def run():
        eng = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4, num_speculative_tokens=3),
                     draft=copy.deepcopy(target))
        return eng, [o.output_token_ids for o in eng.generate(prompts, params)]

    eng, first = run()
    assert run()[1] == first
    stats = eng.stats()
    assert stats["spec_acceptance_rate"] == 1.0 and stats["kv_blocks_used"] == 0
    ref = Engine(target, None, EngineConfig(kv_budget="1MiB", block_size=4)).generate(
        [p for i, p in enumerate(prompts) if i % 3 == 0], SamplingParams(max_tokens=20, temperature=0))
    assert [first[i] for i in range(6) if i % 3 == 0] == [o.output_token_ids for o in ref]


def test_draft_must_share_the_vocabulary():
    target, _ = _models()
    other = build_model(ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, ffn_dim=32, n_experts=2,
                                    top_k=1, max_seq_len=128))
    with pytest.raises(ConfigError, match="vocabulary"):
        Engine(target, None, EngineConfig(kv_budget="1MiB"), draft=other)


@pytest.mark.parametrize("bad", [dict(distill_loss="js"), dict(distill_on_policy=0.5),
                                 dict(distill_from="runs/t", distill_on_policy=1.5),
                                 dict(distill_from="runs/t", distill_on_policy=0.5, distill_on_policy_tokens=10**6),
                                 dict(distill_from="runs/t", distill_on_policy_pool=0),
                                 dict(distill_from="runs/t", distill_eval_prompts=-1),
                                 dict(distill_from="runs/t", distill_eval_k=0),
                                 dict(distill_from="runs/t", distill_on_policy=0.5, pp=2, micro_batch=2)])
def test_distillation_settings_are_checked(bad):
    from moekit.config import TrainConfig

    with pytest.raises(ConfigError, match="distill"):
        TrainConfig(**bad).validate()


def test_distill_loss_closed_form():
    from moekit.train.trainer import distill_loss

    t = torch.tensor([[2.0, 0.0, -1.0]])
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[0.0, 0.0, 0.0]])
    p = torch.softmax(t, -1)
    want = (p * (p.log() - torch.log(torch.full((3,), 1 / 3)))).sum()
    assert distill_loss(s, t).item() == pytest.approx(want.item(), rel=1e-6)
    # temperature T softens both and scales by T^2
    p2, q2 = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    assert distill_loss(s, t, 2.0).item() == pytest.approx(4 * (p2 * (p2.log() - q2.log())).sum().item(), rel=1e-6)
    # total variation: 1 - sum min(p, q), the probability that speculative sampling rejects
    q = torch.full((3,), 1 / 3)
    assert distill_loss(s, t, kind="tvd").item() == pytest.approx(1 - torch.minimum(p[0], q).sum().item(), rel=1e-6)


def test_on_policy_pool_resumes_exactly(tmp_path, monkeypatch):
    """The teacher writes three on-policy micro-batches at a time; a run killed after a checkpoint
    that falls inside a pool (the written rows not yet used wait in it) and resumed matches an
    uninterrupted run bit for bit."""
    from test_train import assert_same_weights, ckpt_path, comparable, train_killed_at

    from moekit.config import DataConfig, RunConfig, TrainConfig
    from moekit.train import checkpoint as ckpt_io
    from moekit.train.metrics import read_metrics
    from moekit.train.trainer import train_main

    data = DataConfig(max_docs=12, max_doc_chars=3000, val_docs=3, cache_dir=str(tmp_path / "cache"))
    common = dict(seq_len=32, micro_batch=2, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=100, sample_tokens=0,
                  device="cpu")
    model = dict(vocab_size=512, n_heads=2, max_seq_len=64, n_experts=2, top_k=1)
    train_main(RunConfig(model=ModelConfig(d_model=32, n_layers=1, ffn_dim=64, **model),
                         train=TrainConfig(out_dir=str(tmp_path / "target"), steps=4, ckpt_every=4, **common),
                         data=data), progress=False)

    def draft(out: str) -> RunConfig:  # on-policy micro-batches at steps 1, 3, 5, 7: pools {1, 3, 5}, {7}
        return RunConfig(model=ModelConfig(d_model=16, n_layers=1, ffn_dim=32, **model),
                         train=TrainConfig(out_dir=str(tmp_path / out), steps=8, ckpt_every=4, distill_on_policy=0.5,
                                           distill_on_policy_pool=3, distill_from=str(tmp_path / "target"), **common),
                         data=data)

    train_main(draft("a"), progress=False)
    train_killed_at(draft("b"), 6, monkeypatch)
    waiting = ckpt_io.load_state(ckpt_path(tmp_path / "b", 4))["on_policy_written"]
    assert waiting.shape == (1, 2, 2, 32)  # step 5's micro-batch, written with steps 1 and 3
    train_main(None, resume=str(tmp_path / "b"), progress=False)
    assert comparable(read_metrics(tmp_path / "b")) == comparable(read_metrics(tmp_path / "a"))
    assert_same_weights(ckpt_path(tmp_path / "a", 8), ckpt_path(tmp_path / "b", 8))


@pytest.mark.parametrize("on_policy,written_tokens,pool", [(0.0, 0, 1), (0.5, 0, 4), (0.5, 9, 1)])
def test_distilled_draft_learns_the_target(tmp_path, monkeypatch, on_policy, written_tokens, pool):
    """A short distillation run on the bundled corpus: the KL to the target falls, and the draft
    then serves as the speculative model of that target with identical greedy output. On policy,
    half the micro-batches are the target's own greedy continuations of a corpus prefix (checked
    against a full-recompute greedy loop), or the last written_tokens of each row; the teacher writes
    pool micro-batches at a time."""
    import json

    from moekit.train.trainer import Trainer

    written = []
    real = Trainer._teacher_writes

    def spy(self, x, **kw):
        out = real(self, x, **kw)
        written.append((x, out))
        return out

    monkeypatch.setattr(Trainer, "_teacher_writes", spy)

    from moekit.config import DataConfig, RunConfig, TrainConfig
    from moekit.infer.generate import load_for_inference
    from moekit.train.trainer import train_main

    cache = tmp_path / "cache"
    data = DataConfig(max_docs=12, max_doc_chars=3000, val_docs=3, cache_dir=str(cache))
    common = dict(seq_len=32, micro_batch=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=10, ckpt_every=20,
                  sample_tokens=0, device="cpu")
    target_cfg = RunConfig(model=ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, ffn_dim=64,
                                             n_experts=4, top_k=2, max_seq_len=64),
                           train=TrainConfig(out_dir=str(tmp_path / "target"), steps=20, **common), data=data)
    train_main(target_cfg, progress=False)
    draft_cfg = RunConfig(model=ModelConfig(vocab_size=512, d_model=16, n_layers=1, n_heads=2, ffn_dim=32,
                                            n_experts=2, top_k=1, max_seq_len=64),
                          train=TrainConfig(out_dir=str(tmp_path / "draft"), steps=20, distill_on_policy=on_policy,
                                            distill_on_policy_tokens=written_tokens, distill_on_policy_pool=pool,
                                            distill_from=str(tmp_path / "target"), **common), data=data)
    train_main(draft_cfg, progress=False)
    assert len(written) == -(-int(20 * on_policy) // pool)  # pools of micro-batches
    assert all(len(x) == 4 * pool for x, _ in written)
    if written:
        from engine_helpers import greedy_reference

        teacher, _ = load_for_inference(str(tmp_path / "target"), "cpu")
        for x, (xs, ys) in written[:2]:
            assert xs.shape == ys.shape == x.shape and torch.equal(xs[:, 1:], ys[:, :-1])
            for row, new, target_row in zip(x, xs, ys):
                n = written_tokens or 25  # by default a quarter of seq_len 32, then 25 tokens of the teacher's
                prefix = row[:33 - n].tolist()
                assert new.tolist() + [int(target_row[-1])] == prefix + greedy_reference(teacher, prefix, n)
    recs = [json.loads(x) for x in (tmp_path / "draft" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill_kl"] for r in recs if "distill_kl" in r]
    assert len(kl) == 20 and sum(kl[-5:]) / 5 < sum(kl[:5]) / 5
    # at each evaluation (steps 0, 10, 20) the draft's greedy acceptance as the target's draft
    acc = [r["spec/draft_acceptance"] for r in recs if "spec/draft_acceptance" in r]
    assert len(acc) == 3 and 0 <= acc[0] < acc[-1] <= 1
    target, tok = load_for_inference(str(tmp_path / "target"), "cpu")
    draft, _ = load_for_inference(str(tmp_path / "draft"), "cpu")
    prompts = ["def ", "The ", "import "]
    params = SamplingParams(max_tokens=12, temperature=0)
    ref = Engine(target, tok, EngineConfig(kv_budget="1MiB")).generate(prompts, params)
    eng = Engine(target, tok, EngineConfig(kv_budget="1MiB", num_speculative_tokens=3), draft=draft)
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == [o.output_token_ids for o in ref]
    assert eng.stats()["spec_acceptance_rate"] > 0
