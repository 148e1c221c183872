"""Tensor parallelism with DTensor (Megatron-LM, Shoeybi et al., 2019), applied to a plain model
from outside: attention heads and MLP hidden units split over the ranks of a 1-D `tp` mesh.

- attention: wq (and wk, wv when the K/V heads split evenly) column-wise, wo row-wise; each rank
  attends with its n_heads / tp query heads. With fewer K/V heads than ranks (multi-query), wk and
  wv stay whole on every rank and each rank keeps the K/V head its query heads read.
- dense SwiGLU MLPs and the shared expert: w1, w3 column-wise, w2 row-wise.
- experts: the stacked w1, w3 [E, d, f] are Shard(2) and w2 [E, f, d] Shard(1); every rank runs
  every expert on its f / tp hidden units, and the partial outputs are summed once, after the
  gate-weighted combine.
- embedding, norms, router, lm_head: plain replicated parameters. Their inputs and gradients are
  the same on every rank (each split region sums its input gradient on the way out), so they
  need no communication.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from moekit.errors import ConfigError
from moekit.model.attention import Attention
from moekit.model.layers import SwiGLU
from moekit.model.moe import Experts, MoELayer, Routing
from moekit.ops.experts import combine, expert_swiglu, sort_by_expert


def copy_to_tp(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; the backward sums the ranks' partial gradients (Megatron's f)."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def reduce_from_tp(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sum the ranks' partial results; identity backward (Megatron's g)."""
    return DTensor.from_local(t, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


class TensorParallelExperts(nn.Module):
    """An `Experts` module whose stacked weights are split along the hidden dimension f."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        self.mesh, self.impl = mesh, experts.impl
        self.w1 = nn.Parameter(distribute_tensor(experts.w1.detach(), mesh, [Shard(2)]))  # [E, d, f/tp] local
        self.w3 = nn.Parameter(distribute_tensor(experts.w3.detach(), mesh, [Shard(2)]))
        self.w2 = nn.Parameter(distribute_tensor(experts.w2.detach(), mesh, [Shard(1)]))  # [E, f/tp, d] local

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [N, d] (the same on every rank) -> [N, d]"""
        E, k = self.w1.shape[0], routing.experts.shape[1]
        # x and the gates feed partial outputs: their gradients are summed over the ranks
        x, gates = copy_to_tp(x, self.mesh), copy_to_tp(routing.gates, self.mesh)
        order, counts = sort_by_expert(routing.experts, E, routing.keep)  # [N*k], [E]
        xs = x[order // k]  # [N*k, d]
        w1, w3, w2 = self.w1.to_local(), self.w3.to_local(), self.w2.to_local()
        ys = expert_swiglu(xs, w1, w3, w2, counts, self.impl, dropless=routing.keep is None)  # [N*k, d] partial
        # combine is linear in ys: sum the [N, d] result rather than the k times larger ys
        return reduce_from_tp(combine(ys, order, gates), self.mesh)


class ReplicatedKVHeads(ParallelStyle):
    """wk or wv when the K/V heads do not split over the ranks (n_kv_heads < tp, multi-query): the
    weight stays whole on every rank, which keeps the K/V head its query heads read. The K/V heads
    are repeated to one slot per rank and sharded, so the backward all-gathers the per-rank
    gradients and the weight's gradient is whole and the same on every rank."""

    def __init__(self, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_kv_heads, self.hd = n_kv_heads, head_dim

    def _input(self, module, inputs, mesh):
        x = inputs[0]
        return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False),
                *inputs[1:])

    def _output(self, module, out: DTensor, mesh):
        B, T, _ = out.shape  # [B, T, Hkv * hd], replicated
        tp, Hkv, hd = mesh.size(), self.n_kv_heads, self.hd
        # slot r holds K/V head r // (tp / Hkv): rank r's query heads read exactly that head
        slots = out.view(B, T, Hkv, 1, hd).expand(B, T, Hkv, tp // Hkv, hd).reshape(B, T, tp * hd)
        return slots.redistribute(mesh, [Shard(2)]).to_local()  # [B, T, hd]

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, mesh, None, self._input, self._output)


def check_tensor_parallel(cfg, tp: int) -> None:
    """ConfigError unless the model's heads and hidden sizes split over `tp` ranks."""
    if tp == 1:
        return
    if cfg.n_heads % tp:
        raise ConfigError(f"n_heads ({cfg.n_heads}) must be divisible by --tp ({tp})")
    if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
        raise ConfigError(f"n_kv_heads ({cfg.n_kv_heads}) must divide or be divisible by --tp ({tp})")
    if cfg.qk_norm:
        raise ConfigError("qk_norm normalises over all heads: it is not available with --tp > 1")
    for name in ("ffn_dim", "dense_hidden", "shared_expert_ffn"):
        size = getattr(cfg, name)
        if size and size % tp:
            raise ConfigError(f"{name} ({size}) must be divisible by --tp ({tp})")


def _swiglu_plan(prefix: str) -> dict[str, ParallelStyle]:
    return {
        # one Replicate input for w1 and w3, so the backward sums their input gradients once
        prefix: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        f"{prefix}.w1": ColwiseParallel(),
        f"{prefix}.w3": ColwiseParallel(),
        f"{prefix}.w2": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Split every block's attention and MLPs over the 1-D `tp_mesh` in place; returns the model."""
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    for block in model.blocks:
        attn: Attention = block.attn
        split_kv = attn.n_kv_heads % tp == 0
        kv = ColwiseParallel() if split_kv else ReplicatedKVHeads(attn.n_kv_heads, attn.hd)
        plan: dict[str, ParallelStyle] = {
            # attention's other inputs (cos, sin, cache) stay local
            "attn": PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None)),
            "attn.wq": ColwiseParallel(),
            "attn.wk": kv,
            "attn.wv": kv,
            "attn.wo": RowwiseParallel(),
        }
        if isinstance(block.ffn, SwiGLU):
            plan.update(_swiglu_plan("ffn"))
        elif isinstance(block.ffn, MoELayer) and block.ffn.shared_expert is not None:
            plan.update(_swiglu_plan("ffn.shared_expert"))
        parallelize_module(block, tp_mesh, plan)
        if isinstance(block.ffn, MoELayer):
            block.ffn.experts = TensorParallelExperts(block.ffn.experts, tp_mesh)
    return model
