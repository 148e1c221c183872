"""Shared pieces of the distributed tests: a free rendezvous port, a gloo process group, the TOML
of a tiny CPU run, and the losses a run logged against a single-process run's."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group of `world` CPU ranks on this machine, one thread each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def run_config_toml(tmp_path: Path, name: str, micro_batch: int = 4, **train) -> str:
    """A 4-step CPU run of a tiny MoE on a small corpus; extra [train] fields as keywords. The
    validation set holds eval_batches x micro_batch sequences: kept at 16 whatever the layout."""
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items())
    text = f"""
[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_dim = 64
n_experts = 4
top_k = 2
max_seq_len = 64
expert_impl = "loop"
balance_loss_coef = 0.0
z_loss_coef = 0.0
[train]
out_dir = "{tmp_path / name}"
steps = 4
seq_len = 32
micro_batch = {micro_batch}
eval_batches = {16 // micro_batch}
eval_every = 2
ckpt_every = 2
warmup_steps = 1
sample_tokens = 0
device = "cpu"
threads = 1
{extra}
[data]
max_docs = 12
max_doc_chars = 3000
val_docs = 3
cache_dir = "{tmp_path / 'cache'}"
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def run_losses(run_dir: Path) -> tuple[list[float], list[float]]:
    """(training losses, code validation losses) from a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in recs if "loss" in x], [x["val/code"] for x in recs if "val/code" in x]


def assert_matches_single(tmp_path: Path, name: str) -> tuple[list[float], list[Path]]:
    """The run `name` logged the losses of the single-process run "single" (4 steps, checkpoints
    at 2 and 4). Returns its training losses and checkpoints."""
    from moekit.train.checkpoint import list_checkpoints

    (train_a, val_a), (train_b, val_b) = run_losses(tmp_path / "single"), run_losses(tmp_path / name)
    assert len(train_b) == 4
    assert train_b == pytest.approx(train_a, rel=1e-4)
    assert val_b == pytest.approx(val_a, rel=1e-4)
    ckpts = list_checkpoints(tmp_path / name)
    assert [c.name for c in ckpts] == ["ckpt-0000002", "ckpt-0000004"]
    return train_b, ckpts
