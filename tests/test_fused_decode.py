"""The fused Triton decode step against the plain model forward over the same paged KV cache.

The kernels run in Triton's interpreter on CPU (TRITON_INTERPRET=1, float32), so the numbers
checked here are the kernels' own arithmetic: logits of a decode step for a batch of requests at
different context lengths, and the K/V the step writes into the cache.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
pytest.importorskip("triton", reason="the fused decode kernels are Triton kernels")

from moekit.config import ModelConfig  # noqa: E402
from moekit.infer.fused_decode import FusedDecoder, expert_down, expert_up, norm_linear, unsupported_reason  # noqa: E402
from moekit.infer.kv_cache import PagedKVCache  # noqa: E402
from moekit.infer.runner import ModelRunner  # noqa: E402
from moekit.model.transformer import build_model  # noqa: E402

BS = 4
# the interpreter reads its scalars from 1-element arrays, which numpy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _model(**kw):
    base = dict(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=96, n_experts=4, top_k=2,
                max_seq_len=64, init_std=0.2)
    base.update(kw)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**base))
    model.init_weights(seed=0)
    return model.eval()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2, top_k=1), dict(n_experts=6, top_k=3, renorm_gates=False),
                                dict(top_k=4)])
def test_fused_step_matches_model(kw):
    model = _model(**kw)
    kv = PagedKVCache(model.cfg, num_blocks=40, block_size=BS, device="cpu", dtype=torch.float32)
    runner = ModelRunner(model, kv, max_model_len=64, max_num_seqs=8, cuda_graphs=False)
    g = torch.Generator().manual_seed(1)
    lens = [5, 1, 12, 8]
    reqs, nxt = [], 1
    for L in lens:  # prefill through the model path
        r = SimpleNamespace(blocks=list(range(nxt, nxt + 4)))
        nxt += 4
        runner.forward_chunks([(r, 0, torch.randint(0, 80, (L,), generator=g).tolist())])
        reqs.append(r)
    toks = torch.randint(0, 80, (len(lens),), generator=g)
    k0, v0 = kv.k.clone(), kv.v.clone()
    ref = runner.forward_chunks([(r, L, [int(t)]) for r, L, t in zip(reqs, lens, toks)])  # [B, vocab]
    k_ref, v_ref = kv.k.clone(), kv.v.clone()
    kv.k.copy_(k0)
    kv.v.copy_(v0)

    fused = FusedDecoder(model, kv.k, kv.v)
    tables = torch.zeros(len(lens), runner.max_blocks, dtype=torch.int32)
    for i, r in enumerate(reqs):
        tables[i, :len(r.blocks)] = torch.tensor(r.blocks)
    out = fused(toks, torch.tensor(lens), torch.tensor([r.blocks[L // BS] * BS + L % BS for r, L in zip(reqs, lens)]),
                tables, torch.tensor(lens, dtype=torch.int32) + 1)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv.k, k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv.v, v_ref, rtol=1e-5, atol=1e-5)
    # the fused QKV weight is shared with the modules: the model path still gives the same logits
    kv.k.copy_(k0)
    kv.v.copy_(v0)
    again = runner.forward_chunks([(r, L, [int(t)]) for r, L, t in zip(reqs, lens, toks)])
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    # the graph path: inputs staged as int32 rows [token, position, slot, length, table] reach the
    # fused step as they reach the model path
    kv.k.copy_(k0)
    kv.v.copy_(v0)
    buf = runner._graph_inputs(len(lens))
    h = buf["stage"].numpy()
    runner.stage_rows(h, [(SimpleNamespace(blocks=r.blocks), L, int(t)) for r, L, t in zip(reqs, lens, toks)])
    runner.fused = fused
    torch.testing.assert_close(runner._run_static(buf), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv.k, k_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("use_dot", [True, False])
def test_norm_linear_against_float64(use_dot, split_k):
    """Each split of K writes its partial sums; the last to arrive adds them in a fixed order."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 70, generator=g)
    w = torch.randn(50, 70, generator=g)
    gamma = torch.rand(70, generator=g) + 0.5
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
    torch.testing.assert_close(norm_linear(x, w, gamma, use_dot=use_dot, split_k=split_k).double(), normed @ w.double().T, rtol=1e-4, atol=1e-4)
    acc = torch.randn(3, 50, generator=g)
    expect = acc.double() + xd @ w.double().T
    norm_linear(x, w, out=acc, accumulate=True, use_dot=use_dot, split_k=split_k)
    torch.testing.assert_close(acc.double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_experts_against_float64(split_k):
    """The chosen experts' kernels with their splits reduced by the last program to arrive: 20 rows
    over 3 experts (one expert unchosen, one with its rows over two tiles of 16) against a
    float64 per-assignment loop."""
    g = torch.Generator().manual_seed(split_k)
    B, K, F, D, topk = 20, 40, 72, 40, 2
    xn = torch.randn(B, K, generator=g)
    w1, w3 = torch.randn(4, K, F, generator=g) / 6, torch.randn(4, K, F, generator=g) / 6
    w2 = torch.randn(4, F, D, generator=g) / 8
    ids = torch.stack([torch.full((B,), 0), torch.arange(B) % 2 + 1], 1).int()  # expert 3 unchosen
    gates = torch.rand(B, topk, generator=g)
    out0 = torch.randn(B, D, generator=g)
    h = expert_up(xn, ids, w1, w3, split_k=split_k)
    out = out0.clone()
    expert_down(h, ids, gates, w2, out, split_k=split_k)
    ref_h = torch.zeros(B * topk, F, dtype=torch.float64)
    ref = out0.double().clone()
    for b in range(B):
        for j in range(topk):
            e = int(ids[b, j])
            a1, a3 = xn[b].double() @ w1[e].double(), xn[b].double() @ w3[e].double()
            ref_h[b * topk + j] = torch.nn.functional.silu(a1) * a3
            ref[b] += gates[b, j].double() * (ref_h[b * topk + j] @ w2[e].double())
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_experts_launch_only_the_chosen():
    """Fewer assignments than experts: the grid has a row of programs per assignment (here 4 for 8
    experts), each serving the next-lowest chosen expert (2, then 5), the rest none; a padding row
    (expert ids -1) is left as it was. Against a float64 per-assignment loop."""
    g = torch.Generator().manual_seed(0)
    K, F, D, E = 40, 72, 40, 8
    xn = torch.randn(2, K, generator=g)
    w1, w3 = torch.randn(E, K, F, generator=g) / 6, torch.randn(E, K, F, generator=g) / 6
    w2 = torch.randn(E, F, D, generator=g) / 8
    ids = torch.tensor([[5, 2], [-1, -1]], dtype=torch.int32)
    gates = torch.tensor([[0.7, 0.3], [0.0, 0.0]])
    out0 = torch.randn(2, D, generator=g)
    out = out0.clone()
    expert_down(expert_up(xn, ids, w1, w3), ids, gates, w2, out)
    x = xn[0].double()
    ref = out0[0].double() + sum(float(gates[0, j]) * ((torch.nn.functional.silu(x @ w1[e].double()) * (x @ w3[e].double()))
                                                       @ w2[e].double()) for j, e in enumerate((5, 2)))
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[1], out0[1])


@pytest.mark.parametrize("Hkv", [1, 2])
def test_paged_attention_merges_its_splits(Hkv):
    """Paged decode attention with the context over several splits (the last program of a row's
    KV head merges them), chunks of 16 to 64 tokens gathered across pages and up to three chunks
    a split, against a float64 gather-and-attend reference; contexts from one token to the whole
    table, blocks scattered."""
    from moekit.infer.paged_attention import paged_decode_reference
    from moekit.infer.triton_paged import paged_decode_triton

    g = torch.Generator().manual_seed(Hkv)
    B, H, hd, page, max_pages = 5, 4, 16, 4, 9
    kc = torch.randn(B * max_pages + 1, page, Hkv, hd, generator=g)
    vc = torch.randn(B * max_pages + 1, page, Hkv, hd, generator=g)
    tables = (torch.randperm(B * max_pages, generator=g) + 1).view(B, max_pages).int()
    lens = torch.tensor([1, 4, 5, 17, page * max_pages], dtype=torch.int32)
    q = torch.randn(B, H, hd, generator=g)
    ref = paged_decode_reference(q.double(), kc.double(), vc.double(), tables.long(), lens)
    for tokens, splits in ((16, 64), (16, 1), (32, 2), (64, 64)):  # 1 ... 3 chunks a split, chunks over pages
        out = paged_decode_triton(q, kc, vc, tables, lens, tokens_per_chunk=tokens, max_splits=splits)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out = paged_decode_triton(q, kc, vc, tables, torch.tensor([0, 3, 0, 1, 2], dtype=torch.int32))
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))  # an empty row (padding): zeros


@pytest.mark.parametrize("H,Hkv,hd,split_k", [(3, 1, 20, 1), (2, 2, 64, 2), (4, 1, 16, 3)])
def test_rope_in_the_qkv_projection_against_float64(H, Hkv, hd, split_k):
    """The QKV projection with the rotary embedding and the K/V store at its end, against float64:
    RMSNorm, projection, rotate-half on q and k at each row's position, q into its buffer and k, v
    into each row's cache slot; tiles of 32 columns across head boundaries (hd 20, 100 columns),
    within a head (hd 64), or over two heads (hd 16); other slots untouched."""
    g = torch.Generator().manual_seed(hd)
    B, K, slots_total = 3, 40, 12
    N = (H + 2 * Hkv) * hd
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g)
    gamma = torch.rand(K, generator=g) + 0.5
    pos = torch.tensor([0, 5, 17])
    slots = torch.tensor([7, 2, 11])
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(32, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, 1), torch.cat([ang.sin()] * 2, 1)  # [32, hd], rotate-half layout
    q = torch.zeros(B, H, hd)
    kc, vc = torch.zeros(slots_total, Hkv, hd), torch.zeros(slots_total, Hkv, hd)
    assert norm_linear(x, w, gamma, split_k=split_k, rope=(pos, cos.float(), sin.float(), slots, q, kc, vc, H, Hkv)) is None

    xd = x.double()
    qkv = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()) @ w.double().T
    qkv = qkv.view(B, H + 2 * Hkv, hd)
    c, s_ = cos[pos][:, None], sin[pos][:, None]

    def rot(t):
        return t * c + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * s_

    torch.testing.assert_close(q.double(), rot(qkv[:, :H]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kc[slots].double(), rot(qkv[:, H:H + Hkv]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vc[slots].double(), qkv[:, H + Hkv:], rtol=1e-4, atol=1e-4)
    others = torch.ones(slots_total, dtype=torch.bool)
    others[slots] = False
    assert not kc[others].any() and not vc[others].any()


def _step_on_a_random_cache(model, seed: int, lens: list[int], toks: list[int], slots: list[int]):
    """One fused decode step over a cache of 12 blocks of random K/V (float32), request i (of up to 3)
    on blocks 3i+1 ... 3i+3: (logits, K cache, V cache)."""
    kv = PagedKVCache(model.cfg, num_blocks=12, block_size=BS, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    tables = torch.arange(1, 3 * len(lens) + 1, dtype=torch.int32).view(len(lens), 3)
    lens_t = torch.tensor(lens)
    logits = FusedDecoder(model, kv.k, kv.v)(torch.tensor(toks), lens_t, torch.tensor(slots), tables, lens_t.int() + 1)
    return logits, kv.k.clone(), kv.v.clone()


def test_a_step_from_staged_rows_is_the_step_from_unpacked_ones():
    """FusedDecoder.from_stage (the graphs' input rows, the embedding lookup and its cast in one
    kernel) against __call__ on the same rows unpacked by hand: the same logits and cache, bit
    for bit (float32)."""
    model = _model(n_kv_heads=2)
    lens, toks, slots = [6, 11, 2], [3, 9, 1], [2 * BS + 2, 6 * BS + 3, 7 * BS + 2]
    ref = _step_on_a_random_cache(model, 5, lens, toks, slots)
    kv = PagedKVCache(model.cfg, num_blocks=12, block_size=BS, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    tables = torch.arange(1, 10, dtype=torch.int32).view(3, 3)
    stage = torch.cat([torch.tensor([toks, lens, slots, [n + 1 for n in lens]], dtype=torch.int32).T, tables], 1)
    logits = FusedDecoder(model, kv.k, kv.v).from_stage(stage)
    for a, b in zip(ref, (logits, kv.k, kv.v)):
        assert torch.equal(a, b)


def test_staged_tokens_from_the_step_before():
    """A staged token -1 - j is row j of the previous step's greedy tokens (the decode graphs feed
    a step's argmax to the next step on the device): the same logits as staging the tokens."""
    model = _model()
    kv = PagedKVCache(model.cfg, num_blocks=12, block_size=BS, device="cpu", dtype=torch.float32)
    tables = torch.arange(1, 10, dtype=torch.int32).view(3, 3)
    prev = torch.tensor([40, 7, 63, 0], dtype=torch.int32)
    meta = torch.tensor([[0, 5, 1 * BS + 1, 6], [0, 2, 4 * BS + 2, 3], [0, 9, 9 * BS + 1, 10]], dtype=torch.int32)
    fused = FusedDecoder(model, kv.k, kv.v)
    outs = []
    for toks in ([-3, 11, -1], [63, 11, 40]):  # rows 2 and 0 of the step before, and a literal token
        stage = torch.cat([meta, tables], 1)
        stage[:, 0] = torch.tensor(toks)
        outs.append(fused.from_stage(stage, prev=prev))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("V,block", [(1000, 128), (96, 32), (80, 128)])
def test_argmax_kernel_is_torch_argmax(V, block):
    """The decode graphs' greedy tokens (triton_argmax, the vocabulary split over programs) against
    torch.argmax: ties across blocks (the first index wins), a row of -inf, a NaN (counts as
    largest, even after a +inf), +inf ties, two NaNs."""
    from moekit.infer.triton_argmax import _argmax_rows

    x = torch.randn(8, V, generator=torch.Generator().manual_seed(V))
    x[2, 10] = x[2, V - 3] = 100.0
    x[3] = float("-inf")
    x[4, 7] = float("nan")
    x[5, 3], x[5, V - 5] = float("inf"), float("nan")
    x[6, V - 2] = x[6, 1] = float("inf")
    x[7, V - 1] = x[7, V // 2] = float("nan")
    S = -(-V // block)
    sp = 1 << (S - 1).bit_length()
    out, sem = torch.full((10,), -7, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    _argmax_rows[(8, S)](x, x.stride(0), out, torch.empty(8, sp), torch.empty(8, sp, dtype=torch.int32), sem, V,
                         BV=block, SP=sp, PDL=False)
    assert out[:8].tolist() == x.argmax(-1).tolist() and out[8:].eq(-7).all()
    assert sem.eq(0).all()  # the counters are left at zero for the next launch


@pytest.mark.parametrize("steps", [1, 3])
def test_lookahead_on_the_fused_step(steps):
    """Greedy decoding ahead on the fused step (eager stand-ins for CUDA graphs, the kernels in the
    interpreter): each graph takes its tokens from the argmax the graph before wrote on the device,
    `steps` steps to a graph where every request has room for them, rows move as requests finish
    (by length, or on a stop token in the middle of a graph's steps), and the output equals reading
    every step."""
    from moekit.infer.engine import Engine, EngineConfig
    from moekit.infer.sampling import SamplingParams

    model = _model()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 80, (n,), generator=g).tolist() for n in (3, 9, 5, 4)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 3, 13, 12)]

    def run(lookahead: bool, params) -> list:
        eng = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, max_num_seqs=4, lookahead=lookahead,
                                               decode_steps=steps))
        eng.runner.graph_sizes = [1, 2, 4]  # as on a GPU
        eng.runner.fused = FusedDecoder(model, eng.kv.k, eng.kv.v)
        out = eng.generate(prompts, params)
        assert eng.kv.allocator.num_free == eng.kv.allocator.num_blocks - 1  # every block back (but the scratch one)
        return eng, [(o.output_token_ids, o.finish_reason) for o in out]

    ref = run(False, params)[1]
    stop = ref[3][0][7]  # the last request stops on the 8th token it reaches
    params[3] = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop])
    ref = run(False, params)[1]
    eng, out = run(True, params)
    assert out == ref and [len(o) for o, _ in out[:3]] == [6, 3, 13] and out[3][1] == "stop"
    assert eng.lookahead_steps > 0
    assert (len(eng.runner.multi_graphs) > 0) == (steps > 1)
def test_rope_in_the_projection_gives_the_separate_kernels_bits(monkeypatch):
    """A decode step with the rotary embedding in the QKV projection and with its own kernel:
    the same logits and cache, bit for bit (float32)."""
    import moekit.infer.fused_decode as fd

    model = _model(n_kv_heads=2)
    results = []
    for fused_rope in (True, False):
        monkeypatch.setattr(fd, "FUSED_ROPE", fused_rope)
        results.append(_step_on_a_random_cache(model, 3, [6, 11], [3, 9], [2 * BS + 2, 6 * BS + 3]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _three_rows_both_ways(monkeypatch, model, module, flag: str) -> list:
    """(logits, cache) of a 3-row decode step on a random cache with module.flag on, then off."""
    results = []
    for on in (True, False):
        monkeypatch.setattr(module, flag, on)
        results.append(_step_on_a_random_cache(model, 4, [6, 11, 2], [3, 9, 1], [2 * BS + 2, 6 * BS + 3, 7 * BS + 2]))
    return results


def test_routing_in_the_output_projection_matches_its_own_kernel(monkeypatch):
    """A decode step of 3 rows with the routing at the end of the output projection and in a kernel
    of its own: the same logits (float32) and cache."""
    from moekit.infer import triton_route

    results = _three_rows_both_ways(monkeypatch, _model(n_experts=6, top_k=2), triton_route, "ROUTE_IN_WO")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_attention_in_the_output_projection_matches_the_two_kernels(monkeypatch):
    """A decode step of 3 rows with attention computed inside the output projection
    (MOEKIT_ATTN_IN_WO) and with the paged attention kernel followed by the projection: the same
    logits (float32) and cache."""
    from moekit.infer import triton_attn_wo

    results = _three_rows_both_ways(monkeypatch, _model(n_kv_heads=2), triton_attn_wo, "ATTN_IN_WO")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Hkv,tokens,block_n", [(1, 16, 32), (2, 32, 16), (4, 16, 64)])
def test_attention_times_the_output_projection_against_float64(Hkv, tokens, block_n):
    """triton_attn_wo.attn_wo: residual + attention(q over each row's pages) @ wo.T against a float64
    gather-and-attend reference, contexts from none (a padding row adds nothing) to the whole table
    over chunks of 16 or 32 tokens, output columns over several blocks (the last one partial)."""
    from moekit.infer.paged_attention import paged_decode_reference
    from moekit.infer.triton_attn_wo import attn_wo

    g = torch.Generator().manual_seed(Hkv)
    B, H, hd, page, max_pages, N = 5, 4, 16, 4, 9, 72
    kc = torch.randn(B * max_pages + 1, page, Hkv, hd, generator=g)
    vc = torch.randn(B * max_pages + 1, page, Hkv, hd, generator=g)
    tables = (torch.randperm(B * max_pages, generator=g) + 1).view(B, max_pages).int()
    lens = torch.tensor([0, 4, 5, 17, page * max_pages], dtype=torch.int32)
    q = torch.randn(B, H, hd, generator=g)
    wo = torch.randn(N, H * hd, generator=g) / 8
    x0 = torch.randn(B, N, generator=g)
    y = paged_decode_reference(q.double(), kc.double(), vc.double(), tables.long(), lens)
    y[0] = 0  # no context: the reference's softmax over nothing is not a number
    ref = x0.double() + y.reshape(B, H * hd) @ wo.double().T
    x = x0.clone()
    attn_wo(q, kc, vc, tables, lens, wo, x, block_n=block_n, tokens_per_chunk=tokens)
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(x[0], x0[0])


def _route_ref(x: torch.Tensor, gamma: torch.Tensor, wr: torch.Tensor, topk: int):
    xd = x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.double()
    top, top_ids = torch.softmax(xn @ wr.double().T, -1).topk(topk, -1)
    return xn, top_ids, top / top.sum(-1, keepdim=True)


@pytest.mark.parametrize("bk", [16, 64])
def test_route_against_float64(bk):
    """RMSNorm + router + softmax + top-2 with renormalised gates, in one tile (bk = d) or over
    several: the normed rows, the chosen experts and their gates against float64; a padding row
    (K/V slot 0) chooses no expert."""
    from moekit.infer.triton_route import _route

    g = torch.Generator().manual_seed(bk)
    B, d, E, topk = 6, 64, 5, 2
    x, gamma, wr = torch.randn(B, d, generator=g), torch.rand(d, generator=g) + 0.5, torch.randn(E, d, generator=g)
    xn = torch.empty(B, d)
    ids, gates = torch.empty(B, topk, dtype=torch.int32), torch.empty(B, topk)
    slots = torch.tensor([4, 5, 0, 6, 7, 8])  # row 2 pads
    _route[(B,)](x, gamma, wr, xn, ids, gates, slots, d, E, 1e-5, x.stride(0), EP=8, BK=bk, TOPK=topk, RENORM=True,
                 PDL=False)
    ref_xn, ref_ids, ref_gates = _route_ref(x, gamma, wr, topk)
    torch.testing.assert_close(xn.double(), ref_xn, rtol=1e-5, atol=1e-5)
    real = slots != 0
    assert torch.equal(ids[real].long(), ref_ids[real]) and (ids[~real] == -1).all() and (gates[~real] == 0).all()
    torch.testing.assert_close(gates[real].double(), ref_gates[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_k", [1, 3])
def test_output_projection_routes_its_rows(split_k):
    """Routing at the end of the output projection (MOEKIT_ROUTE_IN_WO): the last program to finish
    a block of 16 residual rows routes them, so 20 rows are two blocks. The residual, the normed
    rows, the chosen experts and their gates against float64; a padding row chooses no expert."""
    from moekit.infer.triton_route import route_args

    g = torch.Generator().manual_seed(split_k)
    B, K, d, E, topk = 20, 48, 64, 5, 2
    y, wo = torch.randn(B, K, generator=g), torch.randn(d, K, generator=g) / 4
    x0 = torch.randn(B, d, generator=g)
    gamma, wr = torch.rand(d, generator=g) + 0.5, torch.randn(E, d, generator=g)
    xn, ids, gates = torch.empty(B, d), torch.empty(B, topk, dtype=torch.int32), torch.empty(B, topk)
    slots = torch.arange(1, B + 1)
    slots[17] = 0  # padding
    x = x0.clone()
    norm_linear(y, wo, out=x, accumulate=True, split_k=split_k,
                route=route_args(x, gamma, wr, xn, ids, gates, slots, 1e-5, True))
    torch.testing.assert_close(x.double(), x0.double() + y.double() @ wo.double().T, rtol=1e-5, atol=1e-5)
    ref_xn, ref_ids, ref_gates = _route_ref(x, gamma, wr, topk)
    torch.testing.assert_close(xn.double(), ref_xn, rtol=1e-5, atol=1e-5)
    real = slots != 0
    assert torch.equal(ids[real].long(), ref_ids[real]) and (ids[~real] == -1).all() and (gates[~real] == 0).all()
    torch.testing.assert_close(gates[real].double(), ref_gates[real], rtol=1e-5, atol=1e-5)


def test_routing_projection_refuses_more_row_blocks_than_its_counters():
    """Without tensor cores a block is one row: 80 rows would overrun the 64 routing counters, and
    the projection says so instead of writing past them."""
    from moekit.infer.triton_route import route_args

    B, d = 80, 32
    x = torch.zeros(B, d)
    args = route_args(x, torch.ones(d), torch.ones(4, d), torch.empty(B, d), torch.empty(B, 2, dtype=torch.int32),
                      torch.empty(B, 2), torch.arange(1, B + 1), 1e-5, True)
    with pytest.raises(ValueError, match="routing in the projection covers 64 blocks"):
        norm_linear(torch.zeros(B, 16), torch.zeros(d, 16), out=x, accumulate=True, use_dot=False, route=args)


def test_a_rows_logits_do_not_depend_on_the_batch():
    """Batch invariance: a request's logits and K/V are the same bits decoded alone or among
    other rows (what makes speculative verification reproduce one-row decoding exactly), padding
    rows (slot 0 of the scratch block, which choose no expert) included."""
    model = _model()
    kv = PagedKVCache(model.cfg, num_blocks=20, block_size=BS, device="cpu", dtype=torch.float32)
    runner = ModelRunner(model, kv, max_model_len=64, max_num_seqs=4, cuda_graphs=False)
    reqs = [SimpleNamespace(blocks=[1 + 4 * i + j for j in range(4)]) for i in range(3)]
    lens = [6, 11, 3]
    for r, L in zip(reqs, lens):
        runner.forward_chunks([(r, 0, [(7 * L + i) % 80 for i in range(L)])])
    fused = FusedDecoder(model, kv.k, kv.v)
    tables = torch.tensor([r.blocks for r in reqs], dtype=torch.int32)

    def step(idx, pad=0):
        return fused(torch.tensor([5 + i for i in idx] + [0] * pad), torch.tensor([lens[i] for i in idx] + [0] * pad),
                     torch.tensor([reqs[i].blocks[lens[i] // BS] * BS + lens[i] % BS for i in idx] + [0] * pad),
                     torch.cat([tables[idx], torch.zeros(pad, tables.shape[1], dtype=torch.int32)]),
                     torch.tensor([lens[i] + 1 for i in idx] + [1] * pad, dtype=torch.int32))

    alone = step([0])
    k_alone = kv.k.clone()
    batched = step([2, 0, 1])
    assert torch.equal(batched[1], alone[0])
    assert torch.equal(kv.k[:, reqs[0].blocks[1]], k_alone[:, reqs[0].blocks[1]])
    padded = step([0, 1], pad=2)
    assert torch.equal(padded[0], alone[0]) and torch.equal(padded[1], batched[2]) and padded.isfinite().all()


def test_unsupported_models_are_named():
    assert unsupported_reason(_model()) is None
    assert "shared" in unsupported_reason(_model(shared_expert_ffn=32))
    assert "QK-norm" in unsupported_reason(_model(qk_norm=True))
    assert "dense" in unsupported_reason(_model(n_experts=1, top_k=1))
    assert "float64" in unsupported_reason(_model().double())  # the kernels accumulate in float32
    with pytest.raises(ValueError, match="fused decode"):
        FusedDecoder(_model(qk_norm=True), None, None)


def test_fused_qkv_follows_replaced_weights():
    model = _model()
    kv = PagedKVCache(model.cfg, 8, 4, "cpu", torch.float32)
    runner = ModelRunner(model, kv, max_model_len=16, max_num_seqs=2, cuda_graphs=False)
    fused = FusedDecoder(model, kv.k, kv.v)  # what ModelRunner builds on GPU
    # new weights arrive after the engine was built (e.g. a reload), assigned rather than copied
    new = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)

    r = SimpleNamespace(blocks=[1, 2])
    toks = [3, 7, 11]
    runner.forward_chunks([(r, 0, toks)])
    k0, v0 = kv.k.clone(), kv.v.clone()
    ref = runner.forward_chunks([(r, 3, [5])])
    kv.k.copy_(k0)
    kv.v.copy_(v0)
    tables = torch.tensor([[1, 2, 0, 0]], dtype=torch.int32)
    out = fused(torch.tensor([5]), torch.tensor([3]), torch.tensor([1 * 4 + 3]), tables,
                torch.tensor([4], dtype=torch.int32))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_prompt_lookup_verification_graphs_on_the_fused_step():
    """The GPU path of speculative verification, run here with eager stand-ins for CUDA graphs and
    the kernels in the interpreter: 3 requests x (5 + 1) rows replay an exact-size verification
    graph of the fused step, and greedy output equals plain decoding."""
    from moekit.infer.engine import Engine, EngineConfig
    from moekit.infer.sampling import SamplingParams

    model = _model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 80, (3,), generator=g).tolist() * 3 for _ in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)).generate(prompts, params)
    eng = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, num_speculative_tokens=5,
                                           prompt_lookup_max=2, max_num_seqs=3))
    eng.runner.graph_sizes = [1, 2, 4, 8, 16, 32]  # as on a GPU
    eng.runner.fused = FusedDecoder(model, eng.kv.k, eng.kv.v)
    out = eng.generate(prompts, params)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]
    assert 18 in eng.runner.verify_graphs and eng.spec.stats.proposed > 0


def test_draft_with_prompt_lookup_on_the_step_graphs(monkeypatch):
    """The GPU path of a draft with prompt lookup, one request at a time, with eager stand-ins for
    CUDA graphs and the kernels in the interpreter: lookup steps verify on exact-size graphs of the
    fused step and bring the draft up to date, so every drafting step replays the single step
    graph (the general path's catch-up never runs), and greedy output equals plain decoding."""
    from moekit.infer.engine import Engine, EngineConfig
    from moekit.infer.sampling import SamplingParams
    from moekit.infer.speculative import SpeculativeDecoder

    model, draft = _model(), _model(n_layers=1, ffn_dim=64)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 80, (3,), generator=g).tolist() * 3, torch.randint(0, 80, (7,), generator=g).tolist()]
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    ref = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)).generate(prompts, params)
    eng = Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS, num_speculative_tokens=3,
                                           prompt_lookup_max=2, prompt_lookup_min=1, max_num_seqs=1), draft=draft)
    for runner, m, kv in ((eng.runner, model, eng.kv), (eng.spec.runner, draft, eng.spec.kv)):
        runner.graph_sizes = [1, 2, 4, 8, 16, 32]  # as on a GPU
        runner.fused = FusedDecoder(m, kv.k, kv.v)
    general = []
    real = SpeculativeDecoder._catch_up
    monkeypatch.setattr(SpeculativeDecoder, "_catch_up", lambda self, reqs: general.append(1) or real(self, reqs))
    out = eng.generate(prompts, params)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in ref]
    st = eng.spec.stats
    assert 1 in eng.spec.step_graphs and 0 < st.lookup_steps < st.steps and not general
