"""Mixture-of-Experts feed-forward: Router -> Experts -> gate-weighted sum of the chosen experts."""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.config import ModelConfig
from moekit.model.layers import SwiGLU
from moekit.ops.experts import combine, expert_swiglu, sort_by_expert


@dataclass
class RouterStats:
    balance_loss: torch.Tensor  # scalar, 1.0 for perfectly uniform routing
    z_loss: torch.Tensor  # scalar
    load: torch.Tensor  # [E] fraction of assignments per expert (detached)
    dropped: torch.Tensor  # scalar, fraction of assignments dropped by capacity (detached)


@dataclass
class Routing:
    gates: torch.Tensor  # [N, k] weights of the chosen experts (0 where dropped)
    experts: torch.Tensor  # [N, k] chosen expert ids
    keep: torch.Tensor | None  # [N, k] False where capacity dropped the assignment
    stats: RouterStats


class Router(nn.Module):
    """Linear -> softmax -> top-k, with the Switch/GShard balance loss and ST-MoE z-loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.renorm, self.capacity_factor = cfg.renorm_gates, cfg.capacity_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.init_std)

    def capacity(self, n_tokens: int) -> int:
        """Slots per expert (GShard): capacity_factor x the uniform share of assignments."""
        exact = Fraction(str(self.capacity_factor)) * n_tokens * self.top_k / self.n_experts
        return math.ceil(exact)  # exact arithmetic: 1.1 * 100 * 2 / 4 is 55 slots, not 56

    def _keep(self, experts: torch.Tensor, N: int) -> torch.Tensor:
        """[N, k] False where capacity drops the assignment. GShard priority: every token's first
        choice before any second choice, then by position."""
        k = experts.shape[1]
        choice_major = F.one_hot(experts.t().reshape(-1), self.n_experts)  # [k*N, E]
        slot = ((choice_major.cumsum(0) - 1) * choice_major).sum(-1)  # [k*N] position in its expert
        return (slot < self.capacity(N)).view(k, N).t()  # [N, k]

    def forward(self, x: torch.Tensor) -> Routing:
        N, E, k = x.shape[0], self.n_experts, self.top_k
        # routing decisions in float32: small logit differences pick experts
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        probs = logits.softmax(-1)  # [N, E]
        gates, experts = probs.topk(k, dim=-1)  # [N, k]
        if self.renorm:
            # Mixtral renormalises the k chosen gates so the output scale does not depend on k
            gates = gates / gates.sum(-1, keepdim=True)

        if torch.is_inference_mode_enabled():
            # serving is dropless (a token's output must not depend on the rest of the batch), and
            # the balance and z losses are training signals: skip their ~10 kernels per layer
            zero = torch.zeros((), device=x.device)
            return Routing(gates, experts, None, RouterStats(zero, zero, zero, zero))
        assigned = torch.zeros(E, device=x.device).scatter_add_(
            0, experts.reshape(-1), torch.ones(N * k, device=x.device))  # [E]
        frac = assigned / (N * k)  # [E] fraction of assignments, sums to 1
        # Switch Transformer (Fedus et al., 2021) balance loss, normalised so uniform routing = 1
        balance = E * (frac * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, -1).pow(2).mean()  # ST-MoE (Zoph et al., 2022)

        keep = None
        dropped = torch.zeros((), device=x.device)
        if self.capacity_factor > 0:
            keep = self._keep(experts, N)
            gates = gates * keep
            dropped = 1.0 - keep.float().mean()
        stats = RouterStats(balance, z_loss, frac.detach(), dropped.detach())
        return Routing(gates, experts, keep, stats)


class Experts(nn.Module):
    """E SwiGLU MLPs with stacked weights: w1, w3 [E, d, f], w2 [E, f, d]."""

    def __init__(self, n_experts: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [N, d] -> [N, d]"""
        E, k = self.w1.shape[0], routing.experts.shape[1]
        order, counts = sort_by_expert(routing.experts, E, routing.keep)  # [N*k], [E]
        xs = x[order // k]  # [N*k, d] token rows, sorted by expert
        ys = expert_swiglu(xs, self.w1, self.w3, self.w2, counts, self.impl,
                           dropless=routing.keep is None)  # [N*k, d]
        return combine(ys, order, routing.gates)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.ffn_dim, cfg.expert_impl)
        # Qwen2-MoE: an always-on shared expert, scaled by a per-token sigmoid gate
        self.shared_expert = SwiGLU(cfg.d_model, cfg.shared_expert_ffn) if cfg.shared_expert_ffn else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_expert_ffn else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        routing = self.router(x)
        y = self.experts(x, routing)  # [N, d]
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared_expert(x)
        return y.view(shape), routing.stats
