"""Greedy tokens inside the decode graph: each row's argmax over the vocabulary, after the LM head,
so that a greedy step's tokens are ready for the next step's graph (which reads them on the
device) and for one copy to the host, with no reduction launched between two graphs.

One launch: the vocabulary is split over programs, each writes its block's largest value and
first index, and the last program of a row to finish (triton_sync.last_to_arrive) picks the
row's."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.infer.triton_sync import gdc, last_to_arrive, pdl_kw, tile_counters


@triton.jit
def _first_max(x, cols, V):
    """(value, first column) of x's largest value, as torch.argmax picks it: a NaN counts as
    largest (then the value is NaN and the column the first NaN's); columns >= V are none."""
    isnan = x != x
    first_nan = tl.min(tl.where(isnan, cols, V), 0)
    top = tl.max(tl.where(isnan, float("-inf"), x), 0)
    first_top = tl.min(tl.where(x == top, cols, V), 0)
    return tl.where(first_nan < V, float("nan"), top), tl.where(first_nan < V, first_nan, first_top)


@triton.jit
def _argmax_rows(x_ptr, stride_x, out_ptr, part_v_ptr, part_i_ptr, sem_ptr, V, BV: tl.constexpr,
                 SP: tl.constexpr, PDL: tl.constexpr):
    """Program (row, block of BV columns): the block's largest value and first index; the last of
    the row's programs writes out[row] = the first index of the row's largest value."""
    gdc(PDL)
    row, s = tl.program_id(0), tl.program_id(1)
    n_blocks = tl.num_programs(1)
    cols = s * BV + tl.arange(0, BV)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    top, idx = _first_max(x, cols, V)
    tl.store(part_v_ptr + row * SP + s, top)
    tl.store(part_i_ptr + row * SP + s, idx)
    if last_to_arrive(sem_ptr, row, n_blocks):
        parts = tl.arange(0, SP)
        m = parts < n_blocks
        v = tl.load(part_v_ptr + row * SP + parts, mask=m, other=float("-inf"), cache_modifier=".cg")
        i = tl.load(part_i_ptr + row * SP + parts, mask=m, other=V, cache_modifier=".cg")
        # the blocks' winners, in column order: the first block's NaN, else the first largest
        _, best = _first_max(v, tl.where(m, i, V), V)
        tl.store(out_ptr + row, best)


def argmax_into(logits: torch.Tensor, out: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """out[:B] = logits.argmax(-1) (int32) for logits [B, V]: the Triton kernel on the GPU (one
    launch, capturable), torch elsewhere."""
    B, V = logits.shape
    if not logits.is_cuda:
        out[:B].copy_(logits.argmax(-1))
        return out[:B]
    assert logits.stride(-1) == 1 and out.dtype == torch.int32
    S = triton.cdiv(V, block)
    sp = triton.next_power_of_2(S)
    part_v = torch.empty(B, sp, device=logits.device, dtype=torch.float32)
    part_i = torch.empty(B, sp, device=logits.device, dtype=torch.int32)
    _argmax_rows[(B, S)](logits, logits.stride(0), out, part_v, part_i, tile_counters(logits.device, B), V,
                         BV=block, SP=sp, num_warps=4, **pdl_kw(logits))
    return out[:B]
