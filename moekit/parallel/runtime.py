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

from moekit.errors import ConfigError
from moekit.parallel.mesh import ParallelDims, build_mesh

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(dp: int, ep: int, device: str) -> DistContext | None:
    """None for a single process; else the process group (NCCL on GPU, gloo on CPU) and mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims(dp=dp, ep=ep)
    if world == 1 and dp == 1 and ep == 1:
        return None
    dims.validate(world)
    if ep > 1:
        raise ConfigError("the trainer runs data parallel (--dp) so far; expert parallelism is available to "
                          "your own loop through moekit.parallel.expert_parallel.apply_expert_parallel")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, build_mesh(dims, dev.type))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, opt, options=FULL)


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None, model_sd: dict | None,
                    opt_sd: dict | None) -> None:
    """Load full (unsharded) state into a model and optimizer of any layout."""
    opts = StateDictOptions(full_state_dict=True)
    if model_sd is not None:
        if getattr(model.cfg, "tie_embeddings", False) and "lm_head.weight" not in model_sd:
            model_sd = {**model_sd, "lm_head.weight": model_sd["embed.weight"]}
        set_model_state_dict(model, model_sd, options=opts)
    if opt is not None and opt_sd is not None:
        set_optimizer_state_dict(model, opt, opt_sd, options=opts)
