"""The GPU decode paths (CUDA graphs, staged graph inputs, the fused Triton step, speculative
decoding on graphs) against the packed model path, float32, on a CUDA device."""

from __future__ import annotations

import pytest
import torch

from moekit.config import ModelConfig
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import SamplingParams
from moekit.model.transformer import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = dict(vocab_size=96, d_model=128, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=192, n_experts=4, top_k=2,
           max_seq_len=256, init_std=0.2)


def _model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**CFG, **kw}))
    model.init_weights(seed=seed)
    return model.cuda().eval()


def _prompts(n: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _run(model, prompts, params, draft=None, graphs=None, **cfg) -> list[list[int]]:
    eng = Engine(model, None, EngineConfig(kv_budget="64MiB", block_size=16, **cfg), draft=draft)
    out = [o.output_token_ids for o in eng.generate(prompts, params)]
    if graphs is not None:  # whether decode graphs were captured
        assert bool(eng.runner.graphs) == graphs
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_graph_decode_matches_packed_path(fused):
    model = _model()
    prompts, params = _prompts(), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _run(model, prompts, params, cuda_graphs=False)
    assert _run(model, prompts, params, cuda_graphs=True, fused_decode=fused, max_num_seqs=4) == ref
    assert _run(model, prompts[:1], params, cuda_graphs=True, fused_decode=fused, graphs=fused) == ref[:1]


def test_speculative_greedy_on_graphs_matches_target_alone():
    target, draft = _model(), _model(seed=1, n_layers=1)
    prompts, params = _prompts(6), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _run(target, prompts, params, cuda_graphs=False)
    # two requests at a time: draft steps and the 2 x 4 verification rows replay one step graph
    eng = Engine(target, None, EngineConfig(kv_budget="64MiB", block_size=16, num_speculative_tokens=3, max_num_seqs=2),
                 draft=draft)
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == ref
    assert eng.spec.step_graphs and eng.spec.stats.proposed > 0


@pytest.mark.parametrize("lookup_tokens", [0, 9])
def test_draft_with_prompt_lookup_on_graphs_matches_target_alone(lookup_tokens):
    """A draft and prompt lookup together on the GPU path: lookup steps verify on the fused step
    (proposing 3 like the draft, or 9), draft steps replay the step graph or catch the draft up
    first; greedy output is the target's."""
    target, draft = _model(), _model(seed=1, n_layers=1)
    prompts = [p * 2 for p in _prompts(3)] + _prompts(6)[3:]  # some repeat, some do not
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _run(target, prompts, params, cuda_graphs=False)
    eng = Engine(target, None, EngineConfig(kv_budget="64MiB", block_size=16, num_speculative_tokens=3, max_num_seqs=2,
                                            prompt_lookup_max=3, prompt_lookup_min=1,
                                            prompt_lookup_tokens=lookup_tokens), draft=draft)
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == ref
    assert 0 < eng.spec.stats.lookup_steps < eng.spec.stats.steps
    assert len(eng.spec.stats.accepted_at) == (lookup_tokens or 3)


def test_prompt_lookup_verifies_on_the_fused_step():
    """Prompt lookup at 4 requests x (5 + 1) rows: verification replays exact-size graphs of the
    fused step (exact sizes: no padding rows), and greedy output equals the target alone."""
    target = _model()
    prompts = [p * 3 for p in _prompts(8)]  # repeats to look up
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _run(target, prompts, params, cuda_graphs=False)
    eng = Engine(target, None, EngineConfig(kv_budget="64MiB", block_size=16, num_speculative_tokens=5,
                                            prompt_lookup_max=3, max_num_seqs=4))
    eng.warmup()
    assert sorted(eng.runner.verify_graphs) == [6, 12, 18, 24]
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == ref
    assert eng.spec.stats.proposed > 0


def test_sampled_prompt_lookup_is_plain_sampling_on_graphs():
    """Seeded sampled requests with prompt lookup on the GPU path (verification on the fused step,
    batch-invariant): the same tokens as plain decoding on the graphs."""
    target = _model()
    prompts = [p * 3 for p in _prompts(6)]
    params = [SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True) for i in range(6)]
    plain = _run(target, prompts, params, max_num_seqs=4)
    eng = Engine(target, None, EngineConfig(kv_budget="64MiB", block_size=16, num_speculative_tokens=5,
                                            prompt_lookup_max=3, max_num_seqs=4))
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == plain
    assert eng.spec.stats.proposed > 0


def test_speculation_stops_where_verification_would_leave_the_fused_step():
    """8 requests x (7 + 1) rows would verify on the model path (other numbers than decoding a row
    alone): speculation runs only while at most 40 // 8 = 5 requests decode, and greedy output
    stays identical."""
    target, draft = _model(), _model(seed=1, n_layers=1)
    prompts, params = _prompts(10), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ref = _run(target, prompts, params, cuda_graphs=False)
    eng = Engine(target, None, EngineConfig(kv_budget="64MiB", block_size=16, num_speculative_tokens=7,
                                            max_num_seqs=8), draft=draft)
    assert eng.spec_max_batch == 5
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == ref
    assert eng.spec.stats.proposed > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(d_model=512, n_heads=8, n_kv_heads=1, ffn_dim=1024, n_experts=4, top_k=4),
                                   dict(d_model=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816, n_experts=8, top_k=8)])
def test_fused_step_matches_model_path_at_real_widths(shape, dtype):
    """The fused step's tuned tiles (splits of K, tiles of experts' rows) at the widths of the
    benchmark models: logits of 1 ... 40 rows against the model path in float64. Every expert is
    chosen (top_k = n_experts), so rounding cannot flip a row's routing against the reference,
    and at 40 rows each expert's rows span several tiles."""
    from types import SimpleNamespace

    from moekit.infer.fused_decode import FusedDecoder
    from moekit.infer.kv_cache import PagedKVCache
    from moekit.infer.runner import ModelRunner

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**CFG, "vocab_size": 512, "init_std": 0.02, **shape})).cuda().eval()
    ref_model = build_model(model.cfg).cuda().double().eval()
    ref_model.load_state_dict(model.state_dict())
    model = model.to(dtype)
    for B in (1, 2, 5, 8, 40):
        kv = PagedKVCache(model.cfg, num_blocks=4 * B + 1, block_size=64, device="cuda", dtype=dtype)
        kv64 = PagedKVCache(model.cfg, num_blocks=4 * B + 1, block_size=64, device="cuda", dtype=torch.float64)
        runner = ModelRunner(model, kv, max_model_len=256, max_num_seqs=B, cuda_graphs=False)
        runner64 = ModelRunner(ref_model, kv64, max_model_len=256, max_num_seqs=B, cuda_graphs=False)
        g = torch.Generator().manual_seed(B)
        lens = torch.randint(1, 200, (B,), generator=g).tolist()
        reqs = [SimpleNamespace(blocks=list(range(1 + 4 * i, 5 + 4 * i))) for i in range(B)]
        for r, L in zip(reqs, lens):
            prompt = torch.randint(0, 512, (L,), generator=g).tolist()
            runner.forward_chunks([(r, 0, prompt)])
            runner64.forward_chunks([(r, 0, prompt)])
        toks = torch.randint(0, 512, (B,), generator=g)
        ref = runner64.forward_chunks([(r, L, [int(t)]) for r, L, t in zip(reqs, lens, toks)]).float()
        tables = torch.tensor([r.blocks for r in reqs], dtype=torch.int32, device="cuda")
        out = FusedDecoder(model, kv.k, kv.v)(
            toks.cuda(), torch.tensor(lens, device="cuda"),
            torch.tensor([r.blocks[L // 64] * 64 + L % 64 for r, L in zip(reqs, lens)], device="cuda"),
            tables, torch.tensor(lens, dtype=torch.int32, device="cuda") + 1)
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), (B, err)


def _fused_step_both_ways(monkeypatch, module, flag: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one fused decode step of `rows` rows with module.flag off and on."""
    import moekit.infer.fused_decode as fd
    from moekit.infer.kv_cache import PagedKVCache

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**CFG, "vocab_size": 512, "d_model": 512, "n_heads": 8, "n_kv_heads": 1,
                                       "ffn_dim": 1024, "n_experts": 4, "top_k": 2})).cuda().bfloat16().eval()
    kv = PagedKVCache(model.cfg, num_blocks=9, block_size=64, device="cuda", dtype=torch.bfloat16)
    kv.k.normal_()
    kv.v.normal_()
    args = (torch.randint(0, 512, (rows,), device="cuda"), torch.full((rows,), 70, device="cuda"),
            torch.arange(rows, device="cuda") + 64 * 2 + 6,
            torch.arange(1, 9, device="cuda", dtype=torch.int32).view(1, 8).expand(rows, 8).contiguous(),
            torch.full((rows,), 71, dtype=torch.int32, device="cuda"))
    out = []
    for on in (False, True):
        monkeypatch.setattr(module, flag, on)
        out.append(fd.FusedDecoder(model, kv.k, kv.v)(*args))
    return out[0], out[1]


@pytest.mark.parametrize("rows", [1, 3])
def test_next_layer_prefetch_changes_no_bits(monkeypatch, rows):
    """The expert down projection asking L2 for the next layer's weights (and the experts' evict-first
    loads) is a cache hint: the same logits, bit for bit, as without."""
    import moekit.infer.fused_decode as fd

    off, on = _fused_step_both_ways(monkeypatch, fd, "PREFETCH_NEXT", rows)
    assert torch.equal(off, on)


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_routing_in_the_output_projection_on_the_gpu(monkeypatch, rows):
    """Routing at the end of the output projection, with its programs running at once: logits as
    with the routing kernel of its own (the same sums up to the order of a reduction; a row routed
    before its residual was complete would choose other experts and miss by far more); 20 rows are
    two blocks of the projection."""
    from moekit.infer import triton_route

    off, on = _fused_step_both_ways(monkeypatch, triton_route, "ROUTE_IN_WO", rows)
    assert ((on - off).norm() / off.norm()).item() < 2e-2


@pytest.mark.parametrize("rows", [1, 3])
def test_attention_in_the_output_projection_on_the_gpu(monkeypatch, rows):
    """Attention inside the output projection (MOEKIT_ATTN_IN_WO), bf16: logits as with the paged
    attention kernel and the projection apart (the same sums up to the order of the softmax's
    chunks and the projection's split)."""
    from moekit.infer import triton_attn_wo

    off, on = _fused_step_both_ways(monkeypatch, triton_attn_wo, "ATTN_IN_WO", rows)
    assert ((on - off).norm() / off.norm()).item() < 2e-2


@pytest.mark.parametrize("K,N", [(2048, 3072), (2048, 2048), (1024, 1536), (2048, 32000)])
def test_norm_linear_tuned_splits_are_deterministic_and_batch_invariant(K, N):
    """The tuned projection (splits of K reduced by their last program, in a fixed order): against
    float64, the same bits for a row alone or in a batch, and the same bits on every call."""
    from moekit.infer.fused_decode import norm_linear

    g = torch.Generator(device="cuda").manual_seed(K + N)
    x = torch.randn(40, K, device="cuda", generator=g)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
    gamma = (torch.rand(K, device="cuda", generator=g) + 0.5).bfloat16()
    full = norm_linear(x, w, gamma)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
    ref = ref.bfloat16().double() @ w.double().T  # the kernel multiplies bf16 inputs
    assert ((full.double() - ref).norm() / ref.norm()).item() < 1e-2
    for rows in (1, 5, 17):
        assert torch.equal(norm_linear(x[:rows], w, gamma), full[:rows])
    for _ in range(20):
        assert torch.equal(norm_linear(x, w, gamma), full)
    acc0 = torch.randn(40, N, device="cuda", generator=g)
    acc = acc0.clone()
    norm_linear(x, w, out=acc, accumulate=True)
    expect = acc0.double() + x.bfloat16().double() @ w.double().T
    assert ((acc.double() - expect).norm() / expect.norm()).item() < 1e-2
    one = acc0[:1].clone()
    norm_linear(x[:1], w, out=one, accumulate=True)
    assert torch.equal(one, acc[:1])


def test_tuning_the_decode_graph_keeps_greedy_output(monkeypatch, tmp_path):
    """Engine.tune_decode on the GPU: it times the batch-1 graph with the autotuner's tiles and with
    the chosen ones, drops the graphs captured before, and greedy decoding afterwards (graphs
    captured again with the chosen tiles) equals the packed path in float32. The tiles are kept on
    disk: an engine built with tune_decode takes them and does not tune again."""
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    model = _model()
    prompts, params = _prompts(4), SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = _run(model, prompts, params, cuda_graphs=False)
    eng = Engine(model, None, EngineConfig(kv_budget="64MiB", block_size=16, max_num_seqs=4))
    eng.warmup()
    out = eng.tune_decode(prompt_len=40)
    assert out is not None and out["final_ms"] > 0 and out["start_ms"] > 0
    assert not eng.runner.graphs and not eng.has_unfinished()
    assert [o.output_token_ids for o in eng.generate(prompts, params)] == ref
    assert out["saved"] >= 5 and (tmp_path / "decode_tiles.json").exists()
    again = Engine(model, None, EngineConfig(kv_budget="64MiB", block_size=16, max_num_seqs=4, tune_decode=True))
    assert again.tune_decode()["cached"] >= 5


def test_on_policy_distillation_with_a_pool_on_the_gpu(tmp_path):
    """Distillation on the GPU with bf16 autocast: the teacher (a bf16 copy, as served) writes two
    on-policy micro-batches per decode batch, and each evaluation measures the draft's greedy
    acceptance as the teacher's speculative draft."""
    import json

    from moekit.config import DataConfig, RunConfig, TrainConfig
    from moekit.train.trainer import train_main

    data = DataConfig(max_docs=12, max_doc_chars=3000, val_docs=3, cache_dir=str(tmp_path / "cache"))
    common = dict(seq_len=64, micro_batch=4, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=4, ckpt_every=8,
                  sample_tokens=0, device="cuda")
    model = dict(vocab_size=512, n_heads=2, max_seq_len=128, n_experts=2, top_k=1)
    train_main(RunConfig(model=ModelConfig(d_model=64, n_layers=2, ffn_dim=128, **model),
                         train=TrainConfig(out_dir=str(tmp_path / "target"), steps=8, **common), data=data),
               progress=False)
    train_main(RunConfig(model=ModelConfig(d_model=32, n_layers=1, ffn_dim=64, **model),
                         train=TrainConfig(out_dir=str(tmp_path / "draft"), steps=8, distill_on_policy=0.5,
                                           distill_on_policy_pool=2, distill_from=str(tmp_path / "target"), **common),
                         data=data), progress=False)
    recs = [json.loads(x) for x in (tmp_path / "draft" / "metrics.jsonl").read_text().splitlines()]
    acc = [r["spec/draft_acceptance"] for r in recs if "spec/draft_acceptance" in r]
    assert len(acc) == 3 and all(0 <= a <= 1 for a in acc)
    assert all(r["loss"] == r["loss"] for r in recs if "loss" in r)  # finite: no NaN


@pytest.mark.parametrize("B,V", [(1, 32000), (5, 96), (3, 50257)])
def test_greedy_tokens_in_the_graph_are_torch_argmax(B, V):
    """The decode graphs' argmax kernel against torch.argmax, ties (the first index wins) and a
    row of -inf included."""
    from moekit.infer.triton_argmax import argmax_into

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, V, device="cuda", generator=g)
    x[0, V // 3] = x[0, V - 1] = 50.0
    if B > 2:
        x[2] = float("-inf")
    out = torch.full((8,), -7, device="cuda", dtype=torch.int32)
    assert argmax_into(x, out).tolist() == x.argmax(-1).tolist()
    assert out[B:].eq(-7).all()


@pytest.mark.parametrize("steps", [1, 4])
def test_chained_decode_steps_match_reading_every_step(steps):
    """Greedy decoding ahead on the GPU, `steps` fused steps to a graph (their tokens fed from one
    step to the next on the device), requests of different lengths finishing at different steps:
    the tokens of reading every step, float32."""
    model = _model()
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (30, 7, 19, 4, 25, 13)]
    ref = _run(model, prompts, params, cuda_graphs=True, max_num_seqs=4, lookahead=False)
    assert _run(model, prompts, params, cuda_graphs=True, max_num_seqs=4, decode_steps=steps) == ref
    assert _run(model, prompts[:1], params[:1], cuda_graphs=True, decode_steps=steps) == ref[:1]
