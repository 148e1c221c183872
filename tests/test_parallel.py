"""Distributed training on CPU with gloo, spawned from pytest: FSDP2 and expert parallelism give
the same losses and gradients as one process on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.model.transformer import build_model
from moekit.parallel.mesh import ParallelDims
from tests.dist_helpers import assert_matches_single, free_port, init_gloo, run_config_toml, run_losses

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=64, n_experts=4,
                  top_k=2, max_seq_len=32, balance_loss_coef=0.0, z_loss_coef=0.0, expert_impl="loop")
STEPS, B, T = 3, 2, 16  # per-rank micro-batch of B sequences


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
    init_gloo(rank, world, port)
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
        mp.spawn(_worker, args=(world, free_port(), mode, out), nprocs=world, join=True)
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
    with pytest.raises(ConfigError, match="not with --ep"):
        ParallelDims(tp=2, ep=2).validate(4)
    with pytest.raises(ConfigError, match=">= 1"):
        ParallelDims(dp=0).validate(0)


@pytest.mark.parametrize("mode", ["dp", "ep"])
def test_torchrun_training_matches_one_process(tmp_path, mode):
    """`torchrun --nproc-per-node 2 -m moekit train` with --dp 2 (FSDP) or --ep 2 (experts split
    over the ranks), 2 sequences per rank, and one process with 4 sequences see the same global
    batches: same losses, and the checkpoint holds full tensors. (The balance and z losses are
    computed per rank, so they are off here.)"""
    import subprocess
    import sys

    from moekit.train.checkpoint import list_checkpoints, verify

    single = run_config_toml(tmp_path, "single", dp=1, ep=1)
    subprocess.run([sys.executable, "-m", "moekit", "train", "--config", single], check=True, capture_output=True)
    dp2 = run_config_toml(tmp_path, "dp2", micro_batch=2, dp=2 if mode == "dp" else 1, ep=2 if mode == "ep" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port()), "-m", "moekit", "train", "--config", dp2],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


    train_b, ckpts = assert_matches_single(tmp_path, "dp2")
    verify(ckpts[-1])
    from safetensors.torch import load_file

    a = load_file(str(list_checkpoints(tmp_path / "single")[-1] / "model.safetensors"))
    b = load_file(str(ckpts[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    # a checkpoint saved by 2 ranks resumes in one process with the same global batch: same losses
    import shutil

    from moekit.train.trainer import train_main

    shutil.copytree(ckpts[0], tmp_path / "resumed" / ckpts[0].name)
    train_main(None, resume=str(tmp_path / "resumed"), progress=False, layout={"dp": 1, "ep": 1})
    assert run_losses(tmp_path / "resumed")[0] == pytest.approx(train_b[2:], rel=1e-4)
    lr = 3e-3  # TrainConfig's default
    for k in a:  # full, unsharded tensors of the same shape and values
        assert b[k].shape == a[k].shape
        # Adam moves a weight by about lr per step whatever the gradient's size, so reduction-order
        # noise in tiny gradients (rarely routed experts) can flip single updates: bound by 4 steps
        assert (b[k] - a[k]).abs().max() <= 4 * lr, k


def test_train_rejects_a_layout_that_does_not_match_the_launch(tmp_path, capsys):
    from moekit.cli import main

    cfg = run_config_toml(tmp_path, "bad", micro_batch=2, dp=2, ep=1)
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 x 1 x 1 x 1 = 2" in err[0] and "1 processes" in err[0]


def test_torchrun_training_stops_on_every_rank_with_one_checkpoint(tmp_path):
    """--time-limit under torchrun with FSDP on 2 ranks: both ranks stop after step 1 (the saves
    are collectives: a rank that went on would hang the other), one full checkpoint is written,
    each worker exits 75, and one process resumes it to the end."""
    import subprocess
    import sys

    from moekit.train.checkpoint import list_checkpoints, verify

    cfg = run_config_toml(tmp_path, "dp2", micro_batch=2, dp=2, time_limit=0.001)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port()), "-m", "moekit", "train", "--config", cfg],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "exitcode  : 75" in r.stderr + r.stdout, r.stderr[-2000:]
    assert "stopped at step 1 of 4" in r.stdout
    ckpts = list_checkpoints(tmp_path / "dp2")
    assert [c.name for c in ckpts] == ["ckpt-0000001"]
    verify(ckpts[0])
    from moekit.train.trainer import train_main

    train_main(None, resume=str(tmp_path / "dp2"), progress=False, layout={"dp": 1}, time_limit=0)
    assert [c.name for c in list_checkpoints(tmp_path / "dp2")][-1] == "ckpt-0000004"
