"""Expert compute and token permutation.

Two paths compute the same function:
- `swiglu_grouped`: one `torch._grouped_mm` per weight over all experts, on tokens sorted by
  expert, with device-side group offsets (no host synchronisation);
- `swiglu_loop`: the plain reference, one matmul per expert (reads group sizes on the host).
A test holds them equal, values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(expert_idx: torch.Tensor, n_experts: int, keep: torch.Tensor | None = None):
    """Order the N*k (token, choice) assignments by expert.

    expert_idx: [N, k] chosen experts; keep: [N, k] bool (False = dropped by capacity).
    Returns order [N*k] (assignment ids sorted by expert, dropped ones last) and
    counts [E] (kept assignments per expert). Assignment a belongs to token a // k.
    """
    flat = expert_idx.reshape(-1)  # [N*k]
    if keep is not None:
        flat = flat.masked_fill(~keep.reshape(-1), n_experts)  # dropped -> bucket E, sorted last
    order = torch.argsort(flat, stable=True)  # [N*k]
    # scatter_add instead of bincount: bincount reads the max on the host
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts[:n_experts]


_RUNS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm exists for this device and dtype. On CUDA it needs Hopper or
    newer and bf16; elsewhere one tiny trial call decides (cached)."""
    key = (device_type, dtype)
    if key not in _RUNS:
        if not hasattr(torch, "_grouped_mm"):
            _RUNS[key] = False
        elif device_type == "cuda":
            _RUNS[key] = dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0)
        else:
            try:
                a = torch.randn(16, 16, device=device_type, dtype=dtype)
                b = torch.randn(2, 16, 16, device=device_type, dtype=dtype)
                torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device_type))
                _RUNS[key] = True
            except (RuntimeError, NotImplementedError):
                _RUNS[key] = False
    return _RUNS[key]


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when torch._grouped_mm runs for this device/dtype and the shapes meet its rule
    that every row stride is a multiple of 16 bytes."""
    if not grouped_mm_runs(x.device.type, x.dtype):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, *weights))


def grouped_path_taken(device_type: str, dtype: torch.dtype, d: int, f: int, impl: str = "auto") -> bool:
    """Whether expert_swiglu takes the grouped path (no host read of the group sizes) for experts
    of width d -> f in this dtype: what decides if an MoE forward can be captured in a CUDA graph."""
    size = torch.empty((), dtype=dtype).element_size()
    return impl != "loop" and grouped_mm_runs(device_type, dtype) and all(n * size % 16 == 0 for n in (d, f))


def swiglu_grouped(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   counts: torch.Tensor, dropless: bool = False) -> torch.Tensor:
    """x: [M, d] rows sorted by expert; w1, w3: [E, d, f]; w2: [E, f, d]; counts: [E].

    Rows past sum(counts) (assignments dropped by capacity) come back as zeros. With
    dropless=True the caller promises sum(counts) == M and the masking is skipped.
    """
    offs = counts.cumsum(0).to(torch.int32)  # [E] end of each expert's rows
    if not dropless:
        # grouped_mm leaves rows past the last offset unwritten, in the forward (outputs) and
        # the backward (input gradients); masking input and output clears both.
        valid = (torch.arange(x.shape[0], device=x.device) < offs[-1])[:, None]  # [M, 1]
        x = torch.where(valid, x, 0.0)
    h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)  # [M, f]
    y = torch._grouped_mm(h, w2, offs=offs)  # [M, d]
    return y if dropless else torch.where(valid, y, 0.0)


def swiglu_loop(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
    """Reference path: one SwiGLU per expert on its slice of rows."""
    ys, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]  # [n, d]
        ys.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start += n
    ys.append(x.new_zeros(x.shape[0] - start, w2.shape[-1]))  # dropped rows
    return torch.cat(ys)


def expert_swiglu(xs: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                  impl: str = "auto", dropless: bool = False) -> torch.Tensor:
    """Expert SwiGLU on rows sorted by expert, through the grouped path or the loop reference
    (impl: "auto" | "grouped" | "loop"). Under autocast the operands are cast once here: autocast
    does not cover grouped_mm."""
    if torch.is_autocast_enabled(xs.device.type):
        dt = torch.get_autocast_dtype(xs.device.type)
        xs, w1, w3, w2 = xs.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
    supported = impl != "loop" and grouped_mm_supported(xs, w1, w2)
    if impl == "grouped" and not supported:
        raise RuntimeError(f"torch._grouped_mm is not available for {xs.dtype} on {xs.device.type} "
                           "with these shapes; use expert_impl='loop' or 'auto'")
    if supported:
        return swiglu_grouped(xs, w1, w3, w2, counts, dropless=dropless)
    return swiglu_loop(xs, w1, w3, w2, counts)


def combine(y_sorted: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Undo the expert sort and sum each token's k expert outputs weighted by its gates.

    y_sorted: [N*k, d]; order: [N*k]; gates: [N, k] -> [N, d]
    """
    N, k = gates.shape
    y = torch.zeros_like(y_sorted).index_copy(0, order, y_sorted)  # [N*k, d] in assignment order
    return (y.view(N, k, -1) * gates.unsqueeze(-1).to(y.dtype)).sum(1)  # [N, d]
