"""Hugging Face checkpoints in and out: Llama / Mistral (dense), Mixtral, OLMoE and Qwen2-MoE.

Reading accepts the per-expert tensors transformers writes to disk (`experts.{e}.w1`,
`experts.{e}.gate_proj`, ...) and the fused in-memory layout of transformers 5
(`experts.gate_up_proj` [E, 2f, d], `experts.down_proj` [E, d, f]). Writing produces sharded
safetensors with an index, config.json, and the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.config import ModelConfig
from moekit.errors import CheckpointError, ConfigError

SUPPORTED = ("llama", "mistral", "mixtral", "olmoe", "qwen2_moe")


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "manifest.json").exists()


# -- config -----------------------------------------------------------------------------------

def _rope(hf: dict) -> dict:
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {"rope_theta": theta}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": float(params.get("factor", 1.0))}
    if kind == "yarn":
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key):
                raise ConfigError(f"yarn rope parameter {key} is not supported")
        if params.get("beta_fast", 32) != 32 or params.get("beta_slow", 1) != 1:
            raise ConfigError("yarn rope with beta_fast != 32 or beta_slow != 1 is not supported")
        return {"rope_theta": theta, "rope_scaling": float(params["factor"]), "rope_type": "yarn",
                "rope_original_len": int(params["original_max_position_embeddings"])}
    raise ConfigError(f"rope scaling type {kind!r} is not supported (default, linear and yarn are)")


def config_from_hf(hf: dict) -> ModelConfig:
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ConfigError(f"unsupported architecture model_type={mt!r}; supported: {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (silu is)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention_bias / mlp_bias are not supported")
    try:
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope = _rope(hf)
        max_len = hf.get("max_position_embeddings", 4096)
        if hf.get("sliding_window") and hf.get("use_sliding_window", True):
            max_len = min(max_len, hf["sliding_window"])  # full attention is exact up to the window
        common = dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=hf.get("num_key_value_heads") or heads,
                      head_dim=0 if hf.get("head_dim") in (None, d // heads) else hf["head_dim"],
                      norm_eps=hf.get("rms_norm_eps", 1e-6), **rope,
                      max_seq_len=max_len, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if mt in ("llama", "mistral"):
            cfg = ModelConfig(**common, ffn_dim=hf["intermediate_size"], n_experts=1, top_k=1)
        elif mt == "mixtral":
            cfg = ModelConfig(**common, ffn_dim=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                              top_k=hf["num_experts_per_tok"], renorm_gates=True,
                              balance_loss_coef=hf.get("router_aux_loss_coef", 0.01))
        elif mt == "olmoe":
            if hf.get("clip_qkv"):
                raise ConfigError("OLMoE clip_qkv is not supported")
            cfg = ModelConfig(**common, ffn_dim=hf["intermediate_size"], n_experts=hf["num_experts"],
                              top_k=hf["num_experts_per_tok"], renorm_gates=bool(hf.get("norm_topk_prob", False)),
                              qk_norm=True, balance_loss_coef=hf.get("router_aux_loss_coef", 0.01))
        else:  # qwen2_moe
            if hf.get("mlp_only_layers"):
                raise ConfigError("Qwen2-MoE mlp_only_layers is not supported")
            cfg = ModelConfig(**common, ffn_dim=hf["moe_intermediate_size"], dense_ffn_dim=hf["intermediate_size"],
                              n_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                              renorm_gates=bool(hf.get("norm_topk_prob", False)),
                              moe_every=hf.get("decoder_sparse_step", 1),
                              shared_expert_ffn=hf.get("shared_expert_intermediate_size", 0),
                              attn_bias=bool(hf.get("qkv_bias", True)),
                              balance_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    except KeyError as e:
        raise ConfigError(f"config.json is missing field {e.args[0]!r} for model_type {mt!r}") from None
    return cfg.validate()


def arch_for(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that holds this config exactly, or a ConfigError."""
    if cfg.n_experts == 1:
        if cfg.qk_norm or cfg.attn_bias:
            raise ConfigError("no Hugging Face architecture here holds a dense model with qk_norm or attn_bias")
        return "llama"
    if cfg.qk_norm:
        if cfg.shared_expert_ffn or cfg.attn_bias or cfg.moe_every > 1:
            raise ConfigError("OLMoE (the qk_norm layout) has no shared expert, attention bias or dense layers")
        return "olmoe"
    if cfg.shared_expert_ffn or cfg.attn_bias or cfg.moe_every > 1 or not cfg.renorm_gates:
        if cfg.moe_every > 1 and not cfg.shared_expert_ffn:
            raise ConfigError("export of MoE models with dense layers between MoE layers needs a shared expert "
                              "(Qwen2-MoE layout); no Hugging Face architecture holds this config")
        return "qwen2_moe"
    return "mixtral"


def config_to_hf(cfg: ModelConfig, eos_id: int | None = None, dtype: str = "float32") -> dict:
    arch = arch_for(cfg)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling != 1.0 and cfg.rope_type == "linear":
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "linear", "factor": cfg.rope_scaling}
    elif cfg.rope_scaling != 1.0:
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "yarn", "factor": cfg.rope_scaling,
                "original_max_position_embeddings": cfg.rope_original_len or int(cfg.max_seq_len / cfg.rope_scaling),
                "beta_fast": 32.0, "beta_slow": 1.0}
    hf = {"model_type": arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.hd, "rms_norm_eps": cfg.norm_eps,
          "rope_parameters": rope, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
          "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "torch_dtype": dtype,
          "dtype": dtype, "attention_bias": False, "eos_token_id": eos_id, "bos_token_id": eos_id}
    names = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
             "qwen2_moe": "Qwen2MoeForCausalLM"}
    hf["architectures"] = [names[arch]]
    if arch == "llama":
        hf.update(intermediate_size=cfg.ffn_dim, mlp_bias=False)
    elif arch == "mixtral":
        hf.update(intermediate_size=cfg.ffn_dim, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                  sliding_window=None, router_aux_loss_coef=cfg.balance_loss_coef)
    elif arch == "olmoe":
        hf.update(intermediate_size=cfg.ffn_dim, num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                  norm_topk_prob=cfg.renorm_gates, router_aux_loss_coef=cfg.balance_loss_coef, clip_qkv=None)
    else:
        hf.update(intermediate_size=cfg.dense_hidden, moe_intermediate_size=cfg.ffn_dim,
                  shared_expert_intermediate_size=cfg.shared_expert_ffn, num_experts=cfg.n_experts,
                  num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.renorm_gates, decoder_sparse_step=cfg.moe_every,
                  mlp_only_layers=[], qkv_bias=cfg.attn_bias, use_sliding_window=False, sliding_window=None,
                  router_aux_loss_coef=cfg.balance_loss_coef)
    return hf


# -- tensor names -----------------------------------------------------------------------------

def _moe_prefix(arch: str) -> str:
    return "block_sparse_moe" if arch == "mixtral" else "mlp"


def _expert_names(arch: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def to_hf_state(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moekit state dict -> HF tensor names (per-expert layout, as transformers writes to disk)."""
    arch = arch_for(cfg)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "ffn_norm.weight"]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[h + f"self_attn.{theirs}.weight"] = sd[b + f"attn.{ours}.weight"]
            if b + f"attn.{ours}.bias" in sd:
                out[h + f"self_attn.{theirs}.bias"] = sd[b + f"attn.{ours}.bias"]
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[h + f"mlp.{theirs}.weight"] = sd[b + f"ffn.{ours}.weight"]
            continue
        p = h + _moe_prefix(arch) + "."
        out[p + "gate.weight"] = sd[b + "ffn.router.weight"]
        n1, n3, n2 = _expert_names(arch)
        for e in range(cfg.n_experts):
            out[p + f"experts.{e}.{n1}.weight"] = sd[b + "ffn.experts.w1"][e].t().contiguous()  # [f, d]
            out[p + f"experts.{e}.{n3}.weight"] = sd[b + "ffn.experts.w3"][e].t().contiguous()
            out[p + f"experts.{e}.{n2}.weight"] = sd[b + "ffn.experts.w2"][e].t().contiguous()  # [d, f]
        if cfg.shared_expert_ffn:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[p + f"shared_expert.{theirs}.weight"] = sd[b + f"ffn.shared_expert.{ours}.weight"]
            out[p + "shared_expert_gate.weight"] = sd[b + "ffn.shared_gate.weight"]
    return out


def from_hf_state(cfg: ModelConfig, arch: str, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors (per-expert or fused experts) -> moekit state dict. Names a missing tensor."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        return hf[name]

    sd = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        sd[b + "attn_norm.weight"] = take(h + "input_layernorm.weight")
        sd[b + "ffn_norm.weight"] = take(h + "post_attention_layernorm.weight")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            sd[b + f"attn.{ours}.weight"] = take(h + f"self_attn.{theirs}.weight")
            if cfg.attn_bias and ours != "wo":
                sd[b + f"attn.{ours}.bias"] = take(h + f"self_attn.{theirs}.bias")
        if cfg.qk_norm:
            sd[b + "attn.q_norm.weight"] = take(h + "self_attn.q_norm.weight")
            sd[b + "attn.k_norm.weight"] = take(h + "self_attn.k_norm.weight")
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[b + f"ffn.{ours}.weight"] = take(h + f"mlp.{theirs}.weight")
            continue
        p = h + _moe_prefix(arch) + "."
        if p + "gate.weight" not in hf and h + "mlp.gate.weight" in hf:
            p = h + "mlp."  # transformers 5's in-memory Mixtral names the block mlp
        sd[b + "ffn.router.weight"] = take(p + "gate.weight")
        f = cfg.ffn_dim
        if p + "experts.gate_up_proj" in hf:  # fused layout: [E, 2f, d] and [E, d, f]
            gu = hf[p + "experts.gate_up_proj"]
            sd[b + "ffn.experts.w1"] = gu[:, :f].transpose(1, 2).contiguous()
            sd[b + "ffn.experts.w3"] = gu[:, f:].transpose(1, 2).contiguous()
            sd[b + "ffn.experts.w2"] = take(p + "experts.down_proj").transpose(1, 2).contiguous()
        else:
            n1, n3, n2 = _expert_names(arch)
            for ours, theirs in (("w1", n1), ("w3", n3), ("w2", n2)):
                sd[b + f"ffn.experts.{ours}"] = torch.stack(
                    [take(p + f"experts.{e}.{theirs}.weight").t() for e in range(cfg.n_experts)]).contiguous()
        if cfg.shared_expert_ffn:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[b + f"ffn.shared_expert.{ours}.weight"] = take(p + f"shared_expert.{theirs}.weight")
            sd[b + "ffn.shared_gate.weight"] = take(p + "shared_expert_gate.weight")
    return sd


# -- files ------------------------------------------------------------------------------------

def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{path} holds no model.safetensors or model.safetensors.index.json")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(path / f)))
        return out
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"cannot read the weights in {path}: {e}") from None


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face model directory -> (ModelConfig, moekit state dict), shapes checked."""
    path = Path(path)
    try:
        hf_cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    cfg = config_from_hf(hf_cfg)
    sd = from_hf_state(cfg, hf_cfg["model_type"], read_hf_tensors(path))
    from moekit.model.transformer import build_model

    expected = build_model(cfg, "meta").state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for k, v in expected.items():
        if k not in sd:
            raise CheckpointError(f"tensor for {k} is missing")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(sd[k].shape)}, config.json implies {tuple(v.shape)}")
    return cfg, sd


def save_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor], out: str | Path, tokenizer_json: Path | None = None,
            eos_id: int | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json, sharded safetensors + index, tokenizer files; atomically (temp + rename)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} exists and is not empty (or is not a directory)")
    hf = to_hf_state(cfg, sd)
    dtype = str(next(iter(hf.values())).dtype).removeprefix("torch.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        shards, cur, size = [], {}, 0
        for name, t in hf.items():
            nbytes = t.numel() * t.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name], size = t.contiguous(), size + nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in hf.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, eos_id, dtype), indent=2))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}, indent=2))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
