"""Paged decode attention in Triton (flash-decoding): one program per (row, KV head, split) reads
its share of the context straight from the block table, TOK tokens at a time gathered in one
load, keeps an online softmax, and writes a partial result; the last of a (row, KV head)'s live
programs to finish merges the splits, in split order (one launch). All query heads that share a
KV head are served by one program, so multi-query attention reads each K/V row once.

The grid is fixed when a decode step is captured (splits for the longest context the block
table holds), while the context grows from step to step: chunk c of a row's context goes to
split c mod n_splits, and only the splits that hold context take part (the others leave at once,
before waiting for the kernel before). A short context is then read by as many programs as it has
chunks, each with one gather, instead of page by page."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.infer.triton_sync import gdc, last_to_arrive, pdl_kw, prefetch_l2, tile_counters

MAX_SPLITS = 64
# with programmatic dependent launch, each program asks L2 for its first chunk's rows before it
# waits for the kernel before it (the QKV projection); MOEKIT_PREFETCH_SELF=1, as the fused step's
PREFETCH = os.environ.get("MOEKIT_PREFETCH_SELF", "0") != "0"


@triton.jit
def _rows(k_ptr, bt_ptr, b, kvh, tok, ctx, stride_kb, stride_kt, stride_kh, stride_btb, PAGE: tl.constexpr):
    """Offsets of tokens tok's K/V rows of KV head kvh (row b's block table); tok < ctx."""
    blk = tl.load(bt_ptr + b * stride_btb + tok // PAGE, mask=tok < ctx, other=0).to(tl.int64)
    return blk * stride_kb + (tok % PAGE) * stride_kt + kvh * stride_kh


@triton.jit
def _attend_chunk(q, k_ptr, v_ptr, bt_ptr, b, kvh, tok, ctx, stride_kb, stride_kt, stride_kh, stride_btb, sm_scale,
                  m_i, l_i, acc, HD: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over tokens tok (< ctx) of row b's KV head kvh, gathered across pages
    in one load: (running max, running sum, unnormalised output) updated."""
    d = tl.arange(0, HD)
    valid = tok < ctx
    off = _rows(k_ptr, bt_ptr, b, kvh, tok, ctx, stride_kb, stride_kt, stride_kh, stride_btb, PAGE)
    k = tl.load(k_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [TOK, HD]
    v = tl.load(v_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    if IEEE:  # a float32 cache: full precision, not TF32
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
    else:
        s = (tl.dot(q, tl.trans(k)) * sm_scale).to(tl.float32)  # [GP, TOK]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    pm = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pm, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(pm, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pm.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_chunks(q_ptr, k_ptr, v_ptr, bt_ptr, b, kvh, ctx, first, step, stride_qb, stride_qh, stride_kb, stride_kt,
                   stride_kh, stride_btb, sm_scale, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                   PAGE: tl.constexpr, TOK: tl.constexpr, IEEE: tl.constexpr):
    """Row b's query heads of KV head kvh (G of them, padded to GP) over chunks first, first + step,
    ... of its context: (running max, running sum, unnormalised output) of the online softmax."""
    d = tl.arange(0, HD)
    t = tl.arange(0, TOK)
    g = tl.arange(0, GP)
    heads = kvh * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, HD], tl.float32)
    for c in range(first, tl.cdiv(ctx, TOK), step):
        m_i, l_i, acc = _attend_chunk(q, k_ptr, v_ptr, bt_ptr, b, kvh, c * TOK + t, ctx, stride_kb, stride_kt,
                                      stride_kh, stride_btb, sm_scale, m_i, l_i, acc, HD, PAGE, IEEE)
    return m_i, l_i, acc


@triton.jit
def _paged_decode_split(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, acc_ptr, ml_ptr, out_ptr, sem_ptr,
                        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb,
                        sm_scale, n_splits,
                        G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, PAGE: tl.constexpr, TOK: tl.constexpr,
                        IEEE: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr = False):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)  # written before the step, not by the kernel before
    chunks = tl.cdiv(ctx, TOK)
    live = tl.minimum(chunks, n_splits)  # splits holding context
    if split < tl.maximum(live, 1):  # the others leave (an empty row: split 0 writes its zeros)
        d = tl.arange(0, HD)
        t = tl.arange(0, TOK)
        if PRE:  # the first chunk's rows, asked of L2 while the kernel before runs (addresses only)
            tok = split * TOK + t
            off = _rows(k_ptr, bt_ptr, b, kvh, tok, ctx, stride_kb, stride_kt, stride_kh, stride_btb, PAGE)
            half = (tl.arange(0, 2) * (HD // 2))[None, :]
            prefetch_l2(k_ptr + off[:, None] + half)
            prefetch_l2(v_ptr + off[:, None] + half)
        gdc(PDL)
        g = tl.arange(0, GP)
        gmask = g < G
        heads = kvh * G + g
        m_i, l_i, acc = _attend_chunks(q_ptr, k_ptr, v_ptr, bt_ptr, b, kvh, ctx, split, n_splits, stride_qb, stride_qh,
                                       stride_kb, stride_kt, stride_kh, stride_btb, sm_scale, G, GP, HD, PAGE, TOK, IEEE)
        # partials: acc [B, H, S, HD] (unnormalised), ml [B, H, S, 2] = (max, sum)
        row = (b * (tl.num_programs(1) * G) + heads) * n_splits + split
        if split < live:
            tl.store(acc_ptr + row[:, None] * HD + d[None, :], acc, mask=gmask[:, None])
            tl.store(ml_ptr + row * 2, m_i, mask=gmask)
            tl.store(ml_ptr + row * 2 + 1, l_i, mask=gmask)
        if last_to_arrive(sem_ptr, b * tl.num_programs(1) + kvh, tl.maximum(live, 1)):
            # merge the live splits in order: rescale to the running max and add
            m_all = tl.full([GP], float("-inf"), tl.float32)
            l_all = tl.zeros([GP], tl.float32)
            o = tl.zeros([GP, HD], tl.float32)
            first_row = (b * (tl.num_programs(1) * G) + heads) * n_splits
            for sp in range(0, live):
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
            out = o / tl.where(l_all > 0, l_all, 1.0)[:, None]  # padded heads, empty rows: zeros
            tl.store(out_ptr + (b * (tl.num_programs(1) * G) + heads)[:, None] * HD + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        tokens_per_chunk: int = 64, max_splits: int = MAX_SPLITS) -> torch.Tensor:
    """q: [B, H, hd]; k_cache/v_cache: [num_blocks, page, Hkv, hd]; block_tables: [B, max_pages]
    int32; context_lens: [B] int32 -> [B, H, hd]. No host synchronisation (graph-capturable).
    tokens_per_chunk (a power of two, 16 or more): tokens a program gathers at once; max_splits:
    the most programs a row's KV head is split over."""
    B, H, hd = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    assert tokens_per_chunk >= 16 and tokens_per_chunk & (tokens_per_chunk - 1) == 0, tokens_per_chunk
    n_splits = max(1, min(max_splits, triton.cdiv(block_tables.shape[1] * page, tokens_per_chunk)))
    acc = torch.empty(B, H, n_splits, hd, device=q.device, dtype=torch.float32)
    ml = torch.empty(B, H, n_splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, hd, device=q.device, dtype=q.dtype)
    q = q.contiguous()
    pdl = pdl_kw(q)
    _paged_decode_split[(B, Hkv, n_splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, ml, out, tile_counters(q.device, B * Hkv),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        hd ** -0.5, n_splits,
        G=G, GP=max(16, triton.next_power_of_2(G)), HD=hd, PAGE=page, TOK=tokens_per_chunk,
        IEEE=q.dtype == torch.float32, **pdl, PRE=PREFETCH and pdl["PDL"] and hd * k_cache.element_size() == 256)
    return out
