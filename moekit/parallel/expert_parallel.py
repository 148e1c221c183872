"""Expert parallelism: each rank of the EP group holds E / ep experts; tokens travel to the rank
of their expert and back with all_to_all_single (uneven splits), applied to a plain model from
outside. The other parameters stay replicated and their gradients are averaged over the group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn

from moekit.errors import ConfigError
from moekit.model.moe import Experts, MoELayer, Routing
from moekit.ops.experts import combine, expert_swiglu, sort_by_expert


class ExpertParallelExperts(nn.Module):
    """The local slice of an `Experts` module plus the token exchange around it."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        E = experts.w1.shape[0]
        if E % self.ep:
            raise ConfigError(f"{E} experts cannot be split evenly over {self.ep} expert-parallel ranks")
        self.n_experts, self.n_local = E, E // self.ep
        lo = self.rank * self.n_local
        self.impl = experts.impl
        self.w1 = nn.Parameter(experts.w1.detach()[lo:lo + self.n_local].clone())  # [E_local, d, f]
        self.w3 = nn.Parameter(experts.w3.detach()[lo:lo + self.n_local].clone())
        self.w2 = nn.Parameter(experts.w2.detach()[lo:lo + self.n_local].clone())  # [E_local, f, d]

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [N, d] local tokens -> [N, d]"""
        if routing.keep is not None:
            raise ConfigError("expert parallelism is dropless: set capacity_factor = 0")
        E, El, ep, k = self.n_experts, self.n_local, self.ep, routing.experts.shape[1]
        order, counts = sort_by_expert(routing.experts, E)  # [N*k], [E]
        xs = x[order // k]  # [N*k, d] grouped by expert = grouped by destination rank
        # every rank learns how many rows it receives from each source, per local expert
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [ep * El]: (source, local expert)
        send_splits = counts.view(ep, El).sum(1).tolist()  # host sync: split sizes must be known
        recv_splits = recv_counts.view(ep, El).sum(1).tolist()
        recv = xs.new_empty(sum(recv_splits), xs.shape[1])
        recv = dist_fn.all_to_all_single(recv, xs, recv_splits, send_splits, group=self.group)
        # rows arrive ordered (source rank, local expert): regroup them by local expert
        src_expert = torch.arange(ep * El, device=x.device).repeat_interleave(recv_counts)  # [R]
        local_e = src_expert % El
        regroup = torch.argsort(local_e, stable=True)  # [R]
        per_expert = recv_counts.view(ep, El).sum(0)  # [El]
        xr = recv[regroup]
        yr = expert_swiglu(xr, self.w1, self.w3, self.w2, per_expert, self.impl, dropless=True)  # [R, d]
        back = torch.empty_like(yr).index_copy(0, regroup, yr)  # (source, local expert) order again
        ys = xs.new_empty(xs.shape)
        ys = dist_fn.all_to_all_single(ys, back, send_splits, recv_splits, group=self.group)  # [N*k, d]
        return combine(ys, order, routing.gates)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Shard every MoE layer's experts over `group` in place; returns the model."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.experts = ExpertParallelExperts(m.experts, group)
    return model


def sync_replicated_grads(model: nn.Module, group: dist.ProcessGroup) -> None:
    """After backward: average the gradients of replicated parameters over the EP group (each rank
    saw different tokens), and scale the expert gradients, which already summed every rank's
    tokens, to the same mean."""
    ep = dist.get_world_size(group)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), ExpertParallelExperts):
            p.grad.div_(ep)
        else:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
            p.grad.div_(ep)
