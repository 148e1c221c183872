"""Sharded checkpoints (torch.distributed.checkpoint) on CPU with gloo, spawned from pytest: saved by
2 ranks (FSDP2, or expert parallel), loaded by 1 process and by 4 FSDP ranks with the same model
and optimizer tensors, and training resumed with the losses of the uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from moekit.config import ModelConfig
from moekit.model.transformer import build_model
from moekit.parallel.mesh import ParallelDims
from tests.dist_helpers import free_port, init_gloo, run_config_toml, run_losses

# aux losses off: the balance loss is not linear in the batch, so it differs between layouts
CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=64, n_experts=4,
                  top_k=2, max_seq_len=32, balance_loss_coef=0.0, z_loss_coef=0.0, expert_impl="loop")
G, T = 8, 16  # global batch of G sequences per step
SAVE_AT, STEPS = 2, 4
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG.vocab_size, (G, T + 1), generator=g) for _ in range(STEPS)]


def _setup(mode: str, world: int):
    """The model and optimizer at a layout: "fsdp" (dp = world), "ep" (ep = world) or "single"."""
    torch.manual_seed(0)
    model, mesh = build_model(CFG), None
    if mode == "fsdp":
        from moekit.parallel.mesh import apply_fsdp, build_mesh

        apply_fsdp(model, build_mesh(ParallelDims(dp=world), "cpu")["dp"])
    elif mode == "ep":
        from moekit.parallel.expert_parallel import apply_expert_parallel
        from moekit.parallel.mesh import build_mesh

        mesh = build_mesh(ParallelDims(ep=world), "cpu")["ep"]
        apply_expert_parallel(model, mesh.get_group())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), mesh


def _train(model, opt, mode: str, steps: range) -> list[float]:
    """Global mean losses of `steps`; rank r trains on its share of the global batch."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if mode != "single" else (1, 0)
    losses = []
    for seqs in (_batches()[i] for i in steps):
        local = seqs[rank * G // world:(rank + 1) * G // world]
        loss = model(local[:, :-1], local[:, 1:]).loss
        loss.backward()
        if mode == "ep":
            from moekit.parallel.expert_parallel import sync_replicated_grads

            sync_replicated_grads(model, dist.group.WORLD)
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def _full_state(model, opt, mode: str) -> dict:
    """Whole tensors keyed by parameter name: weights, and Adam's moments and step counts."""
    if mode == "ep":
        from moekit.parallel.runtime import full_model_state, full_optimizer_state

        sd, osd = full_model_state(model), full_optimizer_state(model, opt)
    else:
        sd, osd = get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL)
    out = {k: v.clone() for k, v in sd.items()}
    for name, st in osd.get("state", {}).items():
        out.update({f"{name}/{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


def _worker(rank: int, world: int, port: int, root: str, out: dict):
    init_gloo(rank, world, port)
    try:
        from moekit.parallel.sharded_checkpoint import load_sharded, save_sharded

        if world == 2:  # save after SAVE_AT steps, then go on: the uninterrupted run
            for mode in ("fsdp", "ep"):
                model, opt, mesh = _setup(mode, world)
                _train(model, opt, mode, range(SAVE_AT))
                save_sharded(model, opt, f"{root}/{mode}", mesh)
                saved = _full_state(model, opt, mode)
                after = _train(model, opt, mode, range(SAVE_AT, STEPS))
                model, opt, mesh = _setup(mode, world)  # resume at the same layout
                load_sharded(model, opt, f"{root}/{mode}", mesh)
                resumed = _train(model, opt, mode, range(SAVE_AT, STEPS))
                if rank == 0:
                    out[mode] = (saved, after, resumed)
        else:  # both checkpoints load into 4 FSDP ranks
            for saved_by in ("fsdp", "ep"):
                model, opt, _ = _setup("fsdp", world)
                load_sharded(model, opt, f"{root}/{saved_by}")
                loaded = _full_state(model, opt, "fsdp")
                resumed = _train(model, opt, "fsdp", range(SAVE_AT, STEPS))
                if rank == 0:
                    out[saved_by] = (loaded, resumed)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, root) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), str(root), out), nprocs=world, join=True)
        return dict(out)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # DCP copies bytes: identical, not just close


def test_dcp_saved_by_2_ranks_loads_at_1_and_4(tmp_path):
    from moekit.parallel.sharded_checkpoint import load_sharded, read_model_weights

    by2 = _spawn(2, tmp_path)
    for mode in ("fsdp", "ep"):
        saved, after, resumed = by2[mode]
        assert resumed == after  # same layout: bit for bit
        # one process, no process group
        model, opt, _ = _setup("single", 1)
        load_sharded(model, opt, tmp_path / mode)
        _assert_same_state(_full_state(model, opt, "single"), saved)
        # float32 sums over another split of the batch: 1e-5 relative
        assert _train(model, opt, "single", range(SAVE_AT, STEPS)) == pytest.approx(after, rel=1e-5)
        weights = read_model_weights(tmp_path / mode)  # what generate / eval / convert read
        assert weights.keys() == build_model(CFG, "meta").state_dict().keys()
        assert all(torch.equal(v, saved[k]) for k, v in weights.items())
    by4 = _spawn(4, tmp_path)
    for mode in ("fsdp", "ep"):
        saved, after, _ = by2[mode]
        loaded, resumed = by4[mode]
        _assert_same_state(loaded, saved)
        assert resumed == pytest.approx(after, rel=1e-5)


def test_torchrun_pipeline_with_sharded_checkpoints(tmp_path):
    """`torchrun --nproc-per-node 2 -m moekit train --pp 2 --ckpt-format dcp` logs the losses of one
    process on the same batches; its step-2 checkpoint resumes in one process with the same
    losses, and `generate` reads it."""
    from moekit.train import checkpoint as ckpt_io
    from moekit.train.trainer import train_main

    single = run_config_toml(tmp_path, "single")
    subprocess.run([sys.executable, "-m", "moekit", "train", "--config", single], check=True, capture_output=True)
    pp = run_config_toml(tmp_path, "pp", pp=2, pp_schedule="1f1b", pp_microbatches=2, ckpt_format="dcp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port()), "-m", "moekit", "train", "--config", pp],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


    (train_a, val_a), (train_b, val_b) = run_losses(tmp_path / "single"), run_losses(tmp_path / "pp")
    assert len(train_b) == 4
    # cross-entropy is linear over micro-batches of equal size: 1e-5 relative (float32 sums)
    assert train_b == pytest.approx(train_a, rel=1e-5)
    assert val_b == pytest.approx(val_a, rel=1e-5)
    ckpts = ckpt_io.list_checkpoints(tmp_path / "pp")
    assert [c.name for c in ckpts] == ["ckpt-0000002", "ckpt-0000004"]
    manifest = ckpt_io.verify(ckpts[0])
    assert manifest["format"] == "dcp" and "dcp/.metadata" in manifest["files"]
    assert not (ckpts[0] / "model.safetensors").exists()
    import shutil

    shutil.copytree(ckpts[0], tmp_path / "resumed" / ckpts[0].name)
    train_main(None, resume=str(tmp_path / "resumed"), progress=False, layout={"pp": 1})
    assert run_losses(tmp_path / "resumed")[0] == pytest.approx(train_b[2:], rel=1e-5)
    from moekit.cli import main

    assert main(["generate", "--ckpt", str(tmp_path / "pp"), "--device", "cpu", "--max-new-tokens", "4", "def"]) == 0
