"""Pipeline parallelism on CPU with gloo, spawned from pytest: GPipe and 1F1B over 2 and 4 stages
(and 2 stages x 2 FSDP replicas) give the same losses, gradients and gradient norms as one process
that accumulates over the same micro-batches, MoE auxiliary losses included."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.model.transformer import build_model
from moekit.parallel.mesh import ParallelDims
from tests.dist_helpers import free_port, init_gloo

CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=1, ffn_dim=64, n_experts=4,
                  top_k=2, max_seq_len=32, balance_loss_coef=0.05, z_loss_coef=0.01, expert_impl="loop")
STEPS, ACCUM, B, T = 3, 2, 8, 16  # per optimizer step: ACCUM batches of B sequences
N_MB = 4  # pipeline micro-batches of B / N_MB sequences (per data-parallel replica: fewer)
CLIP = 0.5  # below the first steps' gradient norm: clipping acts


def _batches():
    g = torch.Generator().manual_seed(0)
    return [[torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g) for _ in range(ACCUM)] for _ in range(STEPS)]


def _reference():
    """One process accumulating over the same micro-batches of B / N_MB sequences: per step the
    mean cross-entropy, balance and z losses, the gradient norm; first-step gradients."""
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows, grads = [], None
    n = ACCUM * N_MB
    for i, step in enumerate(_batches()):
        ce = bal = z = 0.0
        for seqs in step:
            for mb in seqs.chunk(N_MB):
                out = model(mb[:, :-1], mb[:, 1:])
                (out.loss / n).backward()
                ce, bal, z = ce + out.ce_loss.item() / n, bal + out.balance_loss.item() / n, z + out.z_loss.item() / n
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
        if i == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        rows.append((ce, bal, z, norm))
    return rows, grads


def _worker(rank: int, world: int, port: int, cases: list, out: dict):
    init_gloo(rank, world, port)
    try:
        for schedule, dp in cases:  # one process group for every case of this world size
            out[rank, schedule, dp] = _train(rank, world, schedule, dp)
    finally:
        dist.destroy_process_group()


def _train(rank: int, world: int, schedule: str, dp: int):
    from moekit.parallel.mesh import build_mesh
    from moekit.parallel.pipeline import build_pipeline, clip_grad_norm, train_step

    torch.manual_seed(0)
    model = build_model(CFG)
    mesh = build_mesh(ParallelDims(pp=world // dp, dp=dp), "cpu")
    pipe = build_pipeline(model, mesh, torch.device("cpu"), schedule, N_MB // dp)
    opt = torch.optim.AdamW(pipe.module.parameters(), lr=1e-2)
    replica = mesh["dp"].get_local_rank()
    rows, grads = [], None
    for i, step in enumerate(_batches()):
        local = [s[replica * B // dp:(replica + 1) * B // dp] for s in step]  # this replica's rows
        r = train_step(pipe, [(s[:, :-1], s[:, 1:]) for s in local], contextlib.nullcontext)
        norm = clip_grad_norm(pipe, CLIP)
        if i == 0:
            grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for k, p in pipe.module.named_parameters()}
        opt.step()
        opt.zero_grad()
        rows.append((r.ce.item(), r.balance.item(), r.z.item(), norm.item()))
    return rows, grads


CASES = {2: [("gpipe", 1), ("1f1b", 1)], 4: [("gpipe", 1), ("1f1b", 1), ("1f1b", 2)]}  # world: (schedule, dp)
_RUNS: dict[int, dict] = {}


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _runs(world: int) -> dict:
    if world not in _RUNS:
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_worker, args=(world, free_port(), CASES[world], out), nprocs=world, join=True)
            _RUNS[world] = dict(out)
    return _RUNS[world]


@pytest.mark.parametrize("world,schedule,dp", [(w, s, d) for w, cases in CASES.items() for s, d in cases])
def test_pipeline_matches_single_process(reference, world, schedule, dp):
    """pp = world / dp stages; dp > 1: FSDP2 inside each stage over the replicas."""
    ref_rows, ref_grads = reference
    out = _runs(world)
    seen = {}
    for rank in range(world):
        rows, grads = out[rank, schedule, dp]
        # every rank logs the same step means: cross-entropy from the last stage, aux losses from
        # all stages, the global gradient norm. float32 sums in another order: 1e-5 relative
        for row, ref in zip(rows, ref_rows):
            assert row == pytest.approx(ref, rel=1e-5)
        for k, g in grads.items():
            torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-6)
            seen[k] = rank
    assert set(seen) == set(ref_grads)  # the stages hold every parameter, under its plain name
    assert len(set(seen.values())) == world // dp  # and each stage holds some


def test_stage_split_and_limits():
    from moekit.parallel.pipeline import stage_layers

    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ConfigError, match="3 layers cannot be split into 4"):
        stage_layers(3, 4)
    ParallelDims(pp=2, dp=2).validate(4)
    with pytest.raises(ConfigError, match="--pp combines with --dp only"):
        ParallelDims(pp=2, ep=2).validate(4)
