"""Programmatic dependent launch (Hopper and later) for the decode kernels.

A decode step is a chain of small kernels; between two of them the GPU idles while the next one
launches and its programs are placed. Launched with PDL, a kernel's programs are placed while the
previous kernel is still running and wait (griddepcontrol.wait) at their top until that kernel
has finished and its writes are visible, so the numbers are those of plain stream order; only the
launch gap goes. Every kernel taking `PDL` calls `gdc` first, before touching memory.

MOEKIT_PDL=0 switches it off (as does `ENABLED = False` before the kernels are launched or a
graph captured).
"""

from __future__ import annotations

import functools
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


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_kw(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking PDL, its tensors on t's device."""
    on = ENABLED and t.is_cuda and _hopper(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
