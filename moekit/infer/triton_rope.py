"""Rotary embedding of the decode step's q and k (rotate-half convention) and the K/V store into
the paged cache, in Triton: as a kernel of its own (_rope_store), or folded into the end of the
fused QKV projection (_rope_row + _rope_finish, used by fused_decode._norm_linear with ROPE).

Folded in, the projection computes the columns of q and k in rotary pairs: its column 2i + w of a
head reads weight row i + w * hd / 2 of that head (w = 0, 1), so each pair (d, d + hd / 2) sits
side by side in the projection's tile, and whichever program finishes the tile rotates the
pairs and writes q, k and v where the separate kernel would, with the same arithmetic and
rounding (the same bits for the same projection tiles), one launch fewer per layer. Columns of v
keep their order."""

from __future__ import annotations

import triton
import triton.language as tl

from moekit.infer.triton_sync import gdc


@triton.jit
def _rope_store(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, stride_qkv,
                H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
    """One program per (row, head of q, k or v): q and k rotate (rotate-half convention), q goes
    to q_ptr [B, H, hd], k and v to their cache slot ([slots, HKV, hd] views of the pages)."""
    gdc(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    src = qkv_ptr + b * stride_qkv + h * 2 * HALF
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    pos = tl.load(pos_ptr + b)
    c = tl.load(cos_ptr + pos * 2 * HALF + d)
    s = tl.load(sin_ptr + pos * 2 * HALF + d)
    slot = tl.load(slot_ptr + b).to(tl.int64)  # slots x heads x head size can pass 2^31
    if h < H + HKV:
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        if h < H:
            dst = q_ptr + (b * H + h) * 2 * HALF
        else:
            dst = k_ptr + (slot * HKV + (h - H)) * 2 * HALF
    else:
        y1, y2 = x1, x2
        dst = v_ptr + (slot * HKV + (h - H - HKV)) * 2 * HALF
    tl.store(dst + d, y1.to(dst.dtype.element_ty))
    tl.store(dst + HALF + d, y2.to(dst.dtype.element_ty))


@triton.jit
def _rope_row(n, QK: tl.constexpr, HALF: tl.constexpr):
    """The weight row that projection column n reads: pairs (d, d + HALF) of the QK heads of q and
    k side by side; the columns of v in order."""
    j = n % (2 * HALF)
    return tl.where(n < QK * 2 * HALF, n - j + j // 2 + (j % 2) * HALF, n)


@triton.jit
def _rope_trig(rows, n0, rmask, pos_ptr, cos_ptr, sin_ptr, slot_ptr, BN: tl.constexpr, H: tl.constexpr,
               HKV: tl.constexpr, HALF: tl.constexpr):
    """What _rope_finish needs besides the sums, for columns n0 ... n0 + BN of rows `rows`: cos and
    sin at each row's position for each rotary pair, and each row's cache slot. None of it is
    written by the kernels of a step, so a kernel may load it before waiting for the one before."""
    HD: tl.constexpr = 2 * HALF
    ne = n0 + 2 * tl.arange(0, BN // 2)  # the even columns
    roped = ne // HD < H + HKV
    pair = (ne % HD) // 2
    pos = tl.load(pos_ptr + rows, mask=rmask, other=0)
    trig = pos[:, None] * HD + pair[None, :]
    c = tl.load(cos_ptr + trig, mask=rmask[:, None] & roped[None, :], other=1.0)
    s = tl.load(sin_ptr + trig, mask=rmask[:, None] & roped[None, :], other=0.0)
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)  # slots x heads x hd can pass 2^31
    return c, s, slot


@triton.jit
def _rope_finish(acc, rows, n0, rmask, N, c, s, slot, q_ptr, k_ptr, v_ptr,
                 BM: tl.constexpr, BN: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr):
    """acc [BM, BN] float32, rounded as the stored projection would be: columns n0 ... n0 + BN (in
    _rope_row's order) of rows `rows`; c, s, slot: _rope_trig's. Rotates the pairs of q and k at
    each row's position and writes q [B, H, hd] and k, v into each row's cache slot
    ([slots, HKV, hd])."""
    HD: tl.constexpr = 2 * HALF
    x1, x2 = tl.split(tl.reshape(acc, [BM, BN // 2, 2]))  # columns n0 + 2i and n0 + 2i + 1
    ne = n0 + 2 * tl.arange(0, BN // 2)  # the even columns
    head = ne // HD
    roped = head < H + HKV
    pair = (ne % HD) // 2
    d1 = tl.where(roped, pair, ne % HD)  # where the two columns go within their head
    d2 = tl.where(roped, pair + HALF, ne % HD + 1)
    y1 = tl.where(roped[None, :], x1 * c - x2 * s, x1)  # v unchanged
    y2 = tl.where(roped[None, :], x2 * c + x1 * s, x2)
    m = rmask[:, None] & (ne < N)[None, :]
    mq = m & (head < H)[None, :]
    mk = m & ((head >= H) & roped)[None, :]
    mv = m & (head >= H + HKV)[None, :]
    q_at = q_ptr + (rows[:, None] * H + head[None, :]) * HD
    k_at = k_ptr + (slot[:, None] * HKV + (head - H)[None, :]) * HD
    v_at = v_ptr + (slot[:, None] * HKV + (head - H - HKV)[None, :]) * HD
    tl.store(q_at + d1[None, :], y1.to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(q_at + d2[None, :], y2.to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(k_at + d1[None, :], y1.to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(k_at + d2[None, :], y2.to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(v_at + d1[None, :], y1.to(v_ptr.dtype.element_ty), mask=mv)
    tl.store(v_at + d2[None, :], y2.to(v_ptr.dtype.element_ty), mask=mv)
