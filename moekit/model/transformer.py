"""The decoder-only MoE transformer, its construction on the meta device, and its counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moekit.config import ModelConfig
from moekit.model.attention import Attention, KVCache
from moekit.model.layers import RMSNorm, SwiGLU, rope_frequencies
from moekit.model.moe import Experts, MoELayer, RouterStats


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    loss: torch.Tensor | None = None  # cross-entropy + coefficients x aux losses
    ce_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None  # mean over MoE layers
    z_loss: torch.Tensor | None = None  # mean over MoE layers
    router_stats: list[RouterStats] = field(default_factory=list)  # one per MoE layer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = MoELayer(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.dense_hidden)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        stats = None
        if self.is_moe:
            h, stats = self.ffn(self.ffn_norm(x))
        else:
            h = self.ffn(self.ffn_norm(x))
        return x + h, stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # recompute each block in the backward instead of keeping its activations (set by the trainer)
        self.activation_checkpointing = False
        self._init_rope(device=self.embed.weight.device)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def _init_rope(self, device=None):
        c = self.cfg
        original = c.rope_original_len or int(c.max_seq_len / c.rope_scaling)
        cos, sin = rope_frequencies(c.hd, c.max_seq_len, c.rope_theta, c.rope_scaling, device=device,
                                    kind=c.rope_type, original_len=original)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, hd]
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Normal(0, std) everywhere; output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        g = None if seed is None else torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)  # biases 0, norm weights 1
                continue
            s = out_std if name.endswith(("wo.weight", "w2.weight", "experts.w2")) else std
            if g is None:
                p.normal_(0.0, s)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * s)
        self._init_rope(device=self.embed.weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list | None = None, positions: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> ModelOutput:
        """idx: [B, T] token ids; targets: [B, T] (-100 = ignore); caches: one per layer (KVCache or
        any object with its `attend`); positions: [B, T] absolute positions when the tokens are not
        0..T-1 after the cache (packed batches of the inference engine); logits_at: [n] indices
        along T where logits are needed (the engine needs only each request's last token)."""
        B, T = idx.shape
        if positions is not None:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # [B, 1, T, hd]
        else:
            start = caches[0].pos if caches else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # [T, hd]
        x = self.embed(idx)  # [B, T, d]
        all_stats = []
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, stats = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, caches[i] if caches else None)
            if stats is not None:
                all_stats.append(stats)
        if logits_at is not None:
            x = x[:, logits_at]  # [B, n, d]
        logits = self.lm_head(self.norm(x))  # [B, T or n, vocab]
        out = ModelOutput(logits=logits, router_stats=all_stats)
        if all_stats:
            out.balance_loss = torch.stack([s.balance_loss for s in all_stats]).mean()
            out.z_loss = torch.stack([s.z_loss for s in all_stats]).mean()
        if targets is not None:
            out.ce_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=-100)
            out.loss = out.ce_loss
            if all_stats:
                out.loss = (out.loss + self.cfg.balance_loss_coef * out.balance_loss
                            + self.cfg.z_loss_coef * out.z_loss)
        return out

    def new_caches(self, batch: int, max_len: int | None = None, dtype=None) -> list[KVCache]:
        max_len = max_len or self.cfg.max_seq_len
        dev, dt = self.embed.weight.device, dtype or self.embed.weight.dtype
        return [KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.hd, dev, dt) for _ in self.blocks]


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Build on any device; on "meta" no memory is allocated (for counting and sharding)."""
    with torch.device(device):
        return Transformer(cfg)


# ---------------------------------------------------------------------------------------------
# Counting: the single place the planner and the benchmarks read parameter and FLOP counts from.

@dataclass
class ModelCounts:
    total_params: int
    active_params: int  # parameters touched per token (incl. embedding row and lm head)
    shared_params: int  # everything that is not an expert MLP
    expert_params: int  # all experts, all layers
    params_per_expert: int  # one expert summed over all MoE layers
    embedding_params: int  # input embedding table (a lookup, no FLOPs)
    matmul_params_active: int  # active params that take part in matmuls per token
    attn_flops_per_token: int  # forward attention-score FLOPs per token at full context
    forward_flops_per_token: int  # 2 x matmul_params_active + attention
    train_flops_per_token: int  # 3 x forward (backward = 2 x forward)
    n_layers: int
    n_moe_layers: int
    n_experts: int
    top_k: int
    context: int


def count_model(model: Transformer, context: int | None = None) -> ModelCounts:
    cfg = model.cfg
    T = context or cfg.max_seq_len
    seen: set[int] = set()
    total = expert = 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    for m in model.modules():
        if isinstance(m, Experts):
            expert += sum(p.numel() for p in m.parameters())
    n_moe = sum(b.is_moe for b in model.blocks)
    per_expert = expert // cfg.n_experts if n_moe else 0
    shared = total - expert
    active = shared + cfg.top_k * per_expert
    emb = model.embed.weight.numel()
    # the input embedding is a lookup; with tied weights the same matrix is a matmul in the head
    matmul_active = active - (0 if cfg.tie_embeddings else emb)
    # QK^T and AV: 2 matmuls x 2 FLOPs x T keys x (heads x hd), per layer (PaLM's convention)
    attn = 4 * cfg.n_layers * T * cfg.n_heads * cfg.hd
    fwd = 2 * matmul_active + attn
    return ModelCounts(total_params=total, active_params=active, shared_params=shared,
                       expert_params=expert, params_per_expert=per_expert, embedding_params=emb,
                       matmul_params_active=matmul_active, attn_flops_per_token=attn,
                       forward_flops_per_token=fwd, train_flops_per_token=3 * fwd,
                       n_layers=cfg.n_layers, n_moe_layers=n_moe, n_experts=cfg.n_experts,
                       top_k=cfg.top_k, context=T)


def count_config(cfg: ModelConfig, context: int | None = None) -> ModelCounts:
    return count_model(build_model(cfg, "meta"), context)
