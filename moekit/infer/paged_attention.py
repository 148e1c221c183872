"""Attention over the paged KV cache, as a per-layer object with the model's `attend(q, k, v)`.

A step's tokens are packed in one row: [decode tokens (one per request) | prefill chunks].
Keys and values of every token are written to their slots; decode tokens attend through
`paged_decode` (a Triton kernel on GPU that reads K/V straight from the blocks, a plain PyTorch
reference elsewhere); each prefill chunk attends to its request's cached prefix plus itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each token
    num_decode: int  # the first num_decode tokens are single-token decode rows
    block_tables: torch.Tensor  # [num_decode, max_blocks] block ids of each decode row (padded)
    context_lens: torch.Tensor  # [num_decode] tokens to attend to, including the new one
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (start in T, length, cached prefix, block ids)
    max_context: int = 0  # upper bound of context_lens (sizes the reference gather)


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """q: [B, H, hd]; k_cache/v_cache: [num_blocks, block_size, Hkv, hd] -> [B, H, hd].
    Gathers each row's blocks into a padded copy: the simple reference the kernel is checked against."""
    B, H, hd = q.shape
    Hkv = k_cache.shape[2]
    k = k_cache[block_tables].reshape(B, -1, Hkv, hd).transpose(1, 2)  # [B, Hkv, S, hd]
    v = v_cache[block_tables].reshape(B, -1, Hkv, hd).transpose(1, 2)
    S = k.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] < context_lens[:, None]  # [B, S]
    y = F.scaled_dot_product_attention(q[:, :, None].to(k.dtype), k, v, attn_mask=mask[:, None, None, :],
                                       enable_gqa=H != Hkv)
    return y[:, :, 0]  # [B, H, hd]


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, max_context: int = 0):
    if q.is_cuda and q.dtype != torch.float64:  # the kernel accumulates in float32
        from moekit.infer.triton_paged import paged_decode_triton

        return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens)
    return paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens)


class PagedAttentionLayer:
    """The cache object handed to one attention layer for one engine step."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
        self.k_cache, self.v_cache, self.meta = k_cache, v_cache, meta  # [num_blocks, bs, Hkv, hd]
        self.pos = 0  # unused: positions come from the engine

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [1, H, T, hd]; k, v: [1, Hkv, T, hd] -> [1, H, T, hd]"""
        m = self.meta
        H, hd = q.shape[1], q.shape[3]
        Hkv = k.shape[1]
        kc = self.k_cache.view(-1, Hkv, hd)  # [num_blocks * bs, Hkv, hd]
        vc = self.v_cache.view(-1, Hkv, hd)
        kc.index_copy_(0, m.slot_mapping, k[0].transpose(0, 1).to(kc.dtype))  # [T, Hkv, hd] into slots
        vc.index_copy_(0, m.slot_mapping, v[0].transpose(0, 1).to(vc.dtype))
        outs = []
        if m.num_decode:
            qd = q[0, :, :m.num_decode].transpose(0, 1)  # [n_dec, H, hd]
            yd = paged_decode(qd, self.k_cache, self.v_cache, m.block_tables, m.context_lens, m.max_context)
            outs.append(yd.transpose(0, 1).to(q.dtype))  # [H, n_dec, hd]
        for start, n, prefix, blocks in m.prefills:
            total = prefix + n
            kk = self.k_cache[blocks].reshape(-1, Hkv, hd)[:total].transpose(0, 1)  # [Hkv, total, hd]
            vv = self.v_cache[blocks].reshape(-1, Hkv, hd)[:total].transpose(0, 1)
            qq = q[0, :, start:start + n]  # [H, n, hd]
            # query i sits at position prefix + i and sees keys 0 .. prefix + i
            mask = torch.arange(total, device=q.device)[None, :] <= (prefix + torch.arange(n, device=q.device))[:, None]
            y = F.scaled_dot_product_attention(qq[None].to(kk.dtype), kk[None], vv[None], attn_mask=mask,
                                               enable_gqa=H != Hkv)
            outs.append(y[0].to(q.dtype))  # [H, n, hd]
        return torch.cat(outs, dim=1)[None] if len(outs) > 1 else outs[0][None]
