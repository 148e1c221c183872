"""Apply a (pp, dp, ep, tp) layout to the plain model in torchtitan's order (tensor parallel, then
expert parallel, then FSDP2 over the data-parallel ranks), and the parts of a training step that
depend on the layout: which data shard a rank reads, the gradient fix-up after backward, global
gradient-norm clipping and the optimizer step.

Data: the dp x ep ranks read distinct shards of every global micro-batch; tp ranks read the same.
EP x FSDP: the replicated (non-expert) parameters are FSDP-sharded over the flattened dp x ep
ranks, which all see different tokens; each rank's experts are FSDP-sharded over dp.
TP x FSDP: FSDP shards the tp-split DTensors over dp (2-D DTensors) and the rest over dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from moekit.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel, sync_replicated_grads
from moekit.parallel.mesh import ParallelDims, apply_fsdp
from moekit.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims, bf16: bool = False) -> nn.Module:
    """Tensor, expert and data parallelism (pp = 1) over `mesh` in place; returns the model."""
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if dims.ep > 1:
        apply_expert_parallel(model, mesh.get_group("ep"))
    if dims.dp > 1 and dims.ep > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for m in model.modules():
            if isinstance(m, ExpertParallelExperts):  # this rank's experts: shared by its dp peers only
                fully_shard(m, mesh=mesh["dp"], mp_policy=mp)
        apply_fsdp(model, mesh["dp", "ep"]._flatten("dp_ep"), bf16)
    elif dims.dp > 1:
        apply_fsdp(model, mesh["dp"], bf16)
    return model


def data_shard(mesh: DeviceMesh) -> tuple[int, int]:
    """(number of distinct data shards, this rank's shard): dp x ep ranks read different rows,
    tp ranks the same."""
    dp, ep = mesh["dp"], mesh["ep"]
    return dp.size() * ep.size(), dp.get_local_rank() * ep.size() + ep.get_local_rank()


def reduce_grads(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims) -> None:
    """After the backward passes: make every gradient the mean over all data shards. FSDP and the
    tp regions do it on their own; expert parallelism needs the fix-up below."""
    if dims.ep == 1:
        return
    if dims.dp == 1:
        sync_replicated_grads(model, mesh.get_group("ep"))
        return
    # FSDP averaged over dp x ep (replicated) or over dp (experts); an expert's gradient already
    # summed the tokens of every ep rank, so it still needs the division by ep
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.div_(dims.ep)


def _distinct_pieces(model: nn.Module, dims: ParallelDims) -> dict[nn.Parameter, int]:
    """How many different pieces a parameter is split into over the ranks of its stage."""
    pieces = {}
    experts = {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    for p in model.parameters():
        n = dims.ep if id(p) in experts else 1
        if isinstance(p, DTensor):
            for size, placement in zip(p.device_mesh.mesh.shape, p.placements):
                # Shard, or FSDP's _StridedShard over a tp-sharded dim (not a Shard in recent torch)
                n *= 1 if placement.is_replicate() else size
        pieces[p] = n
    return pieces


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """Clip to a global gradient norm, whatever mix of plain, replicated and sharded (DTensor, or
    expert-parallel) gradients the layout leaves: each rank adds its local squares weighted by
    1 / (how many ranks hold the same piece), and one all-reduce sums them. Returns the norm."""
    holders = dist.get_world_size() // dims.pp  # the ranks of one pipeline stage hold every parameter
    grads, total = [], None
    for p, pieces in _distinct_pieces(model, dims).items():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grads.append(g)
        sq = g.float().pow(2).sum() * (pieces / holders)
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), device=next(model.parameters()).device)
    dist.all_reduce(total)
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    """opt.step() where tensor parallelism leaves plain (replicated) and DTensor parameters side by
    side: they are taken as replicated DTensors, so one foreach or fused kernel covers both."""
    with implicit_replication():
        opt.step()
