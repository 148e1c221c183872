"""Multi-query / grouped-query causal self-attention through F.scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.config import ModelConfig
from moekit.model.layers import RMSNorm, apply_rope


class KVCache:
    """A contiguous per-layer KV cache: [B, n_kv_heads, max_len, hd] for keys and values.

    The caller owns it and passes it to the model; `pos` is the number of positions filled.
    Any object with the same `attend(q, k, v)` method can stand in for it (the paged cache of
    moekit.infer does).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device=None,
                 dtype=torch.float32):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.pos + T > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.pos} + {T} > {self.k.shape[2]} positions")
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [B, Hkv, T, hd] after the cached positions; attend q [B, H, T, hd] causally."""
        start = self.pos
        k, v = self.update(k, v)  # [B, Hkv, start + T, hd]
        T, S = q.shape[2], k.shape[2]
        # query i sits at absolute position start + i and sees keys 0 .. start + i
        mask = torch.arange(S, device=q.device)[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.hd, bias=cfg.attn_bias)
        # one K/V head shared by all query heads is multi-query attention (Shazeer, 2019)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.d_model, bias=False)
        # QK-norm (OLMoE): RMSNorm over the whole q and k projections, before the heads split
        self.q_norm = RMSNorm(cfg.n_heads * self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.n_kv_heads * self.hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k = self.wq(x), self.wk(x)  # [B, T, H * hd], [B, T, Hkv * hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # head counts come from the projections: under tensor parallelism a rank holds some of the heads
        q = q.view(B, T, -1, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, -1, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.wv(x).view(B, T, -1, self.hd).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(q, k, v)  # [B, H, T, hd]
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        y = y.transpose(1, 2).reshape(B, T, q.shape[1] * self.hd)  # [B, T, H * hd]
        return self.wo(y)
