"""Configs are data: dataclasses, a preset registry, TOML load/save.

Every CLI flag maps onto one field here; `validate()` is the single place where a config is
checked, and it raises `ConfigError` with one readable line.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 1  # 1 = multi-query (GPT-4, as publicly reported); < n_heads = grouped-query
    head_dim: int = 0  # 0 -> d_model // n_heads
    ffn_dim: int = 512  # hidden size of each expert's SwiGLU MLP
    dense_ffn_dim: int = 0  # hidden size of dense (non-MoE) layers; 0 -> ffn_dim
    n_experts: int = 8  # 1 -> plain dense model
    top_k: int = 2
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 (GLaM: every other layer)
    renorm_gates: bool = True  # renormalise the k chosen gates to sum to 1 (Mixtral)
    capacity_factor: float = 0.0  # 0 -> dropless; else tokens beyond capacity are dropped
    shared_expert_ffn: int = 0  # > 0: an always-on shared expert with a sigmoid gate (Qwen2-MoE)
    qk_norm: bool = False  # RMSNorm on the q and k projections (OLMoE)
    attn_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # context-extension factor (1 = plain RoPE)
    rope_type: str = "linear"  # "linear" (position interpolation) | "yarn" (NTK-by-parts)
    rope_original_len: int = 0  # pretraining context for yarn (0 = max_seq_len / rope_scaling)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    expert_impl: str = "auto"  # "auto" | "grouped" | "loop"

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def dense_hidden(self) -> int:
        return self.dense_ffn_dim or self.ffn_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 1 and (i + 1) % self.moe_every == 0

    def validate(self) -> "ModelConfig":
        positive = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                    "n_experts", "top_k", "moe_every", "max_seq_len"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.hd % 2:
            raise ConfigError(f"head dimension must be even for rotary embeddings, got {self.hd}")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.shared_expert_ffn < 0:
            raise ConfigError(f"shared_expert_ffn must be >= 0, got {self.shared_expert_ffn}")
        if not (0 <= self.capacity_factor < math.inf):
            raise ConfigError(f"capacity_factor must be a finite number >= 0 (0 = dropless), got {self.capacity_factor}")
        if not (1.0 <= self.rope_scaling < math.inf):
            raise ConfigError(f"rope_scaling must be a finite number >= 1, got {self.rope_scaling}")
        if self.rope_type not in ("linear", "yarn"):
            raise ConfigError(f"rope_type must be linear or yarn, got {self.rope_type!r}")
        if self.rope_original_len < 0:
            raise ConfigError(f"rope_original_len must be >= 0, got {self.rope_original_len}")
        if not (1.0 < self.rope_theta < math.inf):
            raise ConfigError(f"rope_theta must be a finite number > 1, got {self.rope_theta}")
        if self.expert_impl not in ("auto", "grouped", "loop"):
            raise ConfigError(f"expert_impl must be auto, grouped or loop, got {self.expert_impl!r}")
        for name in ("balance_loss_coef", "z_loss_coef", "init_std", "norm_eps"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        return self


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["text", "code"])
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # sampling weight per source
    epochs: list[float] = field(default_factory=lambda: [2.0, 4.0])  # seeds: text 2, code 4
    max_docs: int = 0  # per source, 0 = all (tiny demo caps it to stay fast)
    max_doc_chars: int = 20000  # long documents are split into pieces of at most this size
    val_docs: int = 24  # held-out documents per source
    tokenizer_vocab: int = 0  # 0 -> model.vocab_size
    cache_dir: str = ""  # "" -> ~/.cache/moekit


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    seed: int = 1337
    steps: int = 300
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward pass
    batch_tokens: int = 0  # target tokens per optimizer step; 0 -> micro_batch * seq_len
    batch_ramp_start: int = 0  # tokens per step at step 0; 0 -> no ramp
    batch_ramp_steps: int = 0  # linear ramp length in steps (GPT-4 ramped to 60M tokens)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 2
    # seconds this process may train (set-up included): it checkpoints and stops, with exit code 75,
    # before a step that could end past it (leave room for the checkpoint write); 0: no limit.
    # SIGTERM and Ctrl-C stop the same way, after the current step
    time_limit: float = 0.0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model (pays off on GPU)
    activation_checkpointing: bool = False  # recompute blocks in the backward to save memory
    threads: int = 0  # torch CPU threads, 0 = torch default
    dp: int = 1  # data-parallel (FSDP2) ranks; launch with torchrun --nproc-per-node dp
    ep: int = 1  # expert-parallel ranks
    tp: int = 1  # tensor-parallel ranks (DTensor)
    pp: int = 1  # pipeline stages (torch.distributed.pipelining)
    pp_schedule: str = "1f1b"  # 1f1b | gpipe
    pp_microbatches: int = 0  # pipeline micro-batches per micro_batch; 0 -> pp (must divide micro_batch)
    ckpt_format: str = "full"  # full (gathered safetensors) | dcp (each rank writes its shard)
    distill_from: str = ""  # train against this model's logits (a draft for speculative decoding)
    distill_alpha: float = 1.0  # weight of the distillation KL; 1 - alpha stays on the data's tokens
    distill_temperature: float = 1.0
    distill_loss: str = "kl"  # "kl" (forward KL) or "tvd" (total variation: 1 - the sampled acceptance rate)
    # share of micro-batches whose sequences the teacher writes itself: a corpus prefix continued
    # greedily by the teacher (on-policy distillation: the text the draft will be
    # asked to predict when it drafts for greedy decoding)
    distill_on_policy: float = 0.0
    distill_on_policy_temperature: float = 0.0  # the teacher samples at this temperature (0: greedy)
    # tokens the teacher writes per on-policy row, after a corpus prefix of seq_len + 1 - this many
    # (0: three quarters of the row). Each written token is a decode step of the teacher: a few
    # hundred cost a fraction of a whole row's
    distill_on_policy_tokens: int = 0
    # on-policy micro-batches the teacher writes at once, as one decode batch of pool x micro_batch
    # rows: a decode step reads the teacher's weights once for all its rows, so the rows written per
    # second grow almost with the pool (the written rows wait in the checkpoint; one at a time
    # under torch.distributed)
    distill_on_policy_pool: int = 8
    # at each evaluation of a distillation run: the model as the teacher's speculative draft on this
    # many held-out prompts (greedy, distill_eval_k proposals a step), acceptance logged; 0: off
    distill_eval_prompts: int = 8
    distill_eval_k: int = 4
    init_from: str = ""  # start from these weights (moekit run or Hugging Face dir); its model config wins
    sample_prompt: str = "def "
    sample_tokens: int = 120

    def validate(self) -> "TrainConfig":
        for name in ("steps", "seq_len", "micro_batch", "eval_every", "eval_batches", "ckpt_every", "keep_last",
                     "distill_on_policy_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise ConfigError("need 0 <= distill_alpha <= 1 and distill_temperature > 0")
        if not 0 <= self.distill_on_policy <= 1 or (self.distill_on_policy and not self.distill_from):
            raise ConfigError("distill_on_policy is a share in [0, 1] and needs distill_from")
        if self.distill_eval_prompts < 0 or self.distill_eval_k < 1:
            raise ConfigError("need distill_eval_prompts >= 0 and distill_eval_k >= 1")
        if not 0 <= self.distill_on_policy_tokens <= self.seq_len:
            raise ConfigError(f"distill_on_policy_tokens must be in [0, seq_len={self.seq_len}]")
        if self.distill_on_policy_temperature < 0:
            raise ConfigError("distill_on_policy_temperature must be >= 0")
        if self.distill_on_policy and self.pp > 1:
            raise ConfigError("distill_on_policy does not run with pipeline parallelism")
        if self.distill_loss not in ("kl", "tvd"):
            raise ConfigError(f"distill_loss must be 'kl' or 'tvd', got {self.distill_loss!r}")
        if self.pp_schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"pp_schedule must be 1f1b or gpipe, got {self.pp_schedule!r}")
        if self.ckpt_format not in ("full", "dcp"):
            raise ConfigError(f"ckpt_format must be full or dcp, got {self.ckpt_format!r}")
        if self.ckpt_format == "dcp" and self.ep > 1 and self.dp > 1:
            raise ConfigError("ckpt_format dcp does not cover --ep combined with --dp yet; use ckpt_format full")
        if self.pp_microbatches < 0 or (self.pp > 1 and self.micro_batch % (self.pp_microbatches or self.pp)):
            raise ConfigError(f"pp_microbatches ({self.pp_microbatches or self.pp}) must divide micro_batch "
                              f"({self.micro_batch})")
        if not math.isfinite(self.time_limit) or self.time_limit < 0:
            raise ConfigError(f"time_limit must be >= 0 seconds (0: none), got {self.time_limit}")
        if self.batch_tokens and self.batch_tokens < self.seq_len:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must be >= seq_len ({self.seq_len})")
        return self


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.train.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        d = self.data
        if not (len(d.sources) == len(d.weights) == len(d.epochs)):
            raise ConfigError("data.sources, data.weights and data.epochs must have the same length")
        if any(not (0 < x < math.inf) for x in (*d.weights, *d.epochs)):
            raise ConfigError(f"data.weights and data.epochs must be finite numbers > 0, got {d.weights} and {d.epochs}")
        return self


# --------------------------------------------------------------------------------------------
# Presets. GPT-4 widths are chosen so that the counts match the public GPT-4 reports (see `moekit plan`):
# 16 experts x ~111B MLP params + ~55B shared attention = ~1.8T total, ~280B active.

PRESETS: dict[str, ModelConfig] = {
    # trains on 2 CPU cores in a few minutes
    "tiny": ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=1,
                        ffn_dim=256, n_experts=8, top_k=2, max_seq_len=1024),
    "small": ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=1,
                         ffn_dim=1024, n_experts=8, top_k=2, max_seq_len=2048),
    # a draft for speculative decoding of the tiny model (same vocabulary)
    "draft": ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                         ffn_dim=128, n_experts=4, top_k=2, max_seq_len=1024),
    # a draft for bench-1b (--distill-from sets the vocabulary): 4 layers, ~1/20 of its active bytes
    "bench-draft": ModelConfig(vocab_size=32000, d_model=512, n_layers=4, n_heads=8, n_kv_heads=1,
                               ffn_dim=1024, n_experts=4, top_k=2, max_seq_len=4096),
    # the GPU benchmark model: 1.21B total / 0.35B active
    "bench-1b": ModelConfig(vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4,
                            ffn_dim=2816, n_experts=8, top_k=2, max_seq_len=4096),
    # Mixtral-shaped decode benchmark: 4.7B total / 1.34B active
    "bench-decode": ModelConfig(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4,
                                ffn_dim=5632, n_experts=8, top_k=2, max_seq_len=4096),
    "mixtral-8x7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                ffn_dim=14336, n_experts=8, top_k=2, max_seq_len=32768,
                                rope_theta=1e6),
    # GLaM 64B/64E: d 8192, 64 layers, MoE every other layer. GLaM's counts (1.2T total, 96.6B
    # active) are met with SwiGLU experts at ffn 23168 and 128 heads of 128.
    "glam-1.2t": ModelConfig(vocab_size=256000, d_model=8192, n_layers=64, n_heads=128, n_kv_heads=128,
                             head_dim=128, ffn_dim=23168, n_experts=64, top_k=2, moe_every=2,
                             max_seq_len=1024),
    # seeds, account 1: 16 experts of ~111B (over all layers), ~55B shared, MQA, 120 layers
    "gpt4-16x111b": ModelConfig(vocab_size=100352, d_model=14848, n_layers=120, n_heads=116,
                                n_kv_heads=1, ffn_dim=20736, n_experts=16, top_k=2,
                                max_seq_len=8192),
    # seeds, account 2: "8 x 220B = 1.76T"
    "gpt4-8x220b": ModelConfig(vocab_size=100352, d_model=14848, n_layers=120, n_heads=116,
                               n_kv_heads=1, ffn_dim=39936, n_experts=8, top_k=2,
                               max_seq_len=8192),
}

# Per-preset training defaults (only fields that differ from TrainConfig's defaults).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(out_dir="runs/tiny", steps=800, seq_len=256, micro_batch=4, batch_tokens=2048,
                 batch_ramp_start=1024, batch_ramp_steps=100, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                 eval_every=100, ckpt_every=200),
    "draft": dict(out_dir="runs/draft", steps=400, seq_len=256, micro_batch=8, lr=3e-3, min_lr=3e-4,
                  warmup_steps=20, eval_every=100, ckpt_every=200),
    "small": dict(out_dir="runs/small", steps=2000, seq_len=512, micro_batch=16, lr=1e-3),
    "bench-draft": dict(out_dir="runs/bench-draft", steps=1000, seq_len=2048, micro_batch=8, lr=2e-3, min_lr=2e-4,
                        warmup_steps=50),
    "bench-1b": dict(out_dir="runs/bench-1b", steps=2000, seq_len=2048, micro_batch=8, lr=6e-4,
                     min_lr=6e-5, warmup_steps=100, compile=True),
}

DATA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(max_docs=1500),
    "draft": dict(max_docs=1500),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def run_preset(name: str) -> RunConfig:
    model = preset(name)
    train = TrainConfig(**TRAIN_PRESETS.get(name, {}))
    data = DataConfig(**DATA_PRESETS.get(name, {}))
    return RunConfig(model=model, train=train, data=data)


# --------------------------------------------------------------------------------------------
# TOML

def _coerce(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown field {where}.{key}; known: {', '.join(known)}")
        default = getattr(cls(), key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(default) is not type(value) and not isinstance(default, list):
            raise ConfigError(f"{where}.{key} must be {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return kwargs


def run_config_from_dict(d: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    cfg = base or RunConfig()
    unknown = set(d) - {"model", "train", "data", "preset"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    if "preset" in d:
        cfg = run_preset(d["preset"])
    model = dataclasses.replace(cfg.model, **_coerce(ModelConfig, d.get("model", {}), "model"))
    train = dataclasses.replace(cfg.train, **_coerce(TrainConfig, d.get("train", {}), "train"))
    data = dataclasses.replace(cfg.data, **_coerce(DataConfig, d.get("data", {}), "data"))
    return RunConfig(model=model, train=train, data=data)


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A TOML file as a dict, or one clear ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_toml(path: str | Path) -> RunConfig:
    return run_config_from_dict(read_toml(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(sections: dict[str, Any]) -> str:
    """Write {section: dataclass or flat dict} as TOML (flat tables only, which is all we use)."""
    out = []
    for name, obj in sections.items():
        values = asdict(obj) if dataclasses.is_dataclass(obj) else obj
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**_coerce(ModelConfig, d, "model"))
