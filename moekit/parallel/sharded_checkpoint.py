"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shard of
the weights and optimizer state, nothing is gathered on one rank, and a checkpoint saved at one
layout loads at any other (FSDP shards, pipeline stages, expert-parallel slices, one process).

Keys are the plain model's parameter names; the optimizer state is flattened to one entry per
parameter (`state.<name>.exp_avg`, `param_groups.<name>.lr`), so it does not depend on which
parameters a rank holds."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save or dcp.load; without a process group, in this process alone (quietly: that is meant)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def _expert_names(model: nn.Module) -> list[str]:
    """Names of the expert-parallel parameters: plain tensors that hold this rank's experts."""
    from moekit.parallel.expert_parallel import ExpertParallelExperts

    return [f"{name}.{pn}" for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for pn in ("w1", "w3", "w2")]


def _wrap_experts(model: nn.Module, state: dict, ep_mesh: DeviceMesh | None) -> None:
    """Present each rank's expert slice as a DTensor sharded along the expert dimension, so DCP
    sees the whole [E, ...] tensor (and can reshard it) instead of ep different tensors under one
    name. The DTensor shares the local tensor's storage: loading into it fills the local tensor."""
    names = _expert_names(model)
    if not names:
        return
    if ep_mesh is None:
        raise ValueError("expert-parallel parameters need the expert-parallel mesh to be saved or loaded")
    for section, keys in (("model", names), ("optim", [f"state.{n}.{s}" for n in names for s in ("exp_avg", "exp_avg_sq")])):
        for k in keys:
            t = state[section].get(k)
            if isinstance(t, DTensor):  # FSDP-sharded experts: a (dp, ep) layout, not described here
                raise ValueError("sharded checkpoints do not cover expert parallelism combined with FSDP yet")
            if t is not None:
                state[section][k] = DTensor.from_local(t, ep_mesh, [Shard(0)], run_check=False)


def _unwrap(state: dict) -> None:
    for section in state.values():
        for k, v in section.items():
            if isinstance(v, DTensor) and v.device_mesh.mesh_dim_names == ("ep",):
                section[k] = v.to_local()


def sharded_state(model: nn.Module, opt: torch.optim.Optimizer, ep_mesh: DeviceMesh | None = None) -> dict:
    """{"model": ..., "optim": ...} of this rank's shards, as DCP saves and loads them."""
    msd, osd = get_state_dict(model, opt, options=OPTIONS)  # initialises an empty optimizer state
    state = {"model": msd, "optim": osd}
    _wrap_experts(model, state, ep_mesh)
    return state


def save_sharded(model: nn.Module, opt: torch.optim.Optimizer, path: Path, ep_mesh: DeviceMesh | None = None) -> None:
    """Collective: every rank writes its shard into the folder `path` (rank 0 also the metadata)."""
    _dcp(dcp.save, sharded_state(model, opt, ep_mesh), path)


def load_sharded(model: nn.Module, opt: torch.optim.Optimizer, path: Path, ep_mesh: DeviceMesh | None = None) -> None:
    """Collective: read this rank's part of the checkpoint in `path`, whatever layout wrote it."""
    state = sharded_state(model, opt, ep_mesh)
    _dcp(dcp.load, state, path)
    _unwrap(state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIONS)


def read_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, read in one process without a process group
    (for generate, eval and convert)."""
    meta = FileSystemReader(str(path)).read_metadata()
    sd = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items()
          if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)  # fills the tensors in place
    return sd
