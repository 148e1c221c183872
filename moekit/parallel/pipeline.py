"""Pipeline parallelism with torch.distributed.pipelining, applied to a plain model from outside.

The blocks are cut into `pp` contiguous stages: stage 0 also holds the embedding, the last stage
the final norm and the head. Each rank keeps one stage (a `StageModel` whose parameter names
are those of the plain model) and runs GPipe or 1F1B over micro-batches. The loss is computed on
the last stage only; the MoE auxiliary losses of every stage reach the backward through
`AuxLossToBackward`, so the gradients equal those of one process that accumulates over the same
micro-batches. With --dp, each stage is sharded with FSDP2 over its data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from moekit.errors import ConfigError
from moekit.model.moe import RouterStats
from moekit.model.transformer import Transformer


class AuxLossToBackward(torch.autograd.Function):
    """Identity on the hidden state whose backward also seeds `aux` with d(loss)/d(aux) = scale.

    Only the last stage sees the loss, so an earlier stage's auxiliary losses (balance, z) cannot
    be added to it; instead their gradient starts here when the hidden state's gradient comes back
    (Megatron-LM's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return hidden.clone()  # a new tensor, not a view: FSDP hooks the stage's output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous blocks per stage; the first stages take the remainder (the last holds the head)."""
    if n_layers < n_stages:
        raise ConfigError(f"{n_layers} layers cannot be split into {n_stages} pipeline stages")
    per, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + per + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


class StageModel(nn.Module):
    """One pipeline stage: the plain model's modules for `layers` (shared, not copied), under the
    same attribute names so that state-dict keys match the plain model's."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})  # keys keep block numbers
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)  # [max_seq_len, hd]
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.activation_checkpointing = model.activation_checkpointing
        moe = [i for i in range(self.cfg.n_layers) if model.blocks[i].is_moe]
        self.n_moe = len(moe)
        self.moe_index = {i: moe.index(i) for i in layers if i in moe}  # block -> index among MoE layers
        self.aux_scale = 1.0  # d(step loss)/d(this micro-batch's loss), set by the train step
        self.stats: list[tuple[int, RouterStats]] = []  # (MoE layer index, stats) per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T] token ids on the first stage, else [B, T, d] -> [B, T, d] or logits [B, T, vocab]"""
        if self.embed is not None:
            x = self.embed(x)  # [B, T, d]
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # [T, hd]
        training = self.training and torch.is_grad_enabled()
        aux = None
        for key, block in self.blocks.items():
            if self.activation_checkpointing and training:
                x, stats = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin)
            if stats is None:
                continue
            if not x.is_meta:  # the schedule's shape inference runs on meta tensors
                self.stats.append((self.moe_index[int(key)], stats))
            # the model's loss adds coef x (mean over MoE layers); this layer's share of it
            share = (self.cfg.balance_loss_coef * stats.balance_loss + self.cfg.z_loss_coef * stats.z_loss) / self.n_moe
            aux = share if aux is None else aux + share
        if training and aux is not None:
            x = AuxLossToBackward.apply(x, aux, self.aux_scale)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))  # [B, T, vocab]
        return x


@dataclass
class Pipeline:
    module: StageModel
    stage: PipelineStage
    schedule: ScheduleGPipe | Schedule1F1B
    group: dist.ProcessGroup
    index: int  # this rank's stage
    n_stages: int
    n_microbatches: int
    ce: list  # cross-entropy per micro-batch (last stage), filled by the loss function
    loss_scale: float = 1.0

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    def peer(self, index: int) -> int:
        return dist.get_global_rank(self.group, index)


def build_pipeline(model: Transformer, mesh: DeviceMesh, device: torch.device, schedule: str = "1f1b",
                   n_microbatches: int = 0, bf16: bool = False) -> Pipeline:
    """Keep this rank's stage of `model` (coordinate on the mesh's "pp" dimension), shard it with
    FSDP2 over "dp" when that dimension is > 1, and build the schedule."""
    pp_mesh = mesh["pp"]
    n_stages, index = pp_mesh.size(), pp_mesh.get_local_rank()
    n_microbatches = n_microbatches or n_stages
    if schedule == "1f1b" and n_microbatches < n_stages:
        raise ConfigError(f"the 1F1B schedule needs at least as many micro-batches as stages "
                          f"({n_microbatches} < {n_stages}); raise --pp-microbatches")
    if model.cfg.tie_embeddings:
        raise ConfigError("tie_embeddings does not combine with --pp (the embedding and head live on different stages)")
    layers = stage_layers(model.cfg.n_layers, n_stages)[index]
    module = StageModel(model, layers, index == 0, index == n_stages - 1)
    if mesh["dp"].size() > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in module.blocks.values():
            fully_shard(block, mesh=mesh["dp"], mp_policy=mp)
        fully_shard(module, mesh=mesh["dp"], mp_policy=mp)
    group = pp_mesh.get_group()
    stage = PipelineStage(module, index, n_stages, device, group=group)
    pipe = Pipeline(module, stage, None, group, index, n_stages, n_microbatches, [])  # type: ignore[arg-type]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if not ce.is_meta:
            pipe.ce.append(ce.detach())
        return ce * pipe.loss_scale

    # scale_grads=False: the schedule would divide every gradient, including those accumulated by
    # earlier calls in the same optimizer step; the loss function carries the scale instead
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    pipe.schedule = cls(stage, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return pipe


@dataclass
class PipelineStepStats:
    ce: torch.Tensor  # mean cross-entropy over the step's micro-batches (every rank)
    balance: torch.Tensor
    z: torch.Tensor
    load: torch.Tensor  # [MoE layers, E]
    dropped: torch.Tensor


def _collect(pipe: Pipeline, n_forward: int) -> PipelineStepStats:
    """Per-step means over micro-batches and MoE layers; one all-reduce over the world gathers every
    stage's share (the others add zeros) and averages the data-parallel replicas."""
    m, cfg = pipe.module, pipe.module.cfg
    dev = m.rope_cos.device
    # the first step's shape inference may run the stage once more on real inputs: keep the last records
    stats, ces = m.stats[len(m.stats) - n_forward * len(m.moe_index):], pipe.ce[len(pipe.ce) - n_forward:]
    n_moe = max(m.n_moe, 1)
    load = torch.zeros(n_moe, cfg.n_experts, device=dev)  # [MoE layers, E]
    scalars = torch.zeros(4, device=dev)  # ce, balance, z, dropped
    if pipe.is_last:
        scalars[0] = torch.stack(ces).sum() / n_forward
    for j, s in stats:
        scalars[1] += s.balance_loss.detach().float() / (n_moe * n_forward)
        scalars[2] += s.z_loss.detach().float() / (n_moe * n_forward)
        scalars[3] += s.dropped.float() / (n_moe * n_forward)
        load[j] += s.load.float() / n_forward
    flat = torch.cat([scalars, load.view(-1)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size() // pipe.n_stages  # data-parallel replicas
    m.stats.clear()
    pipe.ce.clear()
    return PipelineStepStats(flat[0], flat[1], flat[2], flat[4:].view(n_moe, cfg.n_experts), flat[3])


def train_step(pipe: Pipeline, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast) -> PipelineStepStats:
    """Forward and backward over `batches` (the optimizer step's accumulation micro-batches, each
    [B, T] inputs and targets, cut into n_microbatches by the schedule). The gradients are those of
    mean over every pipeline micro-batch of (ce + coef x aux losses)."""
    n_forward = len(batches) * pipe.n_microbatches
    pipe.loss_scale = pipe.module.aux_scale = 1.0 / n_forward
    pipe.module.stats.clear()
    pipe.ce.clear()
    for x, y in batches:
        with autocast():
            if pipe.is_first:
                pipe.schedule.step(x)
            elif pipe.is_last:
                pipe.schedule.step(target=y, losses=[])
            else:
                pipe.schedule.step()
    return _collect(pipe, n_forward)


def clip_grad_norm(pipe: Pipeline, max_norm: float) -> torch.Tensor:
    """Clip by the norm over every stage's gradients (FSDP shards included); returns that norm."""
    grads = [p.grad for p in pipe.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=pipe.module.rope_cos.device)
    if isinstance(norm, DTensor):  # a partial norm over the data-parallel shards
        norm = norm.full_tensor()
    sq = norm.float().pow(2)
    dist.all_reduce(sq, group=pipe.group)
    total = sq.sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


@torch.no_grad()
def evaluate_ce(pipe: Pipeline, seqs: torch.Tensor, micro_batch: int, device: torch.device, autocast) -> float:
    """Mean cross-entropy of `seqs` [n, T + 1] through the stages (forward only, point to point);
    every rank of the pipeline gets the value."""
    m = pipe.module
    m.eval()
    total = torch.zeros((), device=device)
    for i in range(0, len(seqs), micro_batch):
        chunk = seqs[i:i + micro_batch].to(device)  # [b, T + 1]
        b, T = chunk.shape[0], chunk.shape[1] - 1
        with autocast():
            if pipe.is_first:
                h = m(chunk[:, :-1])
            else:
                h = torch.empty(b, T, m.cfg.d_model, device=device)  # [b, T, d]
                dist.recv(h, pipe.peer(pipe.index - 1), group=pipe.group)
                h = m(h)
            if pipe.is_last:
                ce = F.cross_entropy(h.float().view(-1, h.shape[-1]), chunk[:, 1:].reshape(-1), ignore_index=-100)
                total += ce * b
            else:
                dist.send(h.float().contiguous(), pipe.peer(pipe.index + 1), group=pipe.group)
    m.stats.clear()
    m.train()
    dist.broadcast(total, pipe.peer(pipe.n_stages - 1), group=pipe.group)
    return float(total) / len(seqs)


# -- full (gathered) state for checkpoints ------------------------------------------------------

_FULL_ON_DEVICE = StateDictOptions(full_state_dict=True)  # every rank gets full tensors; cpu_offload keeps them on global rank 0 only


def gather_full_state(pipe: Pipeline, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's state on global rank 0 ({} elsewhere), keyed by the plain
    model's parameter names. Collective over every rank."""
    sd = {k: v.detach().cpu() for k, v in get_model_state_dict(pipe.module, options=_FULL_ON_DEVICE).items()}
    osd = get_optimizer_state_dict(pipe.module, opt, options=_FULL_ON_DEVICE)
    osd = {"state": {k: {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in st.items()}
                     for k, st in osd["state"].items()},
           "param_groups": osd["param_groups"]}
    if dist.get_rank() != 0 and dist.get_global_rank(pipe.group, 0) != 0:
        return {}, {}  # another data-parallel replica: the same values
    parts = [None] * pipe.n_stages if dist.get_rank() == 0 else None
    dist.gather_object((sd, osd), parts, dst=0, group=pipe.group)
    if dist.get_rank() != 0:
        return {}, {}
    full_sd, full_osd = {}, {"state": {}, "param_groups": [dict(g, params=[]) for g in osd["param_groups"]]}
    for part_sd, part_osd in parts:
        full_sd.update(part_sd)
        full_osd["state"].update(part_osd["state"])
        for g, pg in zip(full_osd["param_groups"], part_osd["param_groups"]):
            g["params"] += pg["params"]
    return full_sd, full_osd


def stage_subset(module: nn.Module, model_sd: dict | None, opt_sd: dict | None) -> tuple[dict | None, dict | None]:
    """The entries of full (whole-model) state dicts that belong to this stage."""
    names = set(module.state_dict().keys())
    if model_sd is not None:
        model_sd = {k: v for k, v in model_sd.items() if k in names}
    if opt_sd is not None:
        opt_sd = {"state": {k: v for k, v in opt_sd.get("state", {}).items() if k in names},
                  "param_groups": [dict(g, params=[p for p in g["params"] if p in names])
                                   for g in opt_sd.get("param_groups", [])]}
    return model_sd, opt_sd
