"""Tensor parallelism and its combinations with FSDP (TP x FSDP, EP x FSDP) on CPU with gloo,
spawned from pytest: a few optimizer steps give the same losses, gradient norms, first-step
gradients and final weights as one process on the same global batch."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.errors import ConfigError
from moekit.model.transformer import build_model
from moekit.parallel.mesh import ParallelDims
from tests.dist_helpers import assert_matches_single, free_port, init_gloo, run_config_toml, run_losses
from tests.test_parallel import CFG, B, _batches

# multi-query attention (one K/V head: wk, wv stay replicated under tp) with router aux losses,
# which tp keeps exact because every tp rank routes the same tokens
MQA = dataclasses.replace(CFG, balance_loss_coef=0.01, z_loss_coef=0.001)
# two K/V heads (split over tp = 2, replicated and shared by rank pairs at tp = 4), q/k/v biases,
# a dense MLP in every other layer, a shared expert, capacity-limited routing
GQA = dataclasses.replace(CFG, n_kv_heads=2, attn_bias=True, moe_every=2, n_layers=3, shared_expert_ffn=32,
                          capacity_factor=1.25)
LR, CLIP = 1e-2, 0.5  # the clip is below the gradient norm of the first steps: clipping is exercised
# float32 sums in another order: losses to 1e-5 relative; gradient norms (sums of squares over
# all ranks' pieces) and gradients to 1e-4 relative
RTOL = 1e-5


def _reference(cfg, shards: int):
    """One process, the whole global batch (shards x B sequences): per-step losses and clipped
    gradient norms, first-step gradients, final weights."""
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms, grads = [], [], None
    for i, seqs in enumerate(_batches(shards)):
        loss = model(seqs[:, :-1], seqs[:, 1:]).loss
        loss.backward()
        if i == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, norms, grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Every gradient as one whole tensor (collective): DTensors gathered, expert-parallel slices
    concatenated over the ep ranks."""
    from torch.distributed.tensor import DTensor

    from moekit.parallel.expert_parallel import ExpertParallelExperts

    expert_mods = {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        owner = expert_mods.get(n.rsplit(".", 1)[0])
        if owner is not None:
            parts = [torch.empty_like(g) for _ in range(owner.ep)]
            dist.all_gather(parts, g.contiguous(), group=owner.group)
            g = torch.cat(parts)
        out[n] = g.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, dims: dict, cfg, out: dict):
    init_gloo(rank, world, port)
    try:
        from moekit.parallel.mesh import build_mesh
        from moekit.parallel.parallelize import clip_grad_norm, data_shard, optimizer_step, parallelize, reduce_grads
        from moekit.parallel.runtime import full_model_state

        pd = ParallelDims(**dims).validate(world)
        mesh = build_mesh(pd, "cpu")
        torch.manual_seed(0)
        model = parallelize(build_model(cfg), mesh, pd)
        # foreach, as on GPU: one kernel over plain and DTensor parameters
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
        shards, shard = data_shard(mesh)
        losses, norms, grads = [], [], None
        for i, seqs in enumerate(_batches(shards)):
            local = seqs[shard * B:(shard + 1) * B]  # this rank's data shard (tp ranks share one)
            loss = model(local[:, :-1], local[:, 1:]).loss
            loss.backward()
            reduce_grads(model, mesh, pd)
            if i == 0:
                grads = _full_grads(model)
            norms.append(clip_grad_norm(model, CLIP, pd).item())
            optimizer_step(opt)
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)  # tp ranks hold the same value: the mean is over shards
        weights = full_model_state(model)  # collective
        out[rank] = (losses, norms, grads, weights if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def _run(dims: dict, cfg) -> dict:
    world = dims.get("dp", 1) * dims.get("ep", 1) * dims.get("tp", 1)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), dims, cfg, out), nprocs=world, join=True)
        return dict(out)


@pytest.mark.parametrize("dims,cfg", [
    ({"tp": 2}, MQA),
    ({"tp": 4}, GQA),
    # capacity is per data shard: a global one does not split over dp, so dropless here
    ({"dp": 2, "tp": 2}, dataclasses.replace(GQA, capacity_factor=0.0)),
    ({"dp": 2, "ep": 2}, CFG),  # aux losses per data shard and dropless routing: off here
], ids=["tp2-mqa", "tp4-gqa", "dp2xtp2-gqa", "dp2xep2"])
def test_parallel_layout_matches_single_process(dims, cfg):
    shards = dims.get("dp", 1) * dims.get("ep", 1)
    ref_losses, ref_norms, ref_grads, ref_weights = _reference(cfg, shards)
    out = _run(dims, cfg)
    for losses, norms, grads, _ in out.values():
        assert losses == pytest.approx(ref_losses, rel=RTOL)
        assert norms == pytest.approx(ref_norms, rel=10 * RTOL)
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    weights = out[0][3]  # gathered full on rank 0
    assert weights.keys() == ref_weights.keys()
    for k, w in ref_weights.items():
        # Adam's first steps move a weight by about lr whatever the gradient's size: noise in a
        # near-zero gradient could flip one update, so the bound is loose next to lr x steps
        torch.testing.assert_close(weights[k], w, rtol=0, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_tensor_parallel_config_is_validated():
    from moekit.parallel.tensor_parallel import check_tensor_parallel

    check_tensor_parallel(CFG, 4)  # 4 heads, 1 K/V head (replicated), ffn 64
    with pytest.raises(ConfigError, match=r"n_heads \(4\) must be divisible by --tp \(8\)"):
        check_tensor_parallel(CFG, 8)
    with pytest.raises(ConfigError, match=r"ffn_dim \(66\)"):
        check_tensor_parallel(dataclasses.replace(CFG, ffn_dim=66), 4)
    with pytest.raises(ConfigError, match=r"shared_expert_ffn \(30\)"):
        check_tensor_parallel(dataclasses.replace(CFG, shared_expert_ffn=30), 4)
    with pytest.raises(ConfigError, match=r"n_kv_heads \(6\)"):
        check_tensor_parallel(dataclasses.replace(CFG, d_model=96, n_heads=12, n_kv_heads=6), 4)
    with pytest.raises(ConfigError, match="qk_norm"):
        check_tensor_parallel(dataclasses.replace(CFG, qk_norm=True), 2)
    ParallelDims(dp=2, tp=2).validate(4)
    ParallelDims(dp=2, ep=2).validate(4)
    with pytest.raises(ConfigError, match="not with --ep"):
        ParallelDims(ep=2, tp=2).validate(4)


def _train_worker(rank: int, world: int, port: int, cfg):
    # what torchrun sets for each process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from moekit.train.trainer import train_main

    train_main(cfg, progress=False)


def test_trainer_with_tensor_parallelism_matches_one_process(tmp_path):
    """The trainer at --tp 2 (both ranks read the same batches) against one process: same losses
    and validation losses, a checkpoint of full tensors, and a resume of that checkpoint in one
    process continues with the same losses."""
    import shutil

    from safetensors.torch import load_file

    from moekit.config import load_toml
    from moekit.train.checkpoint import list_checkpoints
    from moekit.train.trainer import train_main

    train_main(load_toml(run_config_toml(tmp_path, "single")), progress=False)
    cfg = load_toml(run_config_toml(tmp_path, "tp2"))
    cfg.train.tp = 2
    mp.spawn(_train_worker, args=(2, free_port(), cfg), nprocs=2, join=True)


    train_b, ckpts = assert_matches_single(tmp_path, "tp2")
    a = load_file(str(list_checkpoints(tmp_path / "single")[-1] / "model.safetensors"))
    b = load_file(str(ckpts[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # whole tensors; Adam's lr-sized steps bound the drift as in test_parallel
        assert b[k].shape == a[k].shape
        assert (b[k] - a[k]).abs().max() <= 4 * 3e-3, k
    # the --tp 2 checkpoint (model and optimizer state) continues in one process
    shutil.copytree(ckpts[0], tmp_path / "resumed" / ckpts[0].name)
    train_main(None, resume=str(tmp_path / "resumed"), progress=False, layout={"tp": 1})
    assert run_losses(tmp_path / "resumed")[0] == pytest.approx(train_b[2:], rel=1e-4)
