"""Small building blocks: RMSNorm, rotary position embeddings, the SwiGLU MLP."""

from __future__ import annotations

import math

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


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_len: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """YaRN / NTK-by-parts (Peng et al., 2023): dimensions that rotate many times over the original
    context keep their frequency (extrapolate), slow ones are interpolated by `factor`, with a linear
    ramp between; attention logits are sharpened by 0.1 ln(factor) + 1 (applied to cos and sin).
    Returns inv_freq [head_dim / 2] (float64) and that attention factor."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))

    def dim_for(rotations: float) -> float:  # the dimension that turns `rotations` times over original_len
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0: extrapolate
    inv = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0


def rope_frequencies(head_dim: int, max_len: int, theta: float = 10000.0, scaling: float = 1.0,
                     device=None, kind: str = "linear", original_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] for rotary embeddings (Su et al., 2021).

    kind "linear" with scaling > 1 is position interpolation (Chen et al., 2023): position p is read
    as p / scaling. kind "yarn" scales by frequency band instead (see yarn_inv_freq); original_len
    is the pretraining context. scaling = 1 is plain RoPE for both.
    """
    mscale = 1.0
    if kind == "yarn" and scaling > 1:
        inv_freq, mscale = yarn_inv_freq(head_dim, theta, scaling, original_len or max_len)
        pos = torch.arange(max_len, dtype=torch.float64)
    else:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        pos = torch.arange(max_len, dtype=torch.float64) / scaling
    angles = torch.outer(pos, inv_freq)  # [max_len, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_len, head_dim], rotate-half layout
    return (angles.cos() * mscale).float().to(device), (angles.sin() * mscale).float().to(device)


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
