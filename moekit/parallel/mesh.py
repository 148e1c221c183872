"""Parallel layouts: validate --dp --tp --pp --ep against the world size and build the DeviceMesh;
apply FSDP2 (fully_shard) from outside the plain model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moekit.errors import ConfigError


@dataclass
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def validate(self, world_size: int) -> "ParallelDims":
        for name in ("dp", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        product = self.dp * self.tp * self.pp * self.ep
        if product != world_size:
            raise ConfigError(f"dp x tp x pp x ep = {self.dp} x {self.tp} x {self.pp} x {self.ep} = {product}, "
                              f"but {world_size} processes were launched")
        if self.pp > 1 and (self.ep > 1 or self.tp > 1):
            raise ConfigError("--pp combines with --dp only (FSDP inside each stage), not with --ep or --tp")
        if self.tp > 1 and self.ep > 1:
            raise ConfigError("--tp combines with --dp only, not with --ep (experts split over tp instead)")
        return self


MESH_DIMS = ("pp", "dp", "ep", "tp")  # outermost to innermost: tp ranks are neighbours (fastest links)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """A 4-D (pp, dp, ep, tp) mesh over all ranks; a dimension of size 1 is a no-op."""
    shape = tuple(getattr(dims, name) for name in MESH_DIMS)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, bf16: bool = False) -> nn.Module:
    """FSDP2: shard every block, then the root (embedding, final norm, head), over `mesh`.
    On GPU, bf16 compute with fp32 gradient reduction."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
