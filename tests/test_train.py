"""Training: LR and batch schedules (closed forms), exact resume (an uninterrupted run vs a crashed
and resumed one), crash-safe checkpoints, corrupted checkpoints through the CLI, the NaN guard, and
a short run that learns.

All runs use a tiny model on a 12-document-per-source slice of the real corpus; the tokenizer is
trained once per session into a shared cache folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moekit.cli import main as cli_main
from moekit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, to_toml
from moekit.data.corpus import load_corpus
from moekit.data.mixture import pack_validation
from moekit.data.tokenizer import Tokenizer
from moekit.errors import CheckpointError, TrainingError
from moekit.model.transformer import Transformer, build_model
from moekit.train import checkpoint as ckpt_io
from moekit.train import trainer as trainer_mod
from moekit.train.metrics import read_metrics
from moekit.train.schedule import batch_tokens_at, lr_at
from moekit.train.trainer import train_main


# ------------------------------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "moekit-cache"


def small_cfg(out_dir: Path, cache_dir: Path, **train) -> RunConfig:
    tc = dict(out_dir=str(out_dir), seq_len=32, micro_batch=2, steps=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
              eval_every=4, eval_batches=2, ckpt_every=4, keep_last=10, sample_tokens=0, device="cpu")
    tc.update(train)
    return RunConfig(
        model=ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                          n_experts=4, top_k=2, max_seq_len=64),
        train=TrainConfig(**tc),
        data=DataConfig(max_docs=12, max_doc_chars=3000, val_docs=3, cache_dir=str(cache_dir)),
    ).validate()


def ckpt_path(run: Path, step: int) -> Path:
    return run / f"ckpt-{step:07d}"


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, command: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moekit {command}: error: ")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# schedules

@pytest.mark.parametrize("warmup,steps", [(10, 100), (0, 50), (1, 7), (5, 6)])
def test_lr_matches_warmup_cosine_formula(warmup, steps):
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=warmup, steps=steps)
    for step in range(steps + 1):
        if step < warmup:
            expected = 3e-3 * (step + 1) / warmup
        else:
            t = (step - warmup) / (steps - warmup)
            expected = 3e-4 + (3e-3 - 3e-4) * (math.cos(math.pi * t) + 1) / 2
        assert lr_at(step, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    if warmup:
        assert lr_at(warmup - 1, cfg) == pytest.approx(3e-3)
    assert lr_at(warmup, cfg) == pytest.approx(3e-3)
    assert lr_at(steps, cfg) == pytest.approx(3e-4)
    assert lr_at(steps + 10, cfg) == pytest.approx(3e-4)  # stays at min_lr past the end
    decay = [lr_at(s, cfg) for s in range(warmup, steps + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("start,target,ramp,micro_batch,seq_len", [
    (2048, 4096, 100, 8, 256),   # the tiny preset
    (100, 1000, 7, 2, 32),       # neither end a multiple of a micro-batch (64)
    (10, 200, 5, 4, 32),         # starts below one micro-batch
    (0, 512, 10, 2, 64),         # no ramp start -> constant
    (1024, 256, 4, 2, 32),       # ramping down
])
def test_batch_tokens_ramp_and_rounding(start, target, ramp, micro_batch, seq_len):
    cfg = TrainConfig(batch_tokens=target, batch_ramp_start=start, batch_ramp_steps=ramp,
                      micro_batch=micro_batch, seq_len=seq_len)
    micro = micro_batch * seq_len
    begin = start or target
    for step in range(ramp + 20):
        exact = Fraction(begin) + Fraction(target - begin) * Fraction(min(step, ramp), ramp)
        expected = max(1, math.floor(exact / micro)) * micro
        got = batch_tokens_at(step, cfg)
        assert got == expected, step
        assert got % micro == 0 and got >= micro
    # constant after the ramp: the target rounded down to whole micro-batches
    assert batch_tokens_at(ramp, cfg) == batch_tokens_at(ramp + 1000, cfg) == max(1, target // micro) * micro


def test_batch_tokens_default_is_one_micro_batch():
    cfg = TrainConfig(micro_batch=3, seq_len=16)
    assert {batch_tokens_at(s, cfg) for s in range(50)} == {48}


# ------------------------------------------------------------------------------------------------
# a short run that learns (shared by several tests)

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir) -> tuple[RunConfig, Path]:
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = small_cfg(run, cache_dir, steps=40, micro_batch=4, warmup_steps=5, eval_every=10, ckpt_every=20)
    assert train_main(cfg, progress=False) == run
    return cfg, run


def test_training_reduces_validation_loss(trained_run):
    cfg, run = trained_run
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(0, 41))
    first, last = recs[0], recs[-1]
    for src in ("text", "code"):
        assert last[f"val/{src}"] < first[f"val/{src}"] - 0.2, (first, last)
    # at step 0 the model is close to uniform over the vocabulary
    assert first["val/text"] == pytest.approx(math.log(512), abs=0.3)
    train_losses = [r["loss"] for r in recs[1:]]
    assert sum(train_losses[-5:]) / 5 < train_losses[0]
    assert {r["step"] for r in recs if "val/text" in r} == {0, 10, 20, 30, 40}
    for r in recs[1:]:
        # the logged lr is the one the step used; recomputed here from the formula
        s = r["step"] - 1
        lr = 1e-2 * (s + 1) / 5 if s < 5 else 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * (s - 5) / 35))
        assert r["lr"] == pytest.approx(lr, rel=1e-12)
        assert r["batch_tokens"] == 4 * 32
        assert math.isfinite(r["grad_norm"]) and r["dropped"] == 0.0
        load = r["expert_load"]
        assert len(load) == 2 and all(len(row) == 4 for row in load)
        assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in load)


def test_training_writes_plots_tensorboard_and_checkpoints(trained_run):
    cfg, run = trained_run
    for name in ("loss.png", "expert_load.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 20), ckpt_path(run, 40)]
    ckpt = ckpt_io.resolve_checkpoint(run)
    assert ckpt == ckpt_path(run, 40)
    manifest = ckpt_io.verify(ckpt)
    assert manifest["step"] == 40
    for name in ckpt_io.FILES:
        assert manifest["files"][name] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert ckpt_io.load_run_config(ckpt) == cfg
    assert not list(run.glob(".tmp-*"))


def test_final_validation_loss_matches_checkpoint_weights(trained_run, cache_dir):
    """The logged step-40 validation loss, recomputed from the saved weights and a freshly packed
    validation set with a plain cross-entropy."""
    cfg, run = trained_run
    ckpt = ckpt_path(run, 40)
    model = build_model(cfg.model, "cpu")
    ckpt_io.load_weights(model, ckpt)
    model.eval()
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    corpus = load_corpus(cfg.data)
    last = read_metrics(run)[-1]
    for src, (_, val_docs) in corpus.items():
        ids = [torch.tensor(tok.encode(d.text) + [tok.eot_id]).numpy() for d in val_docs]
        seqs = pack_validation(ids, cfg.train.seq_len, cfg.train.eval_batches * cfg.train.micro_batch)
        with torch.no_grad():
            logits = model(seqs[:, :-1]).logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), seqs[:, 1:].reshape(-1))
        assert last[f"val/{src}"] == pytest.approx(ce.item(), rel=1e-4)


def test_training_into_a_run_dir_with_checkpoints_is_refused(trained_run, cache_dir):
    cfg, run = trained_run
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match=r"already holds checkpoints.*--resume"):
        train_main(small_cfg(run, cache_dir), progress=False)
    assert (run / "metrics.jsonl").read_bytes() == before
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 20), ckpt_path(run, 40)]


def test_generate_cli_on_trained_checkpoint(trained_run, capsys):
    _, run = trained_run
    rc, out, err = cli(capsys, "generate", "def ", "--ckpt", str(run), "--max-new-tokens", "8",
                       "--device", "cpu", "--seed", "3")
    assert rc == 0, err
    assert out.startswith("def ")
    rc2, out2, _ = cli(capsys, "generate", "def ", "--ckpt", str(ckpt_path(run, 40)), "--max-new-tokens", "8",
                       "--device", "cpu", "--seed", "3")
    assert rc2 == 0 and out2 == out  # same seed, same checkpoint -> same text
    rc, _, err = cli(capsys, "generate", "--ckpt", str(run), "--top-p", "0")
    assert_one_line_error(rc, err, "generate")
    # greedy with prompt lookup (speculation from the text's own n-grams): the same text
    greedy = ("generate", "def f(x):\n    return x\ndef g(x):\n", "--ckpt", str(run), "--max-new-tokens", "24",
              "--device", "cpu", "--temperature", "0")
    rc, plain, err = cli(capsys, *greedy)
    assert rc == 0, err
    rc, looked_up, err = cli(capsys, *greedy, "--prompt-lookup-max", "3")
    assert rc == 0 and looked_up == plain, err
    rc, _, err = cli(capsys, *greedy, "--prompt-lookup-max", "3", "--num-speculative-tokens", "0")
    assert_one_line_error(rc, err, "generate")


# ------------------------------------------------------------------------------------------------
# exact resume

class SimulatedCrash(Exception):
    pass


def train_killed_at(cfg, step: int, monkeypatch) -> None:
    """train_main(cfg), killed when the trainer is about to run step + 1."""
    real_step = trainer_mod.Trainer.train_step

    def crashing_step(self):
        if self.step == step:
            raise SimulatedCrash("killed")
        return real_step(self)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crashing_step)
    with pytest.raises(SimulatedCrash):
        train_main(cfg, progress=False)
    monkeypatch.undo()


def test_resume_is_exact(tmp_path, cache_dir, monkeypatch):
    """Run A: 8 steps in one go. Run B: the same config (steps=8, so the same LR schedule), killed
    during step 7 (after the step-4 checkpoint and two more logged steps), then resumed from its
    run folder. Per-step metrics and final weights must be identical, bit for bit."""
    # a batch ramp, so gradient accumulation changes across the resume point
    kw = dict(steps=8, ckpt_every=4, batch_tokens=128, batch_ramp_start=64, batch_ramp_steps=6)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train_main(small_cfg(run_a, cache_dir, **kw), progress=False)
    train_killed_at(small_cfg(run_b, cache_dir, **kw), 6, monkeypatch)
    assert ckpt_io.list_checkpoints(run_b) == [ckpt_path(run_b, 4)]
    assert [r["step"] for r in read_metrics(run_b)] == list(range(0, 7))  # steps 5, 6 after the ckpt

    train_main(None, resume=str(run_b), progress=False)

    recs_a, recs_b = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in recs_b] == list(range(0, 9))  # the crashed run's 5, 6 were dropped
    assert comparable(recs_b) == comparable(recs_a)
    assert [r["batch_tokens"] for r in recs_a[1:]] == [batch_tokens_at(s, small_cfg(run_a, cache_dir, **kw).train)
                                                        for s in range(8)]
    assert len({r["batch_tokens"] for r in recs_a[1:]}) == 2
    for step in (4, 8):
        assert_same_weights(ckpt_path(run_a, step), ckpt_path(run_b, step))
    sa = ckpt_io.load_state(ckpt_path(run_a, 8))
    sb = ckpt_io.load_state(ckpt_path(run_b, 8))
    assert sa["data"] == sb["data"] and sa["step"] == sb["step"] == 8
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])

    # resuming an older checkpoint by its folder replays the same steps and re-saves step 8
    run_c = tmp_path / "c"
    shutil.copytree(run_a, run_c)
    train_main(None, resume=str(ckpt_path(run_c, 4)), progress=False)
    assert comparable(read_metrics(run_c)) == comparable(recs_a)
    assert_same_weights(ckpt_path(run_a, 8), ckpt_path(run_c, 8))
    ckpt_io.verify(ckpt_path(run_c, 8))


def test_resume_of_a_finished_run_changes_nothing(trained_run, tmp_path):
    _, run = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    train_main(None, resume=str(copy), progress=False)
    assert comparable(read_metrics(copy)) == comparable(read_metrics(run))
    assert_same_weights(ckpt_path(run, 40), ckpt_path(copy, 40))


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers are installed from the main thread only")
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, cache_dir, monkeypatch,
                                                                            capfd):
    """SIGTERM during step 3 (no periodic checkpoint there): the run finishes the step, writes a
    checkpoint at step 3, says how to continue, and gives the usual SIGTERM handler back. The
    resumed run equals an uninterrupted one, bit for bit."""
    kw = dict(steps=8, ckpt_every=4)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train_main(small_cfg(run_a, cache_dir, **kw), progress=False)
    real_step = trainer_mod.Trainer.train_step

    def step_then_sigterm(self):
        r = real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return r

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step_then_sigterm)
    got: list = []
    train_main(small_cfg(run_b, cache_dir, **kw), progress=False, trainer_out=got)
    monkeypatch.undo()
    out = capfd.readouterr()
    assert got[0].stopped == "SIGTERM" and signal.getsignal(signal.SIGTERM) is before
    assert f"stopped at step 3 of 8 (SIGTERM), with a checkpoint; continue with: moekit train --resume {run_b}" in out.out
    assert "SIGTERM: stopping after this step" in out.err
    assert ckpt_io.list_checkpoints(run_b) == [ckpt_path(run_b, 3)]
    assert [r["step"] for r in read_metrics(run_b)] == [0, 1, 2, 3]

    train_main(None, resume=str(run_b), progress=False)
    assert comparable(read_metrics(run_b)) == comparable(read_metrics(run_a))
    assert_same_weights(ckpt_path(run_a, 8), ckpt_path(run_b, 8))


def test_time_limit_stops_with_exit_code_75_and_a_resume_may_lift_it(tmp_path, cache_dir, capsys):
    """--time-limit: set-up alone takes longer than 1 ms, so the run stops after its first step
    with a checkpoint and exit code 75; a resume with --time-limit 0 trains to the end."""
    run = tmp_path / "run"
    cfg = small_cfg(run, cache_dir, steps=5, ckpt_every=100)
    (tmp_path / "run.toml").write_text(to_toml({"model": cfg.model, "train": cfg.train, "data": cfg.data}))
    rc, out, _ = cli(capsys, "train", "--config", str(tmp_path / "run.toml"), "--time-limit", "0.001")
    assert rc == 75 and "stopped at step 1 of 5 (time limit of 0.001 s)" in out
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 1)]
    rc, out, _ = cli(capsys, "train", "--resume", str(run), "--time-limit", "0")
    assert rc == 0 and "stopped" not in out
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 1), ckpt_path(run, 5)]
    assert [r["step"] for r in read_metrics(run)] == list(range(6))
    rc, _, err = cli(capsys, "train", "--config", str(tmp_path / "run.toml"), "--time-limit", "-1")
    assert_one_line_error(rc, err, "train")


# ------------------------------------------------------------------------------------------------
# crash-safe and corrupted checkpoints

def test_interrupted_checkpoint_write_is_never_loaded(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    cfg = small_cfg(run, cache_dir, steps=4, ckpt_every=1, keep_last=2)
    real_rename = ckpt_io.os.rename

    def crash_before_rename(src, dst, *a, **k):
        if Path(dst).name == "ckpt-0000004":
            raise OSError("simulated power loss before rename")
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(ckpt_io.os, "rename", crash_before_rename)
    with pytest.raises(OSError, match="simulated"):
        train_main(cfg, progress=False)
    monkeypatch.undo()

    tmps = list(run.glob(".tmp-ckpt-0000004-*"))
    assert len(tmps) == 1 and (tmps[0] / "manifest.json").is_file()  # fully written, never renamed
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 2), ckpt_path(run, 3)]  # keep_last=2
    assert ckpt_io.resolve_checkpoint(run) == ckpt_path(run, 3)
    assert ckpt_io.verify(ckpt_path(run, 3))["step"] == 3

    # resuming continues from step 3 and completes step 4
    train_main(None, resume=str(run), progress=False)
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 3), ckpt_path(run, 4)]
    ckpt_io.verify(ckpt_path(run, 4))
    assert [r["step"] for r in read_metrics(run)] == list(range(0, 5))

    # a run folder holding nothing but an unfinished temp folder has no checkpoint
    only_tmp = tmp_path / "only-tmp"
    only_tmp.mkdir()
    shutil.copytree(ckpt_path(run, 4), only_tmp / ".tmp-ckpt-0000005-123")
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        ckpt_io.resolve_checkpoint(only_tmp)
    with pytest.raises(CheckpointError, match="no such run"):
        ckpt_io.resolve_checkpoint(tmp_path / "missing")


@pytest.fixture()
def ckpt_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run's last checkpoint, alone in a run folder."""
    _, run = trained_run
    dst = tmp_path / "run" / "ckpt-0000040"
    shutil.copytree(ckpt_path(run, 40), dst)
    return dst


def _expect_broken(ckpt: Path, capsys, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        ckpt_io.verify(ckpt)
    for argv, command in ((["generate", "--ckpt", str(ckpt), "--device", "cpu"], "generate"),
                          (["generate", "--ckpt", str(ckpt.parent), "--device", "cpu"], "generate"),
                          (["train", "--resume", str(ckpt.parent)], "train")):
        rc, out, err = cli(capsys, *argv)
        assert_one_line_error(rc, err, command)
        assert out == ""


def test_checkpoint_without_manifest(ckpt_copy, capsys):
    (ckpt_copy / "manifest.json").unlink()
    _expect_broken(ckpt_copy, capsys, "manifest.json is missing")


def test_checkpoint_with_flipped_bytes(ckpt_copy, capsys):
    path = ckpt_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 1):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    _expect_broken(ckpt_copy, capsys, r"model\.safetensors is corrupted")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "state.pt", "config.toml"])
def test_checkpoint_with_a_missing_file(ckpt_copy, capsys, name):
    (ckpt_copy / name).unlink()
    _expect_broken(ckpt_copy, capsys, f"{name} is missing")


def test_checkpoint_with_unparsable_manifest(ckpt_copy, capsys):
    (ckpt_copy / "manifest.json").write_text("{ truncated")
    _expect_broken(ckpt_copy, capsys, "manifest.json is corrupted")


@pytest.mark.parametrize("manifest", [[], {"step": 40}, "files", 7])
def test_checkpoint_with_malformed_manifest(ckpt_copy, capsys, manifest):
    """Valid JSON of the wrong shape is a corrupted manifest too: one CheckpointError, no traceback."""
    (ckpt_copy / "manifest.json").write_text(json.dumps(manifest))
    _expect_broken(ckpt_copy, capsys, "manifest.json is corrupted")


@pytest.mark.parametrize("files", [[], None, "abc"])
def test_checkpoint_whose_manifest_files_is_not_a_mapping(ckpt_copy, capsys, files):
    (ckpt_copy / "manifest.json").write_text(json.dumps({"step": 40, "files": files}))
    _expect_broken(ckpt_copy, capsys, "manifest.json is corrupted")


def _rehash(ckpt: Path) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"] = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in ckpt_io.FILES}
    (ckpt / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name,match", [("model.safetensors", "cannot read"), ("state.pt", "cannot read")])
def test_unreadable_file_with_matching_manifest(ckpt_copy, capsys, name, match):
    """Second line of defence: a file that passes the checksum but cannot be parsed."""
    path = ckpt_copy / name
    path.write_bytes(path.read_bytes()[:100])
    _rehash(ckpt_copy)
    ckpt_io.verify(ckpt_copy)
    rc, out, err = cli(capsys, "train", "--resume", str(ckpt_copy))
    assert_one_line_error(rc, err, "train")
    assert match in err and name in err


def test_weights_of_another_shape_are_refused(ckpt_copy, capsys):
    cfg_text = (ckpt_copy / "config.toml").read_text().replace("d_model = 32", "d_model = 64")
    (ckpt_copy / "config.toml").write_text(cfg_text)
    _rehash(ckpt_copy)
    with pytest.raises(CheckpointError, match="shape"):
        ckpt_io.load_weights(build_model(ckpt_io.load_run_config(ckpt_copy).model), ckpt_copy)
    rc, _, err = cli(capsys, "generate", "--ckpt", str(ckpt_copy), "--device", "cpu")
    assert_one_line_error(rc, err, "generate")


# ------------------------------------------------------------------------------------------------
# NaN guard

def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    run = tmp_path / "run"
    cfg = small_cfg(run, cache_dir, steps=6, ckpt_every=2)
    real_forward = Transformer.forward
    calls = {"train": 0}

    def nan_after_three(self, idx, targets=None, caches=None):
        out = real_forward(self, idx, targets, caches)
        if self.training and targets is not None:
            calls["train"] += 1
            if calls["train"] >= 4:  # the 4th optimizer step (step index 3)
                out.loss = out.loss * float("nan")
                out.ce_loss = out.ce_loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", nan_after_three)
    with pytest.raises(TrainingError) as exc:
        train_main(cfg, progress=False)
    monkeypatch.undo()
    msg = str(exc.value)
    assert "nan" in msg.lower() and "step 3" in msg and "ckpt-0000002" in msg
    assert "\n" not in msg
    assert ckpt_io.list_checkpoints(run) == [ckpt_path(run, 2)]
    assert not list(run.glob(".tmp-*"))
    ckpt = ckpt_io.resolve_checkpoint(run)
    assert ckpt_io.verify(ckpt)["step"] == 2
    w = weights(ckpt)
    assert all(torch.isfinite(t).all() for t in w.values())
    assert ckpt_io.load_state(ckpt)["step"] == 2
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3]

    # the last good checkpoint resumes and finishes cleanly once the NaN source is gone
    train_main(None, resume=str(run), progress=False)
    assert ckpt_io.resolve_checkpoint(run) == ckpt_path(run, 6)
    assert [r["step"] for r in read_metrics(run)] == list(range(0, 7))


def test_plot_run_of_a_dense_model_writes_only_the_loss_plot(tmp_path):
    """A dense model (n_experts=1) logs empty expert loads; plotting must not fail on them."""
    from moekit.train.metrics import MetricsLogger, plot_run

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 4):
        log.log(step, {"loss": 5.0 - step, "expert_load": []})
    plots = plot_run(tmp_path)
    assert [p.name for p in plots] == ["loss.png"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
