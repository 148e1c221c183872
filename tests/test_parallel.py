"""Distributed training on CPU with gloo, spawned from pytest: FSDP2 and expert parallelism give
the same losses and gradients as one process on the same global batch."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.model.transformer import build_model
from moekit.parallel.mesh import ParallelDims

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=64, n_experts=4,
                  top_k=2, max_seq_len=32, balance_loss_coef=0.0, z_loss_coef=0.0, expert_impl="loop")
STEPS, B, T = 3, 2, 16  # per-rank micro-batch of B sequences


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(world: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG.vocab_size, (world * B, T + 1), generator=g) for _ in range(STEPS)]


def _reference(world: int):
    """One process, the whole global batch: per-step losses and first-step gradients."""
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], None
    for i, seqs in enumerate(_batches(world)):
        loss = model(seqs[:, :-1], seqs[:, 1:]).loss
        loss.backward()
        if i == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _worker(rank: int, world: int, port: int, mode: str, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(CFG)
        if mode == "fsdp":
            from moekit.parallel.mesh import apply_fsdp, build_mesh

            mesh = build_mesh(ParallelDims(dp=world), "cpu")
            apply_fsdp(model, mesh["dp"])
        else:
            from moekit.parallel.expert_parallel import apply_expert_parallel

            apply_expert_parallel(model, dist.group.WORLD)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for i, seqs in enumerate(_batches(world)):
            local = seqs[rank * B:(rank + 1) * B]  # this rank's share of the global batch
            loss = model(local[:, :-1], local[:, 1:]).loss
            loss.backward()
            if mode == "ep":
                from moekit.parallel.expert_parallel import sync_replicated_grads

                sync_replicated_grads(model, dist.group.WORLD)
            if i == 0:
                grads = {}
                for n, p in model.named_parameters():
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[n] = g.detach().clone()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        out[rank] = (losses, grads)
    finally:
        dist.destroy_process_group()


def _run(mode: str, world: int):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), mode, out), nprocs=world, join=True)
        return dict(out)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_matches_single_process(world):
    ref_losses, ref_grads = _reference(world)
    out = _run("fsdp", world)
    for rank in range(world):
        losses, grads = out[rank]
        # float32 reductions in another order: 1e-5 relative
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world):
    ref_losses, ref_grads = _reference(world)
    out = _run("ep", world)
    n_local = CFG.n_experts // world
    for rank in range(world):
        losses, grads = out[rank]
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for n, g in ref_grads.items():
            if ".experts." in n:  # this rank holds experts [rank * n_local, (rank + 1) * n_local)
                g = g[rank * n_local:(rank + 1) * n_local]
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


def test_parallel_dims_are_validated():
    ParallelDims(dp=2, ep=2 // 2).validate(2)
    with pytest.raises(ConfigError, match="4 processes"):
        ParallelDims(dp=2).validate(4)
    with pytest.raises(ConfigError, match="not available"):
        ParallelDims(tp=2).validate(2)
    with pytest.raises(ConfigError, match=">= 1"):
        ParallelDims(dp=0).validate(0)
