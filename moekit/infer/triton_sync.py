"""How the decode kernels order their work: with the kernel before them (programmatic dependent
launch) and among their own programs (the last program of a tile reduces the others' partials);
and what they share besides: L2 prefetch hints, the autotuner's keywords.

Programmatic dependent launch (Hopper and later).

A decode step is a chain of small kernels; between two of them the GPU idles while the next one
launches and its programs are placed. Launched with PDL, a kernel's programs are placed while the
previous kernel is still running and wait (griddepcontrol.wait) at their top until that kernel
has finished and its writes are visible, so the numbers are those of plain stream order; only the
launch gap goes. Every kernel taking `PDL` calls `gdc` first, before touching memory.

MOEKIT_PDL=0 switches it off (as does `ENABLED = False` before the kernels are launched or a
graph captured).

Split reductions. A kernel that splits a sum over several programs has each write its partial
sums and count itself in a per-tile counter (`last_to_arrive`); the last to arrive adds all the
partials in a fixed order, so the result does not depend on which program finished last, and
resets the counter. One launch instead of a kernel and its reduction, and no value added
atomically (the same bits on every run). The counters of a device are shared by every such
kernel, which is safe while those kernels run one after another on one stream (as the engine's
decode steps, graphs and warm-ups do); two such kernels running at once on two streams could
mix their counts.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("MOEKIT_PDL", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def gdc(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream, then let the next one be placed."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ptrs (a hint: no value is read, no address faults)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_tile(ptr, rows, cols, stride, n_rows, n_cols, LINE: tl.constexpr, NL: tl.constexpr):
    """Ask L2 for rows x (NL lines of LINE elements from each of cols) of a row-major matrix,
    addresses clamped inside it."""
    c = tl.minimum(cols + tl.arange(0, NL) * LINE, n_cols - 1)
    prefetch_l2(ptr + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride + c[None, :])


@triton.jit
def prefetch_range(ptr, n, part, parts, LINE: tl.constexpr, CHUNK: tl.constexpr):
    """Ask L2 for this program's share (part of parts) of elements 0 ... n - 1 of ptr: one request
    per line of LINE elements, CHUNK requests at a time."""
    lines = tl.cdiv(n, LINE)
    per = tl.cdiv(lines, parts)
    lo = part * per
    hi = tl.minimum(lo + per, lines)
    for l0 in range(lo, hi, CHUNK):
        ll = tl.minimum(l0 + tl.arange(0, CHUNK), hi - 1)
        prefetch_l2(ptr + ll.to(tl.int64) * LINE)


# MOEKIT_TUNE=quick: each tuned decode kernel chooses among a few tiles (still with and without
# splits), for test suites that build many shapes; the tuned results are otherwise the same kind
QUICK_TUNE = os.environ.get("MOEKIT_TUNE", "") == "quick"


def quick(configs: list, keep) -> list:
    """configs, or with QUICK_TUNE only those keep(config) accepts."""
    return [c for c in configs if keep(c)] if QUICK_TUNE else configs


# autotuning results are kept on disk (Triton's cache) where this Triton can
TUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def restore(*names):
    # autotuning runs a kernel many times: accumulating kernels get their output restored between runs
    return {"restore_value": list(names)}


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_kw(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking PDL, its tensors on t's device."""
    on = ENABLED and t.is_cuda and _hopper(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def last_to_arrive(sem_ptr, tile, ARRIVALS):
    """Count this program in sem_ptr[tile] once its writes are out; True for the last of ARRIVALS,
    which then sees every other program's writes (load them with cache_modifier=".cg") and resets
    the count for the next launch."""
    tl.debug_barrier()  # every thread's partials are written before the count is released
    last = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu") == ARRIVALS - 1
    if last:
        tl.store(sem_ptr + tile, 0)
    return last


MAX_TILES = 1 << 16  # tile counters per device, all zero between launches
_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's tile counters (zeros; allocated at the first call, an eager one before any
    graph is captured); at least `tiles` of them."""
    if tiles > MAX_TILES:
        raise ValueError(f"{tiles} tiles exceed the {MAX_TILES} split counters")
    if device not in _counters:
        _counters[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _counters[device]
