"""Process-group setup for `torchrun ... -m moekit train --dp N`, and the full (layout-free)
state dicts that checkpoints hold, so a run saved at one layout loads at another."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from moekit.parallel.mesh import ParallelDims, build_mesh

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh
    dims: ParallelDims

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(dims: ParallelDims, device: str) -> DistContext | None:
    """None for a single process; else the process group (NCCL on GPU, gloo on CPU) and mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and dims.dp * dims.tp * dims.pp * dims.ep == 1:
        return None
    dims.validate(world)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, build_mesh(dims, dev.type), dims)


def _expert_shards(model: torch.nn.Module) -> dict:
    from moekit.parallel.expert_parallel import ExpertParallelExperts

    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def _gather_experts(t: torch.Tensor, m) -> torch.Tensor:
    """Concatenate every EP rank's slice along the expert dimension (collective)."""
    if isinstance(t, DTensor):  # EP x FSDP: first this rank's experts, whole, from its dp peers
        t = t.full_tensor()
    parts = [torch.empty_like(t) for _ in range(m.ep)]
    dist.all_gather(parts, t.contiguous(), group=m.group)
    return torch.cat(parts)


def _slice_experts(t: torch.Tensor, m) -> torch.Tensor:
    return t[m.rank * m.n_local:(m.rank + 1) * m.n_local]


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    shards = _expert_shards(model)
    if not shards:
        return get_model_state_dict(model, options=FULL)
    sd = get_model_state_dict(model, options=FULL)  # gathers what FSDP shards; complete on rank 0
    for name, m in shards.items():
        for pn in ("w1", "w3", "w2"):
            sd[f"{name}.{pn}"] = _gather_experts(getattr(m, pn).detach(), m).cpu()
    return sd


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    osd = get_optimizer_state_dict(model, opt, options=FULL)  # complete on rank 0 only
    for name, m in _expert_shards(model).items():
        for pn in ("w1", "w3", "w2"):
            local = opt.state.get(getattr(m, pn), {})  # every rank joins the gathers
            for key in ("exp_avg", "exp_avg_sq"):
                if key in local:
                    full = _gather_experts(local[key], m).cpu()
                    if "state" in osd:
                        osd["state"][f"{name}.{pn}"][key] = full
    return osd


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None, model_sd: dict | None,
                    opt_sd: dict | None) -> None:
    """Load full (unsharded) state into a model and optimizer of any layout."""
    opts = StateDictOptions(full_state_dict=True)
    for name, m in _expert_shards(model).items():  # expert parallel: keep this rank's experts
        for pn in ("w1", "w3", "w2"):
            key = f"{name}.{pn}"
            if model_sd is not None and key in model_sd:
                model_sd = {**model_sd, key: _slice_experts(model_sd[key], m)}
            st = (opt_sd or {}).get("state", {}).get(key)
            if st is not None:
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        st[k] = _slice_experts(st[k], m)
    if model_sd is not None:
        if getattr(model.cfg, "tie_embeddings", False) and "lm_head.weight" not in model_sd:
            model_sd = {**model_sd, "lm_head.weight": model_sd["embed.weight"]}
        set_model_state_dict(model, model_sd, options=opts)
    if opt is not None and opt_sd is not None:
        set_optimizer_state_dict(model, opt, opt_sd, options=opts)
