"""Checkpoints: one folder per step, written to a temp folder and renamed into place.

    RUN/ckpt-0000300/
        model.safetensors   weights
        config.toml         the whole run config
        tokenizer.json
        state.pt            optimizer, step, data cursor, RNG (loaded with weights_only=True)
        manifest.json       sha256 of every file above, written last

A sharded checkpoint (train.ckpt_format = "dcp") holds dcp/ (torch.distributed.checkpoint: each
rank's shard of the weights and optimizer state, and .metadata) instead of model.safetensors, and
state.pt without the optimizer. It loads at any layout, and `read_weights` reads its full weights
in one process.

A folder without a manifest, or whose files do not match it, is never loaded as valid; a crash
before the rename leaves only a `.tmp-*` folder, which is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.config import RunConfig, run_config_from_dict, to_toml
from moekit.data.tokenizer import Tokenizer
from moekit.errors import CheckpointError, ConfigError

FILES = ("model.safetensors", "config.toml", "tokenizer.json", "state.pt")
SHARDED_FILES = ("dcp/.metadata", "config.toml", "tokenizer.json", "state.pt")
DCP_DIR = "dcp"
_CKPT = re.compile(r"^ckpt-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors stores each tensor once)."""
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temp folder for step's checkpoint (one writer per run: stale ones are removed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".tmp-ckpt-*"):  # left by a writer that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f".tmp-ckpt-{step:07d}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, cfg: RunConfig,
                    tokenizer: Tokenizer, state: dict, keep_last: int = 0,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """weights: a full state dict gathered beforehand (sharded models); else model's own."""
    tmp = begin_checkpoint(run_dir, step)
    if weights is not None and getattr(model.cfg, "tie_embeddings", False):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    sd = model_state(model) if weights is None else {k: v.contiguous().cpu() for k, v in weights.items()}
    save_file(sd, str(tmp / "model.safetensors"))
    return finish_checkpoint(tmp, run_dir, step, cfg, tokenizer, state, keep_last)


def finish_checkpoint(tmp: Path, run_dir: Path, step: int, cfg: RunConfig, tokenizer: Tokenizer,
                      state: dict, keep_last: int = 0) -> Path:
    """Add config, tokenizer and state to the weights in `tmp`, hash every file into the manifest,
    then rename the folder into place."""
    final = run_dir / f"ckpt-{step:07d}"
    (tmp / "config.toml").write_text(to_toml({"model": cfg.model, "train": cfg.train, "data": cfg.data}))
    tokenizer.save(tmp / "tokenizer.json")
    torch.save(state, tmp / "state.pt")
    names = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    fmt = "dcp" if (tmp / DCP_DIR).is_dir() else "full"
    manifest = {"step": step, "format": fmt, "files": {name: _sha256(tmp / name) for name in names}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name in (*names, "manifest.json"):
        _fsync(tmp / name)
    if fmt == "dcp":
        _fsync(tmp / DCP_DIR)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(run_dir)
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temp folders are not listed)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if (path / "manifest.json").exists() or _CKPT.match(path.name):
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        if not path.exists():
            raise CheckpointError(f"no such run or checkpoint: {path}")
        raise CheckpointError(f"no finished checkpoint in {path}")
    return ckpts[-1]


def verify(ckpt: Path) -> dict:
    """Check the manifest and every file's hash; return the manifest."""
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt} is incomplete: manifest.json is missing (interrupted write?)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{mpath} is corrupted") from None
    required = SHARDED_FILES if manifest.get("format") == "dcp" else FILES
    for name in dict.fromkeys((*required, *files)):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt} is incomplete: {name} is missing")
        if _sha256(ckpt / name) != files.get(name):
            raise CheckpointError(f"{ckpt / name} is corrupted: its checksum does not match the manifest")
    return manifest


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR).is_dir() and not (ckpt / "model.safetensors").exists()


def read_weights(ckpt: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint of either format, in this process."""
    path = ckpt / (DCP_DIR if is_sharded(ckpt) else "model.safetensors")
    try:
        if path.name == DCP_DIR:
            from moekit.parallel.sharded_checkpoint import read_model_weights

            return {k: v.to(device) for k, v in read_model_weights(path).items()}
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_run_config(ckpt: Path) -> RunConfig:
    try:
        return run_config_from_dict(tomllib.loads((ckpt / "config.toml").read_text())).validate()
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise CheckpointError(f"{ckpt / 'config.toml'}: {e}") from None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    sd = read_weights(ckpt, str(next(model.parameters()).device))
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    expected = model_state(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{ckpt}: tensor {k} has shape {tuple(v.shape)}, "
                                  f"the config needs {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=not getattr(model.cfg, "tie_embeddings", False))


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors have many types
        raise CheckpointError(f"cannot read {ckpt / 'state.pt'}: {e}") from None
