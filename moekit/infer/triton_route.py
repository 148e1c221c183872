"""RMSNorm + router + softmax + top-k of the fused decode step (fused_decode.py): a kernel of its
own, one program per row, or the end of the output projection that writes the residual it reads
(MOEKIT_ROUTE_IN_WO=1): the last program to finish a block of the residual's rows routes them,
one launch fewer per layer."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.infer.triton_sync import MAX_TILES, gdc, last_to_arrive, pdl_kw, tile_counters

ROUTE_IN_WO = os.environ.get("MOEKIT_ROUTE_IN_WO", "0") != "0"
BLOCKS = 64  # the row blocks a routing projection counts, at the top of the tile counters


@triton.jit
def _route_weights(g_ptr, wr_ptr, K, E, EP: tl.constexpr, BK: tl.constexpr):
    """The norm's and the router's weights as one tile (K <= BK): no kernel of a step writes them,
    so a kernel may load them before it waits for the one before."""
    kk = tl.arange(0, BK)
    kmask = kk < K
    e = tl.arange(0, EP)
    g = tl.load(g_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
    w = tl.load(wr_ptr + e[:, None] * K + kk[None, :], mask=(e < E)[:, None] & kmask[None, :], other=0.0)
    return g, w


@triton.jit
def _route_row(b, x_ptr, g_ptr, wr_ptr, xn_ptr, ids_ptr, gates_ptr, slots_ptr, K, E, eps, stride_xb,
               EP: tl.constexpr, BK: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr, gw=None):
    """Row b: xn = RMSNorm(x) (stored in the weights' dtype, as the experts read it), logits =
    xn @ wr.T in float32, softmax, the TOPK largest (ids and gates). A padding row (its K/V slot 0,
    the scratch block's) chooses no expert (ids -1, gates 0): a graph's padding rows add no expert
    weights to the step's reads. x is read from L2 (.cg): other programs may have just written it.
    gw: _route_weights' tiles, loaded already (K <= BK)."""
    pad = tl.load(slots_ptr + b) == 0
    e = tl.arange(0, EP)
    emask = e < E
    if K <= BK:  # one tile: every load issued up front (one round trip to memory, not two)
        kk = tl.arange(0, BK)
        kmask = kk < K
        xk = tl.load(x_ptr + b * stride_xb + kk, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        if gw is None:
            g, w = _route_weights(g_ptr, wr_ptr, K, E, EP, BK)
        else:
            g, w = gw
        rstd = 1.0 / tl.sqrt(tl.sum(xk * xk, 0) / K + eps)
        xn = (xk * rstd * g).to(xn_ptr.dtype.element_ty)
        tl.store(xn_ptr + b * K + kk, xn, mask=kmask)
        logits = tl.sum(w.to(tl.float32) * xn.to(tl.float32)[None, :], 1)
    else:
        ss = tl.zeros([BK], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            xk = tl.load(x_ptr + b * stride_xb + kk, mask=kk < K, other=0.0, cache_modifier=".cg").to(tl.float32)
            ss += xk * xk
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        logits = tl.zeros([EP], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < K
            xk = tl.load(x_ptr + b * stride_xb + kk, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
            g = tl.load(g_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            xn = (xk * rstd * g).to(xn_ptr.dtype.element_ty)
            tl.store(xn_ptr + b * K + kk, xn, mask=kmask)
            w = tl.load(wr_ptr + e[:, None] * K + kk[None, :], mask=emask[:, None] & kmask[None, :], other=0.0)
            logits += tl.sum(w.to(tl.float32) * xn.to(tl.float32)[None, :], 1)
    logits = tl.where(emask, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    scale = 1.0
    if RENORM:  # Mixtral: the chosen gates sum to 1
        rest = p
        total = 0.0
        for j in tl.static_range(TOPK):
            best = tl.max(rest, 0)
            total += best
            rest = tl.where(e == tl.min(tl.where(rest == best, e, EP), 0), -1.0, rest)
        scale = 1.0 / total
    for j in tl.static_range(TOPK):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, EP), 0)  # the lowest index among ties
        tl.store(ids_ptr + b * TOPK + j, tl.where(pad, -1, idx))
        tl.store(gates_ptr + b * TOPK + j, tl.where(pad, 0.0, best * scale))
        p = tl.where(e == idx, -1.0, p)


@triton.jit
def _route(x_ptr, g_ptr, wr_ptr, xn_ptr, ids_ptr, gates_ptr, slots_ptr, K, E, eps, stride_xb,
           EP: tl.constexpr, BK: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr):
    """One program per row (_route_row); the weights of one tile are loaded before the wait."""
    if K <= BK:
        gw = _route_weights(g_ptr, wr_ptr, K, E, EP, BK)
        gdc(PDL)
        _route_row(tl.program_id(0), x_ptr, g_ptr, wr_ptr, xn_ptr, ids_ptr, gates_ptr, slots_ptr, K, E, eps,
                   stride_xb, EP, BK, TOPK, RENORM, gw)
    else:
        gdc(PDL)
        _route_row(tl.program_id(0), x_ptr, g_ptr, wr_ptr, xn_ptr, ids_ptr, gates_ptr, slots_ptr, K, E, eps,
                   stride_xb, EP, BK, TOPK, RENORM)


@triton.jit
def _route_block(rsem_ptr, pid_m, tiles, x_ptr, g_ptr, wr_ptr, xn_ptr, ids_ptr, gates_ptr, slots_ptr, B, K, E, eps,
                 stride_xb, EP: tl.constexpr, BK: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr,
                 BM: tl.constexpr):
    """Called by every program that finishes one of the `tiles` tiles of row block pid_m of x: the
    last of them routes the block's rows."""
    if last_to_arrive(rsem_ptr, pid_m, tiles):
        for i in range(BM):
            b = pid_m * BM + i
            if b < B:
                _route_row(b, x_ptr, g_ptr, wr_ptr, xn_ptr, ids_ptr, gates_ptr, slots_ptr, K, E, eps, stride_xb,
                           EP, BK, TOPK, RENORM)


def _consts(d_model: int, n_experts: int, top_k: int, renorm: bool) -> dict:
    ep = max(2, triton.next_power_of_2(n_experts))
    return dict(EP=ep, BK=min(triton.next_power_of_2(d_model), max(16, 16384 // ep)), TOPK=top_k, RENORM=renorm)


def route(x: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor, xn: torch.Tensor, ids: torch.Tensor,
          gates: torch.Tensor, slots: torch.Tensor, eps: float, renorm: bool) -> None:
    """x [B, d] float32 residual -> xn [B, d] (RMSNorm, weights' dtype), ids [B, k] int32, gates [B, k]."""
    B, d = x.shape
    E, k = router_w.shape[0], ids.shape[1]
    _route[(B,)](x, norm_w, router_w, xn, ids, gates, slots, d, E, eps, x.stride(0), **_consts(d, E, k, renorm),
                 num_warps=8, **pdl_kw(x))


def route_args(x: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor, xn: torch.Tensor, ids: torch.Tensor,
               gates: torch.Tensor, slots: torch.Tensor, eps: float, renorm: bool) -> tuple[tuple, dict]:
    """The arguments (after the output projection's own) and constants with which the projection
    writing x routes its rows at its end (fused_decode.norm_linear(route=...))."""
    d = x.shape[1]  # the projection checks its rows against the counters (norm_linear)
    rsem = tile_counters(x.device, MAX_TILES)[MAX_TILES - BLOCKS:]
    c = _consts(d, router_w.shape[0], ids.shape[1], renorm)
    args = (norm_w, router_w, xn, ids, gates, slots, rsem, router_w.shape[0], eps)
    return args, dict(ROUTE=True, EP=c["EP"], RBK=c["BK"], TOPK=c["TOPK"], RENORM=renorm)
