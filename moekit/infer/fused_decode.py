"""Fused small-batch decode step in Triton: six kernels per MoE layer, each reading its weights
once, so a decode step is bound by memory bandwidth rather than by kernel launches.

Per layer, with the residual stream kept in float32 [B, d]:
  1. RMSNorm + fused QKV projection, and at its end the rotary embedding of q and k and the
     store of k, v into their slots                       (_norm_linear with ROPE; triton_rope;
     MOEKIT_FUSED_ROPE=0: a second kernel, _rope_store)
  3. paged attention                                     (triton_paged: split + merge)
  4. output projection added into the residual           (_norm_linear; MOEKIT_ATTN_IN_WO=1: 3 and
                                                          4 in one kernel, triton_attn_wo)
  5. RMSNorm + router + softmax + top-k (+ renormalise)  (triton_route; MOEKIT_ROUTE_IN_WO=1: at
     the end of kernel 4)
  6. the chosen experts' gate and up projections, SiLU   (triton_experts._expert_up)
  7. the chosen experts' down projections, gate-weighted and added into the residual
                                                         (triton_experts._expert_down)
The final norm + LM head is kernel 1 again. Every kernel takes only device tensors and reads no
value on the host, so the whole step is captured in one CUDA graph. A kernel that splits its
reduction over programs (shares of K) has the last program of each tile to arrive add the shares
in a fixed order (triton_sync.last_to_arrive); no value is added atomically, and each kernel is
tuned once per weight shape, not per batch: a row's logits are the same bits whatever else is in
the batch
(speculative verification of k + 1 rows per request reproduces one-row decoding while its rows
stay on the fused step, runner.FUSED_MAX_VERIFY).

The plain model forward is the reference; tests hold the two equal (Triton's interpreter runs
these kernels on CPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.infer.triton_sync import (MAX_TILES, TUNE_KW as _TUNE, gdc, last_to_arrive, pdl_kw, prefetch_tile as _prefetch_tile,
                                     quick, restore as _restore, tile_counters)
from moekit.infer.triton_experts import (_expert_down, _expert_down_tuned, _expert_up, _expert_up_tuned,  # noqa: F401
                                         expert_down, expert_up)
from moekit.infer.triton_paged import paged_decode_triton
from moekit.infer.triton_rope import _rope_finish, _rope_row, _rope_store, _rope_trig
from moekit.infer import triton_attn_wo, triton_route
from moekit.infer.triton_route import _route_block

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the expert down projection of each layer, once its own work is done, asks L2 for the next layer's
# attention weights (QKV, output projection; the LM head's start after the last layer), and the
# experts stream their weights with evict-first loads so that what was fetched stays: the small,
# latency-bound attention kernels then read from L2 (MOEKIT_PREFETCH_NEXT=1: on)
PREFETCH_NEXT = os.environ.get("MOEKIT_PREFETCH_NEXT", "0") != "0"
# each weight-reading kernel, once placed beside the kernel before it (programmatic dependent
# launch), asks L2 for the first of its own weights before it waits for that kernel: the fetch
# overlaps the previous kernel's tail instead of following it (MOEKIT_PREFETCH_SELF=1: on)
PREFETCH_SELF = os.environ.get("MOEKIT_PREFETCH_SELF", "0") != "0"
# each projection program loads its weights' first block into registers before it waits for the
# kernel before it (MOEKIT_PRELOAD_FIRST=0: after)
PRELOAD_FIRST = os.environ.get("MOEKIT_PRELOAD_FIRST", "1") != "0"
PRE_COLS, PRE_ROWS = 1024, 256  # how much: columns of K per projection program, rows of F per expert program
# the rotary embedding and K/V store at the end of the QKV projection (MOEKIT_FUSED_ROPE=0: a
# kernel of their own, one launch more per layer)
FUSED_ROPE = os.environ.get("MOEKIT_FUSED_ROPE", "1") != "0"


# -- 1/4: (RMSNorm +) linear, W in nn.Linear layout [N, K] -----------------------------------------
@triton.jit
def _finish(acc, ss, rows, n, rmask, nmask, out_ptr, K, eps, stride_ob, NORM: tl.constexpr, ACCUM: tl.constexpr,
            w_ptr, trig, q_ptr, k_ptr, v_ptr, n0, N, BM: tl.constexpr, BN: tl.constexpr,
            ROPE: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr):
    if NORM:
        acc = acc / tl.sqrt(ss / K + eps)[:, None]
    if ROPE:  # rounded as the stored projection (in the weights' dtype) would be
        c, s, slot = trig
        _rope_finish(acc.to(w_ptr.dtype.element_ty).to(tl.float32), rows, n0, rmask, N, c, s, slot,
                     q_ptr, k_ptr, v_ptr, BM, BN, H, HKV, HALF)
    else:
        optr = out_ptr + rows[:, None] * stride_ob + n[None, :]
        omask = rmask[:, None] & nmask[None, :]
        if ACCUM:
            acc += tl.load(optr, mask=omask, other=0.0)
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _linear_block(acc, ss, x_ptr, g_ptr, rows, rmask, stride_xb, k0, K, w, NORM: tl.constexpr, USE_DOT: tl.constexpr,
                  IEEE: tl.constexpr, BK: tl.constexpr):
    """acc += f(x)[rows, k0 ... k0 + BK] @ w.T for the weights' block w [BN, BK]; ss += the
    block's sums of squares (NORM: x scaled by the norm's weights g, the RMS applied at the end)."""
    kk = k0 + tl.arange(0, BK)
    kmask = kk < K
    xk = tl.load(x_ptr + rows[:, None] * stride_xb + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                 other=0.0).to(tl.float32)
    if NORM:  # RMSNorm(x) g @ w = rstd * ((x g) @ w): one pass, rstd applied at the end
        ss += tl.sum(xk * xk, 1)
        xk = xk * tl.load(g_ptr + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
    if USE_DOT:  # tensor cores on rows padded to BM >= 16
        if IEEE:  # float32 weights: full precision, not TF32
            acc += tl.dot(xk.to(w.dtype), tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
        else:
            acc += tl.dot(xk.to(w.dtype), tl.trans(w), out_dtype=tl.float32)
    else:  # a few rows: multiply and reduce in registers
        xr = xk.to(w.dtype).to(tl.float32)
        acc += tl.sum(xr[:, None, :] * w.to(tl.float32)[None, :, :], 2)
    return acc, ss


@triton.jit
def _norm_linear(x_ptr, g_ptr, w_ptr, out_ptr, part_ptr, sem_ptr, B, K, N, eps, stride_xb, stride_wn, stride_ob,
                 pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                 rg_ptr, rw_ptr, rxn_ptr, rids_ptr, rgates_ptr, rslots_ptr, rsem_ptr, RE, r_eps,
                 NORM: tl.constexpr, ACCUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                 PDL: tl.constexpr, ROPE: tl.constexpr = False, H: tl.constexpr = 1, HKV: tl.constexpr = 1, HALF: tl.constexpr = 1,
                 ROUTE: tl.constexpr = False, EP: tl.constexpr = 2, RBK: tl.constexpr = 16, TOPK: tl.constexpr = 1,
                 RENORM: tl.constexpr = False, PRE: tl.constexpr = 0, PRELOAD: tl.constexpr = False):
    """out[b, n] (+)= sum_k f(x)[b, k] w[n, k], f = RMSNorm(weight g) when NORM. All rows of a BM
    block share each weight tile (tl.dot on rows padded to BM). ACCUM adds into out; otherwise
    out is overwritten.

    Program (block of rows, block of N, share of K). With SPLIT_K > 1 each program writes its
    share's partial sums (and sums of squares) to part_ptr and counts itself in sem_ptr[tile];
    the last of a tile's SPLIT_K programs to arrive adds the shares in the order 0 ... SPLIT_K - 1
    (whoever arrives last, the same sum: deterministic) and resets the count. One launch, no
    atomically added values.

    ROPE (the fused QKV projection of H query and HKV key/value heads of 2 HALF): the columns come
    in rotary pairs (triton_rope._rope_row) and the tile's finish rotates them and writes q, k and
    v (pos_ptr ... v_ptr) instead of out.

    ROUTE (the output projection, ACCUM into the residual out): the last program to finish a tile
    of a block of rows routes those rows (triton_route._route_block; rg_ptr ... r_eps: the
    routing's norm and router weights, outputs, the rows' K/V slots, its counters)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < B
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    wn = _rope_row(n, H + HKV, HALF) if ROPE else n  # the weight row of each column
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * k_per
    if PRE > 0:  # the first PRE columns of this program's weight rows, while the previous kernel runs
        for k0 in range(k_lo, tl.minimum(tl.minimum(k_lo + k_per, K), k_lo + PRE), BK):
            _prefetch_tile(w_ptr, wn, k0, stride_wn, N, K, 64, BK // 64)
    trig = (0.0, 0.0, 0)
    if ROPE:  # the rotation's inputs are not the previous kernel's: loaded before waiting for it
        trig = _rope_trig(rows, pid_n * BN, rmask, pos_ptr, cos_ptr, sin_ptr, slot_ptr, BN, H, HKV, HALF)
    if PRELOAD:  # the weights' first block, into registers while the previous kernel runs
        w_first = tl.load(w_ptr + wn[:, None] * stride_wn + (k_lo + tl.arange(0, BK))[None, :],
                          mask=nmask[:, None] & (k_lo + tl.arange(0, BK) < K)[None, :], other=0.0)
    gdc(PDL)
    acc = tl.zeros([BM, BN], tl.float32)
    ss = tl.zeros([BM], tl.float32)
    k_start = k_lo
    if PRELOAD:
        acc, ss = _linear_block(acc, ss, x_ptr, g_ptr, rows, rmask, stride_xb, k_lo, K, w_first, NORM, USE_DOT, IEEE, BK)
        k_start = k_lo + BK
    for k0 in range(k_start, tl.minimum(k_lo + k_per, K), BK):
        kk = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + wn[:, None] * stride_wn + kk[None, :], mask=nmask[:, None] & (kk < K)[None, :],
                    other=0.0)  # [BN, BK], rows contiguous
        acc, ss = _linear_block(acc, ss, x_ptr, g_ptr, rows, rmask, stride_xb, k0, K, w, NORM, USE_DOT, IEEE, BK)
    if SPLIT_K == 1:
        _finish(acc, ss, rows, n, rmask, nmask, out_ptr, K, eps, stride_ob, NORM, ACCUM, w_ptr,
                trig, q_ptr, k_ptr, v_ptr, pid_n * BN, N, BM, BN, ROPE, H, HKV, HALF)
        if ROUTE:
            _route_block(rsem_ptr, pid_m, tl.num_programs(1), out_ptr, rg_ptr, rw_ptr, rxn_ptr, rids_ptr, rgates_ptr,
                         rslots_ptr, B, N, RE, r_eps, stride_ob, EP, RBK, TOPK, RENORM, BM)
    else:
        mp = tl.num_programs(0) * BM  # part: [SPLIT_K, mp, N] sums, then [SPLIT_K, mp] sums of squares
        tl.store(part_ptr + (pid_k * mp + rows)[:, None] * N + n[None, :], acc, mask=rmask[:, None] & nmask[None, :])
        if NORM:
            tl.store(part_ptr + SPLIT_K * mp * N + pid_k * mp + rows, ss)
        if last_to_arrive(sem_ptr, pid_m * tl.num_programs(1) + pid_n, SPLIT_K):
            acc = tl.zeros([BM, BN], tl.float32)
            ss = tl.zeros([BM], tl.float32)
            for sk in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + (sk * mp + rows)[:, None] * N + n[None, :],
                               mask=rmask[:, None] & nmask[None, :], other=0.0, cache_modifier=".cg")
                if NORM:
                    ss += tl.load(part_ptr + SPLIT_K * mp * N + sk * mp + rows, cache_modifier=".cg")
            _finish(acc, ss, rows, n, rmask, nmask, out_ptr, K, eps, stride_ob, NORM, ACCUM, w_ptr,
                    trig, q_ptr, k_ptr, v_ptr, pid_n * BN, N, BM, BN, ROPE, H, HKV, HALF)
            if ROUTE:
                _route_block(rsem_ptr, pid_m, tl.num_programs(1), out_ptr, rg_ptr, rw_ptr, rxn_ptr, rids_ptr,
                             rgates_ptr, rslots_ptr, B, N, RE, r_eps, stride_ob, EP, RBK, TOPK, RENORM, BM)


def _linear_configs():  # BM = 16 throughout: norm_linear pads the partial sums' rows to 16
    """Tensor-core tiles, rows padded to 16: a row's result does not depend on the other rows of
    its tile, so one tuned tile per weight shape serves every batch size with the same numbers.
    Splits of K give a narrow weight (attention projections) enough programs to fill the GPU;
    the largest tiles also run with 8 warps (more loads in flight per program)."""
    configs = [triton.Config({"BM": 16, "BN": bn, "BK": bk, "USE_DOT": True, "SPLIT_K": sk}, num_warps=w, num_stages=4)
               for bn in (16, 32, 64, 128) for bk in (128, 256, 512) for sk in (1, 2, 4, 8)
               for w in ((4, 8) if bn * bk == 16384 else (4,)) if bn * bk <= 16384]
    # MOEKIT_TUNE=quick: one tile without a split of K and one with
    return quick(configs, lambda c: (c.kwargs["BN"], c.kwargs["BK"], c.kwargs["SPLIT_K"], c.num_warps) in
                 ((32, 128, 1, 4), (64, 128, 4, 4)))


def _prune_splits(configs, named_args, **kwargs):
    """Splits of K that leave each program at least one block of K; a wide weight (the LM head,
    whose columns fill the GPU) is split in two at most, to keep its partial sums small."""
    n, k = named_args["N"], named_args["K"]
    most = _SPLIT_MOST if n <= _SPLIT_MAX_N else _SPLIT_MOST_WIDE
    return [c for c in configs
            if c.kwargs["SPLIT_K"] == 1 or (c.kwargs["SPLIT_K"] <= most and k // c.kwargs["SPLIT_K"] >= c.kwargs["BK"])]


_SPLIT_MAX_N, _SPLIT_MOST, _SPLIT_MOST_WIDE = 16384, 8, 2


# tuned once per weight shape, not per batch size: the numbers of a row do not depend on the
# batch (speculative verification of k + 1 rows reproduces one-row decoding exactly). The timed
# call includes the reduction of the splits (it happens inside the kernel).
_tune = dict(key=["K", "N"], prune_configs_by={"early_config_prune": _prune_splits}, **_TUNE)
_norm_linear_store = triton.autotune(_linear_configs(), **_tune)(_norm_linear)
_norm_linear_accum = triton.autotune(_linear_configs(), **_restore("out_ptr"), **_tune)(_norm_linear)
# the fused QKV projection with the rotary embedding and the K/V store at its end; the timed call
# writes the same q, k and v each time
_norm_linear_rope = triton.autotune(_linear_configs(), **_tune)(_norm_linear)


def norm_linear(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor | None = None, eps: float = 1e-5,
                out: torch.Tensor | None = None, accumulate: bool = False, use_dot: bool = True,
                split_k: int = 2, rope: tuple | None = None, route: tuple | None = None) -> torch.Tensor | None:
    """x: [B, K]; w: [N, K] -> out [B, N] = (RMSNorm_g(x) if g is given else x) @ w.T, or
    out += x @ w.T when accumulate (out float32). use_dot and split_k pick the tile off the GPU
    (on the GPU the autotuner picks). rope = (pos, cos, sin, slots, q, k_cache, v_cache, H, HKV):
    w is a fused QKV weight, and its product is rotated and written to q and the cache slots
    instead (returns None). route = triton_route.route_args(out, ...): with accumulate, the
    projection then routes the rows of out it wrote."""
    B, K = x.shape
    N = w.shape[0]
    assert 1 <= split_k <= 8, "split_k: 1 ... 8 (the partial sums are sized for 8)"
    if out is None:
        out = torch.empty(B, N, device=x.device, dtype=w.dtype) if rope is None else x
    off_gpu = _INTERPRET or not x.is_cuda  # fixed tiles; on GPU the autotuner picks
    bm = 1 if off_gpu and not use_dot else 16  # every tuned config has BM = 16 (_linear_configs)
    # the most a tile is split into (sizes the partial sums)
    splits = split_k if off_gpu else (_SPLIT_MOST if N <= _SPLIT_MAX_N else _SPLIT_MOST_WIDE)
    mp = triton.cdiv(B, bm) * bm  # part rows: padded to whole row blocks
    part = torch.empty(splits * mp * (N + 1) if splits > 1 else 1, device=x.device, dtype=torch.float32)
    tiles = triton.cdiv(B, bm) * triton.cdiv(N, 16)
    if route is not None and (triton.cdiv(B, bm) > triton_route.BLOCKS or tiles > MAX_TILES - triton_route.BLOCKS):
        raise ValueError(f"routing in the projection covers {triton_route.BLOCKS} blocks of {bm} rows and "
                         f"{MAX_TILES - triton_route.BLOCKS} tiles, got {B} rows of {N}")
    sem = tile_counters(x.device, tiles)
    ptrs = rope[:7] if rope is not None else (x,) * 7
    rargs, rkw = route if route is not None else ((x,) * 7 + (0, 0.0), {})
    assert route is None or accumulate, "routing follows the projection that adds into the residual"
    args = (x, g if g is not None else x, w, out, part, sem, B, K, N, eps, x.stride(0), w.stride(0), out.stride(0),
            *ptrs, *rargs)
    kw = dict(NORM=g is not None, ACCUM=accumulate, IEEE=w.dtype == torch.float32, **rkw, **pdl_kw(x))
    if PREFETCH_SELF and kw["PDL"] and w.element_size() == 2:  # 64 elements to a 128-byte line
        kw["PRE"] = PRE_COLS
    kw["PRELOAD"] = PRELOAD_FIRST
    if rope is not None:
        pos, cos, _, slots, q, kc, vc, H, Hkv = rope
        hd = N // (H + 2 * Hkv)
        assert hd * (H + 2 * Hkv) == N and hd % 2 == 0, f"{N} columns are not {H} + 2 x {Hkv} heads of even size"
        assert cos.shape[-1] == hd and q.shape[1:] == (H, hd) and kc.shape[-2:] == vc.shape[-2:] == (Hkv, hd)
        assert pos.shape[0] == slots.shape[0] == B <= q.shape[0], "one position and slot per row"
        kw.update(ROPE=True, H=H, HKV=Hkv, HALF=hd // 2)
    if off_gpu:
        _norm_linear[(triton.cdiv(B, bm), triton.cdiv(N, 32), splits)](*args, **kw, BM=bm, BN=32, BK=32,
                                                                       USE_DOT=use_dot, SPLIT_K=splits)
    else:
        kern = _norm_linear_rope if rope is not None else _norm_linear_accum if accumulate else _norm_linear_store
        kern[lambda m: (triton.cdiv(B, m["BM"]), triton.cdiv(N, m["BN"]), m["SPLIT_K"])](*args, **kw)
    return out if rope is None else None


# -- 5: RMSNorm + router + softmax + top-k: triton_route.py ------------------------------------------


# -- 6/7: the chosen experts: triton_experts.py -------------------------------------------------------


# -- the decode step -------------------------------------------------------------------------------
@triton.jit
def _embed_stage(stage_ptr, stride_s, prev_ptr, w_ptr, x_ptr, D, BD: tl.constexpr, PREV: tl.constexpr):
    """Program (row b, block of BD columns): x[b] = the embedding of the row's token (stage[b, 0])
    in float32 (a lookup and a cast in one launch). PREV: a token -1 - j is the greedy token of
    row j of the step before (prev[j])."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    tok = tl.load(stage_ptr + b * stride_s)
    if PREV:
        tok = tl.where(tok < 0, tl.load(prev_ptr + tl.maximum(-1 - tok, 0)), tok)
    tok = tok.to(tl.int64)
    tl.store(x_ptr + b * D + cols, tl.load(w_ptr + tok * D + cols, mask=cols < D, other=0.0).to(tl.float32),
             mask=cols < D)



def unsupported_reason(model) -> str | None:
    """Why the fused step cannot run this model (None when it can)."""
    cfg = model.cfg
    if cfg.qk_norm or cfg.attn_bias:
        return "QK-norm and attention biases are not fused"
    if cfg.shared_expert_ffn:
        return "shared experts are not fused"
    if not all(b.is_moe for b in model.blocks):
        return "dense feed-forward layers are not fused"
    if cfg.hd % 2 or cfg.hd & (cfg.hd - 1):
        return "head dimension must be a power of two"
    if model.embed.weight.dtype == torch.float64:
        return "float64 weights are not fused"
    return None


class FusedDecoder:
    """The decode step of a Transformer over a paged KV cache, in the kernels above.

    Construction fuses each layer's wq, wk, wv into one [H*hd + 2*Hkv*hd, d] weight and points the
    modules' weights at views of it (no extra memory); the model still runs as before. Weights
    replaced later are fused again on the next call (a captured CUDA graph keeps the weights it
    was captured with: capture after loading)."""

    def __init__(self, model, kv_k: torch.Tensor, kv_v: torch.Tensor):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"fused decode: {reason}")
        self.model, self.cfg = model, model.cfg
        self.kv_k, self.kv_v = kv_k, kv_v  # [n_layers, num_blocks, block, Hkv, hd]
        self.wqkv: list[torch.Tensor] = []
        self._fuse()
        if model.embed.weight.is_cuda and not _INTERPRET:
            self._tune_experts()

    @torch.no_grad()
    def _tune_experts(self) -> None:
        """Tune the experts' kernels on one row that chooses top_k distinct experts, as a batch-1
        decode step does. They are tuned at their first call, once per weight shape: were that a
        warm-up or graph capture on padding rows (which choose no expert and read no weights),
        every tile would time alike and the choice would be arbitrary."""
        c, ex = self.cfg, self.model.blocks[0].ffn.experts
        dev = ex.w1.device
        ids = torch.arange(c.top_k, device=dev, dtype=torch.int32).view(1, -1)
        g = torch.Generator(device=dev).manual_seed(0)
        xn = torch.randn(1, c.d_model, device=dev, generator=g).to(ex.w1.dtype)
        h = expert_up(xn, ids, ex.w1, ex.w3)
        expert_down(h, ids, torch.full((1, c.top_k), 1.0 / c.top_k, device=dev), ex.w2,
                    torch.zeros(1, c.d_model, device=dev))

    @torch.no_grad()
    def _fuse(self) -> None:
        self.wqkv = []
        for blk in self.model.blocks:
            a = blk.attn
            w = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight])  # [(H + 2 Hkv) hd, d]
            nq, nk = a.wq.weight.shape[0], a.wk.weight.shape[0]
            a.wq.weight.data, a.wk.weight.data, a.wv.weight.data = w[:nq], w[nq:nq + nk], w[nq + nk:]
            self.wqkv.append(w)

    def _fused_current(self) -> bool:
        """False once the modules' q/k/v weights were replaced (load_state_dict(assign=True), .to())."""
        for blk, w in zip(self.model.blocks, self.wqkv):
            a = blk.attn
            nq, nk = a.wq.weight.shape[0], a.wk.weight.shape[0]
            views = ((a.wq.weight, 0), (a.wk.weight, nq), (a.wv.weight, nq + nk))
            if any(p.data_ptr() != w[off].data_ptr() or p.dtype != w.dtype for p, off in views):
                return False
        return True

    def _next_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the kernels after layer i's experts read first: the next layer's QKV and output
        projection weights, or after the last layer the LM head's first rows (as many bytes)."""
        m = self.model
        if i + 1 < len(m.blocks):
            return self.wqkv[i + 1], m.blocks[i + 1].attn.wo.weight
        head = m.lm_head.weight.reshape(-1)
        n = min(head.numel(), self.wqkv[0].numel() + m.blocks[0].attn.wo.weight.numel())
        return head[:n // 2], head[n // 2:n]

    def from_stage(self, stage: torch.Tensor, n_meta: int = 4, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The step of a graph's staged rows [token, position, slot, context length, block table...]
        (int32, one row per request): the first n_meta columns unpacked (one copy), the tokens'
        embeddings looked up in float32 (one kernel, reading the tokens from the stage), then
        __call__. The unpacked positions and slots are two kernels old when the first projection
        reads them before its wait (programmatic dependent launch). prev: int32 tokens on the
        device that a staged token -1 - j stands for (prev[j]: the previous step's greedy tokens)."""
        B, d = stage.shape[0], self.cfg.d_model
        meta = stage[:, :n_meta].t().contiguous()
        x = torch.empty(B, d, device=stage.device, dtype=torch.float32)
        bd = min(1024, triton.next_power_of_2(d))
        _embed_stage[(B, triton.cdiv(d, bd))](stage, stage.stride(0), stage if prev is None else prev,
                                               self.model.embed.weight, x, d, BD=bd, PREV=prev is not None)
        return self(meta[0], meta[1], meta[2], stage[:, n_meta:], meta[3], x=x)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """ids, pos, slots: [B] (int32 or int64); tables: [B, max_blocks] int32; lens: [B] int32 -> logits
        [B, vocab] float32. x: the rows' embeddings in float32 where they are looked up already."""
        m, c = self.model, self.cfg
        if not self._fused_current():
            self._fuse()
        B = ids.shape[0]
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.hd
        if x is None:
            x = m.embed.weight[ids].float()  # [B, d] residual stream
        cos, sin = m.rope_cos, m.rope_sin  # [max_len, hd]
        q = torch.empty(B, H, hd, device=x.device, dtype=self.kv_k.dtype)
        ids32 = torch.empty(B, c.top_k, device=x.device, dtype=torch.int32)
        gates = torch.empty(B, c.top_k, device=x.device, dtype=torch.float32)
        xn = torch.empty(B, c.d_model, device=x.device, dtype=m.embed.weight.dtype)
        for i, blk in enumerate(m.blocks):
            kc, vc = self.kv_k[i], self.kv_v[i]
            if FUSED_ROPE:  # q into q, k and v into their slots, rotated
                norm_linear(x, self.wqkv[i], blk.attn_norm.weight, blk.attn_norm.eps,
                            rope=(pos, cos, sin, slots, q, kc, vc, H, Hkv))
            else:
                qkv = norm_linear(x, self.wqkv[i], blk.attn_norm.weight, blk.attn_norm.eps)  # [B, (H + 2 Hkv) hd]
                _rope_store[(B, H + 2 * Hkv)](qkv, pos, cos, sin, slots, q, kc, vc, qkv.stride(0),
                                              H=H, HKV=Hkv, HALF=hd // 2, **pdl_kw(x))
            moe = blk.ffn
            routing = (x, blk.ffn_norm.weight, moe.router.weight, xn, ids32, gates, slots, blk.ffn_norm.eps,
                       c.renorm_gates)
            if triton_attn_wo.ATTN_IN_WO:  # attention inside the output projection, then the router
                triton_attn_wo.attn_wo(q, kc, vc, tables, lens, blk.attn.wo.weight, x)
                triton_route.route(*routing)
            elif triton_route.ROUTE_IN_WO:  # routed by the last program of the projection to finish its rows
                y = paged_decode_triton(q, kc, vc, tables, lens)  # [B, H, hd]
                norm_linear(y.view(B, H * hd), blk.attn.wo.weight, out=x, accumulate=True,
                            route=triton_route.route_args(*routing))
            else:
                y = paged_decode_triton(q, kc, vc, tables, lens)
                norm_linear(y.view(B, H * hd), blk.attn.wo.weight, out=x, accumulate=True)
                triton_route.route(*routing)
            h = expert_up(xn, ids32, moe.experts.w1, moe.experts.w3, evict_first=PREFETCH_NEXT)  # [B * k, f]
            expert_down(h, ids32, gates, moe.experts.w2, x, prefetch=self._next_weights(i) if PREFETCH_NEXT else None,
                        self_prefetch=PRE_ROWS if PREFETCH_SELF else 0)
        return norm_linear(x, m.lm_head.weight, m.norm.weight, m.norm.eps,
                           out=torch.empty(B, c.vocab_size, device=x.device, dtype=torch.float32))
