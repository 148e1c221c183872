"""`moekit convert` and `moekit upcycle`: moekit runs <-> Hugging Face directories, and sparse
upcycling of a dense model into an MoE (Komatsuzaki et al., 2023)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moekit.config import ModelConfig, RunConfig, TrainConfig
from moekit.data.tokenizer import Tokenizer
from moekit.errors import CheckpointError, ConfigError
from moekit.interop.hf import is_hf_dir, load_hf, save_hf
from moekit.model.transformer import Transformer, build_model
from moekit.train import checkpoint as ckpt_io


def load_source(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, Path | None]:
    """A moekit run/checkpoint or a Hugging Face directory -> (config, state dict, tokenizer, ckpt)."""
    path = Path(path)
    if is_hf_dir(path):
        cfg, sd = load_hf(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json (a fast tokenizer file is needed)")
        return cfg, sd, Tokenizer.load(path / "tokenizer.json"), None
    ckpt = ckpt_io.resolve_checkpoint(path)
    ckpt_io.verify(ckpt)
    cfg = ckpt_io.load_run_config(ckpt).model
    return cfg, ckpt_io.read_weights(ckpt), Tokenizer.load(ckpt / "tokenizer.json"), ckpt


def source_config(path: str | Path) -> ModelConfig:
    """The model config of a moekit run/checkpoint or a Hugging Face directory (no weights read)."""
    import json

    from moekit.interop.hf import config_from_hf

    path = Path(path)
    if is_hf_dir(path):
        try:
            return config_from_hf(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    return ckpt_io.load_run_config(ckpt_io.resolve_checkpoint(path)).model


def model_from_source(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    cfg, sd, tok, _ = load_source(path)
    model = build_model(cfg, device)
    if cfg.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)
    return model, tok


def save_as_run(model: Transformer, tok: Tokenizer, out: str | Path) -> Path:
    """A checkpoint at step 0 that `generate`, `serve` and `train --init-from` read."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if ckpt_io.list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints; choose another --out")
    train = TrainConfig(out_dir=str(out), seq_len=min(TrainConfig().seq_len, model.cfg.max_seq_len))
    run = RunConfig(model=model.cfg, train=train).validate()
    return ckpt_io.save_checkpoint(out, 0, model, run, tok, {"step": 0})


def convert_from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    if not is_hf_dir(hf_dir):
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    model, tok = model_from_source(hf_dir)
    return save_as_run(model, tok, out)


def convert_to_hf(run: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    cfg, sd, tok, ckpt = load_source(run)
    if ckpt is None:
        raise ConfigError(f"{run} is already a Hugging Face directory")
    return save_hf(cfg, sd, out, ckpt / "tokenizer.json", tok.eot_id, max_shard_bytes)


def upcycle(dense: str | Path, n_experts: int, top_k: int, out: str | Path, noise: float = 0.0,
            router_std: float = 0.02, seed: int = 0) -> Path:
    """Every expert starts as a copy of the dense MLP (plus optional noise), the router small.
    With renormalised gates and no noise the MoE computes exactly the dense model's function."""
    cfg, sd, tok, _ = load_source(dense)
    if cfg.n_experts != 1:
        raise ConfigError(f"{dense} is already an MoE ({cfg.n_experts} experts); upcycling needs a dense model")
    if not 1 <= top_k <= n_experts or n_experts < 2:
        raise ConfigError(f"need 2 <= experts and 1 <= top_k <= experts, got {n_experts} and {top_k}")
    moe_cfg = dataclasses.replace(cfg, n_experts=n_experts, top_k=top_k, renorm_gates=True,
                                  ffn_dim=cfg.dense_hidden, dense_ffn_dim=0, moe_every=1).validate()
    g = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in sd.items():
        if ".ffn." not in k:
            new[k] = v
            continue
        prefix, name = k.split(".ffn.")
        w = v.t()  # nn.Linear [out, in] -> [in, out] as the stacked experts store it
        stacked = w[None].repeat(n_experts, 1, 1)  # [E, in, out]
        if noise:
            stacked = stacked + noise * w.std() * torch.randn(stacked.shape, generator=g)
        new[f"{prefix}.ffn.experts.{name.removesuffix('.weight')}"] = stacked.contiguous()
        if name == "w1.weight":
            new[f"{prefix}.ffn.router.weight"] = torch.randn(n_experts, cfg.d_model, generator=g) * router_std
    model = build_model(moe_cfg)
    if moe_cfg.tie_embeddings:
        new.pop("lm_head.weight", None)
    model.load_state_dict({k: v.to(model.embed.weight.dtype) for k, v in new.items()},
                          strict=not moe_cfg.tie_embeddings)
    return save_as_run(model, tok, out)
