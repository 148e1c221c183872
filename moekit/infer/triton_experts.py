"""The chosen experts of the fused decode step (fused_decode.py), weights [E, K, N] (row = input
feature): the gate and up projections with SiLU (_expert_up), then the down projection, gated and
added into the residual (_expert_down). Each program serves one chosen expert (a grid row per
expert the rows chose, _slot_expert), so unchosen experts' weights are never read; a tile of up
to BM rows of the same expert shares each weight tile (tensor cores on rows padded to 16)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit.infer.triton_sync import (TUNE_KW as _TUNE, gdc, last_to_arrive, pdl_kw, prefetch_range as _prefetch_range,
                                     prefetch_tile as _prefetch_tile, quick, restore as _restore, tile_counters)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _slot_expert(ids_ptr, R, E, RP: tl.constexpr, EP: tl.constexpr):
    """The expert this program's row of the grid serves: the program_id(0)-th lowest of the experts
    the R assignments chose, or E when fewer were chosen (an expert no assignment matches: its
    program reads nothing). The grid has min(E, R) rows, so a row that chose 2 of 64 experts
    launches 2 rows of programs, not 64."""
    rr = tl.arange(0, RP)
    ids = tl.load(ids_ptr + rr, mask=rr < R, other=-1)
    ee = tl.arange(0, EP)
    chosen = tl.max((ids[None, :] == ee[:, None]).to(tl.int32), 1)  # [EP]
    rank = tl.cumsum(chosen, 0) - 1
    return tl.min(tl.where((chosen > 0) & (rank == tl.program_id(0)), ee, E), 0)


@triton.jit
def _expert_rows(ids_ptr, R, e, t, RP: tl.constexpr, BM: tl.constexpr):
    """Slots t ... t + BM of the assignments routed to expert e (in assignment order): their
    indices and validity, plus how many assignments e has."""
    rr = tl.arange(0, RP)
    mine = tl.load(ids_ptr + rr, mask=rr < R, other=-1) == e
    count = tl.sum(mine.to(tl.int32), 0)
    slot = tl.cumsum(mine.to(tl.int32), 0) - 1
    s = t + tl.arange(0, BM)
    rows = tl.sum(tl.where((slot[None, :] == s[:, None]) & mine[None, :], rr[None, :], 0), 1)
    return rows, s < count, count


@triton.jit
def _dot(x, w, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 weights: full precision, not TF32
        return tl.dot(x, w, acc, input_precision="ieee")
    return tl.dot(x, w, acc)


@triton.jit
def _silu_store(h_ptr, rows, n, mask, F, a1, a3):
    tl.store(h_ptr + rows[:, None] * F + n[None, :], (a1 / (1.0 + tl.exp(-a1)) * a3).to(h_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _expert_up(xn_ptr, ids_ptr, w1_ptr, w3_ptr, part_ptr, h_ptr, sem_ptr, R, K, F, E, stride_we, TOPK: tl.constexpr,
               RP: tl.constexpr, EP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               SPLIT_K: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr = ""):
    """Program (expert e (_slot_expert), block of F, share of K): xn[r // TOPK] @ w1[e] and @ w3[e] over the share
    for the assignments r routed to e, BM rows per tensor-core tile, into part [SPLIT_K, 2, R, F];
    the last of the tile's SPLIT_K programs to arrive adds the shares in order 0 ... SPLIT_K - 1 and
    writes h = silu(a1) * a3. Each chosen expert's weights are read once for all its rows;
    unchosen experts are not read. A row's sums do not depend on the other rows of its tile."""
    gdc(PDL)
    e = _slot_expert(ids_ptr, R, E, RP, EP)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < F
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * k_per
    w_e = e.to(tl.int64) * stride_we
    first_rows, first_valid, count = _expert_rows(ids_ptr, R, e, 0, RP, BM)
    for t in range(0, count, BM):
        rows, valid, count_t = _expert_rows(ids_ptr, R, e, t, RP, BM)
        acc1 = tl.zeros([BM, BN], tl.float32)
        acc3 = tl.zeros([BM, BN], tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + k_per, K), BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < K
            x = tl.load(xn_ptr + (rows // TOPK)[:, None] * K + kk[None, :], mask=valid[:, None] & kmask[None, :],
                        other=0.0)
            off = w_e + kk[:, None] * F + n[None, :]
            m = kmask[:, None] & nmask[None, :]
            w1 = tl.load(w1_ptr + off, mask=m, other=0.0, eviction_policy=EVICT)
            acc1 = _dot(x.to(w1.dtype), w1, acc1, IEEE)
            acc3 = _dot(x.to(w1.dtype), tl.load(w3_ptr + off, mask=m, other=0.0, eviction_policy=EVICT), acc3, IEEE)
        omask = valid[:, None] & nmask[None, :]
        if SPLIT_K == 1:
            _silu_store(h_ptr, rows, n, omask, F, acc1, acc3)
        else:
            base = part_ptr + (pid_k * 2 * R + rows)[:, None] * F + n[None, :]
            tl.store(base, acc1, mask=omask)
            tl.store(base + R * F, acc3, mask=omask)
    if SPLIT_K > 1:
        if count > 0:  # the same for the tile's SPLIT_K programs
            if last_to_arrive(sem_ptr, tl.program_id(0) * tl.num_programs(1) + pid_n, SPLIT_K):
                for t in range(0, count, BM):
                    rows, valid, count_t = _expert_rows(ids_ptr, R, e, t, RP, BM)
                    omask = valid[:, None] & nmask[None, :]
                    a1 = tl.zeros([BM, BN], tl.float32)
                    a3 = tl.zeros([BM, BN], tl.float32)
                    for sk in tl.static_range(SPLIT_K):
                        base = part_ptr + (sk * 2 * R + rows)[:, None] * F + n[None, :]
                        a1 += tl.load(base, mask=omask, other=0.0, cache_modifier=".cg")
                        a3 += tl.load(base + R * F, mask=omask, other=0.0, cache_modifier=".cg")
                    _silu_store(h_ptr, rows, n, omask, F, a1, a3)


@triton.jit
def _expert_down(h_ptr, ids_ptr, gates_ptr, w2_ptr, part_ptr, out_ptr, sem_ptr, B, R, F, D, E, stride_we, stride_ob,
                 nx1_ptr, nx1_n, nx2_ptr, nx2_n,
                 TOPK: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr = "",
                 NEXT: tl.constexpr = False, LINE: tl.constexpr = 64, PRE: tl.constexpr = 0):
    """Program (expert e (_slot_expert), block of D, share of F): part[share, r] = h[r] @ w2[e] over the share,
    for the assignments r routed to e (tiles of BM rows, as in _expert_up). The last of the (grid
    rows x SPLIT_K) programs of a block of D to arrive adds, for every row b, out[b] += sum_j gate[b, j]
    sum_s part[s, b * TOPK + j] in this order (the same numbers whatever the batch).

    NEXT: each program, its own sums written, asks L2 for its share of nx1 and nx2 (nx1_n and
    nx2_n elements, LINE to a 128-byte line): the weights the next kernels read. A program whose
    expert no row chose does this at once.

    PRE: before waiting for the kernel before it (the experts' up projection), each program asks
    L2 for the first PRE rows of its share of its expert's weights. ids were written by the
    kernel before that one, which had finished before this kernel's programs could be placed."""
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_per = tl.cdiv(tl.cdiv(F, SPLIT_K), BK) * BK
    k_lo = pid_k * k_per
    if PRE > 0:
        e = _slot_expert(ids_ptr, R, E, RP, EP)
        if e < E:
            kr = k_lo + tl.arange(0, PRE)
            _prefetch_tile(w2_ptr + e.to(tl.int64) * stride_we, kr, pid_n * BN, D, tl.minimum(k_lo + k_per, F), D,
                           LINE, BN // LINE)
    gdc(PDL)
    e = _slot_expert(ids_ptr, R, E, RP, EP)
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < D
    w_e = e.to(tl.int64) * stride_we
    first_rows, first_valid, count = _expert_rows(ids_ptr, R, e, 0, RP, BM)
    for t in range(0, count, BM):
        rows, valid, count_t = _expert_rows(ids_ptr, R, e, t, RP, BM)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + k_per, F), BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < F
            hk = tl.load(h_ptr + rows[:, None] * F + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w2_ptr + w_e + kk[:, None] * D + n[None, :], mask=kmask[:, None] & nmask[None, :],
                        other=0.0, eviction_policy=EVICT)
            acc = _dot(hk.to(w.dtype), w, acc, IEEE)
        tl.store(part_ptr + (pid_k * R + rows)[:, None] * D + n[None, :], acc, mask=valid[:, None] & nmask[None, :])
    if NEXT:
        part = (tl.program_id(0) * tl.num_programs(1) + pid_n) * SPLIT_K + pid_k
        parts = tl.num_programs(0) * tl.num_programs(1) * SPLIT_K
        _prefetch_range(nx1_ptr, nx1_n, part, parts, LINE, 128)
        _prefetch_range(nx2_ptr, nx2_n, part, parts, LINE, 128)
    if last_to_arrive(sem_ptr, pid_n, tl.num_programs(0) * SPLIT_K):
        for b0 in range(0, B, BM):
            b = b0 + tl.arange(0, BM)
            m = (b < B)[:, None] & nmask[None, :]
            y = tl.zeros([BM, BN], tl.float32)
            for j in tl.static_range(TOPK):
                yj = tl.zeros([BM, BN], tl.float32)
                chosen = tl.load(ids_ptr + b * TOPK + j, mask=b < B, other=-1) >= 0  # padding rows: none
                for sk in tl.static_range(SPLIT_K):
                    yj += tl.load(part_ptr + (sk * R + b * TOPK + j)[:, None] * D + n[None, :],
                                  mask=m & chosen[:, None], other=0.0, cache_modifier=".cg")
                y += yj * tl.load(gates_ptr + b * TOPK + j, mask=b < B, other=0.0)[:, None]
            optr = out_ptr + b[:, None] * stride_ob + n[None, :]
            tl.store(optr, tl.load(optr, mask=m, other=0.0) + y, mask=m)


_EXPERT_TILES = ((64, 64), (128, 64), (64, 128), (256, 64), (128, 128))  # (BN, BK); deeper pipelines, more warps
_EXPERT_LAUNCH = ((4, 3), (4, 4), (8, 4))  # (num_warps, num_stages)


def _quick(c) -> bool:  # MOEKIT_TUNE=quick: 64 x 64 tiles, 4 warps, 3 stages, the two smallest splits
    return (c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) == (64, 64, 4, 3) and c.kwargs["SPLIT_K"] <= 4


def _up_configs():
    return quick([triton.Config({"BM": 16, "BN": bn, "BK": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st)
                  for bn, bk in _EXPERT_TILES for sk in (1, 2, 4) for w, st in _EXPERT_LAUNCH],
                 lambda c: _quick(c) and c.kwargs["SPLIT_K"] <= 2)


def _down_configs():
    return quick([triton.Config({"BM": 16, "BN": bn, "BK": bk, "SPLIT_K": sk}, num_warps=w, num_stages=st)
                  for bn, bk in _EXPERT_TILES for sk in (2, 4, 8, 16) for w, st in _EXPERT_LAUNCH], _quick)


# tuned once per weight shape (tensor-core tiles of 16 rows): the same numbers for every batch; the
# timed launch includes the reduction of the splits (SiLU, the gated combine), done inside
_expert_up_tuned = triton.autotune(_up_configs(), key=["K", "F"], **_TUNE)(_expert_up)
_expert_down_tuned = triton.autotune(_down_configs(), key=["F", "D"], **_restore("out_ptr"), **_TUNE)(_expert_down)


def expert_up(xn: torch.Tensor, ids: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, split_k: int = 2,
              evict_first: bool = False) -> torch.Tensor:
    """xn: [B, K]; ids: [B, topk] int32; w1, w3: [E, K, F] -> h [B * topk, F] = silu(x w1) * (x w3).
    split_k picks the split off the GPU (on the GPU the autotuner picks); evict_first: the weights
    are streamed with evict-first loads (what else is in L2 stays)."""
    B, K = xn.shape
    topk, E, F = ids.shape[1], w1.shape[0], w1.shape[2]
    R = B * topk
    assert 1 <= split_k <= 8, "split_k: 1 ... 8 (the partial sums are sized for 8)"
    part = torch.empty(8, 2, R, F, device=xn.device, dtype=torch.float32)  # room for the largest K split
    h = torch.empty(R, F, device=xn.device, dtype=w1.dtype)
    sem = tile_counters(xn.device, E * triton.cdiv(F, 32))
    args = (xn, ids, w1, w3, part, h, sem, R, K, F, E, w1.stride(0))
    kw = dict(TOPK=topk, RP=max(16, triton.next_power_of_2(R)), EP=triton.next_power_of_2(E), IEEE=w1.dtype == torch.float32,
              EVICT="evict_first" if evict_first else "", **pdl_kw(xn))
    if _INTERPRET or not xn.is_cuda:
        _expert_up[(min(E, R), triton.cdiv(F, 32), split_k)](*args, **kw, BM=16, BN=32, BK=32, SPLIT_K=split_k)
    else:
        _expert_up_tuned[lambda m: (min(E, R), triton.cdiv(F, m["BN"]), m["SPLIT_K"])](*args, **kw)
    return h


def expert_down(h: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, w2: torch.Tensor, out: torch.Tensor,
                split_k: int = 2, prefetch: tuple[torch.Tensor, torch.Tensor] | None = None,
                self_prefetch: int = 0) -> None:
    """h: [B * topk, F]; ids, gates: [B, topk]; w2: [E, F, D]; out [B, D] float32 += the gated sum.
    prefetch: two tensors (of the weights' dtype) the kernel asks L2 for once its sums are out, on
    GPU (Triton's interpreter has no prefetch: there it is ignored). self_prefetch: rows of each
    program's share of its expert's weights asked of L2 before it waits for the kernel before
    (with programmatic dependent launch; ids must then come from the kernel before that one)."""
    B, topk = ids.shape
    E, F, D = w2.shape
    R = B * topk
    assert 1 <= split_k <= 16, "split_k: 1 ... 16 (the partial sums are sized for 16)"
    part = torch.empty(16, R, D, device=h.device, dtype=torch.float32)  # room for the largest F split
    sem = tile_counters(h.device, triton.cdiv(D, 32))
    nxt = prefetch is not None and h.is_cuda and not _INTERPRET
    p1, p2 = prefetch if nxt else (w2, w2)
    args = (h, ids, gates, w2, part, out, sem, B, R, F, D, E, w2.stride(0), out.stride(0), p1, p1.numel(), p2, p2.numel())
    kw = dict(TOPK=topk, RP=max(16, triton.next_power_of_2(R)), EP=triton.next_power_of_2(E), IEEE=w2.dtype == torch.float32, NEXT=nxt,
              LINE=128 // p1.element_size(), EVICT="evict_first" if nxt else "", **pdl_kw(h))
    if self_prefetch and kw["PDL"] and w2.element_size() == 2:
        kw["PRE"] = self_prefetch
    if _INTERPRET or not h.is_cuda:
        _expert_down[(min(E, R), triton.cdiv(D, 32), split_k)](*args, **kw, BM=16, BN=32, BK=32, SPLIT_K=split_k)
    else:
        _expert_down_tuned[lambda m: (min(E, R), triton.cdiv(D, m["BN"]), m["SPLIT_K"])](*args, **kw)
