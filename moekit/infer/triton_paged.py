"""Paged decode attention in Triton (flash-decoding): one program per (row, KV head, context
split) reads its pages straight from the block table, keeps an online softmax, and writes a
partial result; the last of a (row, KV head)'s programs to finish merges the splits, in split
order (one launch). All query heads that share a KV head are served by one program, so
multi-query attention reads each K/V page once."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.infer.triton_sync import gdc, last_to_arrive, pdl_kw, prefetch_l2 as _prefetch_l2, tile_counters


@triton.jit
def _paged_decode_split(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, acc_ptr, ml_ptr, out_ptr, sem_ptr,
                        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb,
                        sm_scale, pages_per_split, n_splits,
                        G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, PAGE: tl.constexpr,
                        IEEE: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr = False):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    g = tl.arange(0, GP)
    d = tl.arange(0, HD)
    t = tl.arange(0, PAGE)
    n_pages = tl.cdiv(ctx, PAGE)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, n_pages)
    if PRE:  # ask L2 for this split's pages (addresses only) while the kernel before runs
        for p in range(first, last):
            blk = tl.load(bt_ptr + b * stride_btb + p).to(tl.int64)
            off = blk * stride_kb + t[:, None] * stride_kt + kvh * stride_kh + (tl.arange(0, 2) * (HD // 2))[None, :]
            _prefetch_l2(k_ptr + off)
            _prefetch_l2(v_ptr + off)
    gdc(PDL)
    gmask = g < G
    heads = kvh * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, HD], tl.float32)
    for p in range(first, last):
        blk = tl.load(bt_ptr + b * stride_btb + p).to(tl.int64)
        pos = p * PAGE + t
        off = blk * stride_kb + t[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        k = tl.load(k_ptr + off)  # [PAGE, HD]
        if IEEE:  # a float32 cache: full precision, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        else:
            s = (tl.dot(q, tl.trans(k)) * sm_scale).to(tl.float32)  # [GP, PAGE]
        s = tl.where((pos < ctx)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        pm = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pm, 1)
        v = tl.load(v_ptr + off)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pm, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pm.to(v.dtype), v)
        m_i = m_new
    # partials: acc [B, H, S, HD] (unnormalised), ml [B, H, S, 2] = (max, sum)
    row = (b * (tl.num_programs(1) * G) + heads) * n_splits + split
    if first < last:  # splits past the context write nothing (the merge reads only those before)
        tl.store(acc_ptr + row[:, None] * HD + d[None, :], acc, mask=gmask[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=gmask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=gmask)
    if last_to_arrive(sem_ptr, b * tl.num_programs(1) + kvh, n_splits):
        # merge the splits that hold context, in order: rescale to the running max and add
        m_all = tl.full([GP], float("-inf"), tl.float32)
        l_all = tl.zeros([GP], tl.float32)
        o = tl.zeros([GP, HD], tl.float32)
        first_row = (b * (tl.num_programs(1) * G) + heads) * n_splits
        for sp in range(0, tl.cdiv(n_pages, pages_per_split)):
            m_s = tl.load(ml_ptr + (first_row + sp) * 2, mask=gmask, other=0.0, cache_modifier=".cg")
            l_s = tl.load(ml_ptr + (first_row + sp) * 2 + 1, mask=gmask, other=0.0, cache_modifier=".cg")
            a_s = tl.load(acc_ptr + (first_row + sp)[:, None] * HD + d[None, :], mask=gmask[:, None], other=0.0,
                          cache_modifier=".cg")
            m_new = tl.maximum(m_all, m_s)
            alpha = tl.exp(m_all - m_new)
            beta = tl.exp(m_s - m_new)
            l_all = l_all * alpha + l_s * beta
            o = o * alpha[:, None] + a_s * beta[:, None]
            m_all = m_new
        out = o / tl.where(l_all > 0, l_all, 1.0)[:, None]  # padded heads hold nothing
        tl.store(out_ptr + (b * (tl.num_programs(1) * G) + heads)[:, None] * HD + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


# with programmatic dependent launch, each program asks L2 for its pages before it waits for the
# kernel before it (the QKV projection); MOEKIT_PREFETCH_SELF=1, as the fused step's kernels
PREFETCH = os.environ.get("MOEKIT_PREFETCH_SELF", "0") != "0"


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        pages_per_split: int = 8) -> torch.Tensor:
    """q: [B, H, hd]; k_cache/v_cache: [num_blocks, page, Hkv, hd]; block_tables: [B, max_pages]
    int32; context_lens: [B] int32 -> [B, H, hd]. No host synchronisation (graph-capturable)."""
    B, H, hd = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    n_splits = triton.cdiv(block_tables.shape[1], pages_per_split)
    acc = torch.empty(B, H, n_splits, hd, device=q.device, dtype=torch.float32)
    ml = torch.empty(B, H, n_splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, hd, device=q.device, dtype=q.dtype)
    q = q.contiguous()
    _paged_decode_split[(B, Hkv, n_splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml, out, tile_counters(q.device, B * Hkv),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        hd ** -0.5, pages_per_split, n_splits,
        G=G, GP=max(16, triton.next_power_of_2(G)), HD=hd, PAGE=page, IEEE=q.dtype == torch.float32, **pdl_kw(q),
        PRE=PREFETCH and pdl_kw(q)["PDL"] and hd * k_cache.element_size() == 256)
    return out
