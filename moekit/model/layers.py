"""Small building blocks: RMSNorm, rotary position embeddings, the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 for stability under bf16 autocast, like Llama
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_frequencies(head_dim: int, max_len: int, theta: float = 10000.0, scaling: float = 1.0,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] for rotary embeddings (Su et al., 2021).

    `scaling` > 1 is linear position interpolation (Chen et al., 2023): position p is read as
    p / scaling so a model trained at length L sees positions up to scaling * L in range.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    pos = torch.arange(max_len, dtype=torch.float64, device=device) / scaling
    angles = torch.outer(pos, inv_freq)  # [max_len, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim], rotate-half layout
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, hd] or [B, 1, T, hd]. Rotate-half convention (as in HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class SwiGLU(nn.Module):
    """Dense gated MLP: w2(silu(x w1) * (x w3)) (Shazeer, 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
