"""Paged decode attention and the output projection in one kernel (MOEKIT_ATTN_IN_WO=1; off by
default): the projection's sum over H * hd columns is split by KV head, so the program that owns
one KV head's share of a block of output columns computes that head group's attention itself,
then multiplies it by its slice of the weights. One launch and one wait fewer per layer than
attention followed by the projection (triton_paged + fused_decode.norm_linear).

Program (row b, block of BN output columns, KV head g): an online softmax over the row's whole
context, TOK tokens gathered across pages at a time, for the G query heads of g; the result,
rounded to the cache's dtype as the separate attention kernel stores it, times wo[:, g's columns]
gives this share's partial sums. The last of the row's KV heads to arrive adds the shares in
order 0 ... Hkv - 1 into the residual (deterministic, the same bits for a row whatever the
batch). Every block of columns recomputes its head group's attention (from L2 after the first),
so the work grows with the context times N / BN: this pays at short contexts."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.infer.triton_paged import _attend_chunks
from moekit.infer.triton_sync import gdc, last_to_arrive, pdl_kw, tile_counters

ATTN_IN_WO = os.environ.get("MOEKIT_ATTN_IN_WO", "0") != "0"


@triton.jit
def _attn_wo(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, w_ptr, out_ptr, part_ptr, sem_ptr, B, N,
             stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb, stride_wn, stride_ob, sm_scale,
             G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, PAGE: tl.constexpr, TOK: tl.constexpr,
             BN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    kvh = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)  # written before the step
    gdc(PDL)
    d = tl.arange(0, HD)
    m_i, l_i, acc = _attend_chunks(q_ptr, k_ptr, v_ptr, bt_ptr, b, kvh, ctx, 0, 1, stride_qb, stride_qh, stride_kb,
                                   stride_kt, stride_kh, stride_btb, sm_scale, G, GP, HD, PAGE, TOK, IEEE)
    # the attention output as the separate kernel stores it (the cache's dtype); empty rows: zeros
    y = (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(q_ptr.dtype.element_ty)  # [GP, HD]
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    yn = tl.zeros([BN], tl.float32)
    for h in tl.static_range(G):  # head h of the group: its HD columns of wo
        w = tl.load(w_ptr + n[:, None] * stride_wn + (kvh * G + h) * HD + d[None, :], mask=nmask[:, None],
                    other=0.0)  # [BN, HD]
        if IEEE:
            prod = tl.dot(y, tl.trans(w), input_precision="ieee")  # [GP, BN]: row h is head h's
        else:
            prod = tl.dot(y, tl.trans(w), out_dtype=tl.float32)
        yn += tl.sum(tl.where((tl.arange(0, GP) == h)[:, None], prod, 0.0), 0)
    nkv = tl.num_programs(2)
    tl.store(part_ptr + (kvh * B + b) * N + n, yn, mask=nmask)
    if last_to_arrive(sem_ptr, b * tl.num_programs(1) + pid_n, nkv):
        total = tl.zeros([BN], tl.float32)
        for s in range(0, nkv):  # in order: the same sum whoever arrives last
            total += tl.load(part_ptr + (s * B + b) * N + n, mask=nmask, other=0.0, cache_modifier=".cg")
        optr = out_ptr + b * stride_ob + n
        tl.store(optr, tl.load(optr, mask=nmask, other=0.0) + total, mask=nmask)


def attn_wo(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, wo: torch.Tensor, out: torch.Tensor, block_n: int = 64,
            tokens_per_chunk: int = 64) -> None:
    """q: [B, H, hd]; k_cache/v_cache: [num_blocks, page, Hkv, hd]; block_tables: [B, max_pages]
    int32; context_lens: [B] int32; wo: [N, H * hd]; out: [B, N] float32 += attention(q) @ wo.T.
    No host synchronisation (graph-capturable)."""
    B, H, hd = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    N = wo.shape[0]
    assert wo.shape[1] == H * hd and H % Hkv == 0, f"wo {tuple(wo.shape)} against {H} heads of {hd}"
    assert out.dtype == torch.float32 and out.shape == (B, N)
    part = torch.empty(Hkv, B, N, device=q.device, dtype=torch.float32)
    q = q.contiguous()
    n_blocks = triton.cdiv(N, block_n)
    _attn_wo[(B, n_blocks, Hkv)](
        q, k_cache, v_cache, block_tables, context_lens, wo, out, part, tile_counters(q.device, B * n_blocks),
        B, N, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        wo.stride(0), out.stride(0), hd ** -0.5,
        G=H // Hkv, GP=max(16, triton.next_power_of_2(H // Hkv)), HD=hd, PAGE=page, TOK=tokens_per_chunk, BN=block_n,
        IEEE=q.dtype == torch.float32, **pdl_kw(q), num_warps=8 if block_n * hd >= 8192 else 4)
