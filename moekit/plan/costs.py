"""The cost and capacity model: training compute, time and money; memory per GPU for a parallel
layout; KV cache; bandwidth-bound decode speed and serving cost. Plain functions of counts."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.model.transformer import ModelCounts
from moekit.plan.hardware import Hardware

DAY = 86400.0


# -- training ---------------------------------------------------------------------------------

def training_flops(counts: ModelCounts, tokens: float, attention: bool = True) -> float:
    """6 x active matmul params per token (forward 2, backward 4), plus attention when asked."""
    per_token = counts.train_flops_per_token if attention else 6 * counts.matmul_params_active
    return per_token * tokens


def gpu_seconds(flops: float, hw: Hardware, mfu: float) -> float:
    return flops / (hw.bf16_flops * mfu)


def wall_clock_days(flops: float, hw: Hardware, n_gpus: int, mfu: float) -> float:
    return gpu_seconds(flops, hw, mfu) / n_gpus / DAY


def implied_mfu(flops: float, hw: Hardware, n_gpus: int, days: float) -> float:
    """The model-FLOP utilisation a run of this length on this many GPUs must have reached."""
    return flops / (hw.bf16_flops * n_gpus * days * DAY)


def training_cost(n_gpus: int, days: float, hw: Hardware, price_per_hour: float | None = None) -> float:
    return n_gpus * days * 24 * (hw.price_per_hour if price_per_hour is None else price_per_hour)


# -- memory per GPU ---------------------------------------------------------------------------

@dataclass
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: bool = True  # shard grads and optimizer state over data parallel ranks (FSDP)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.ep


def params_per_gpu(counts: ModelCounts, layout: Layout) -> float:
    """Shared weights split by TP x PP; expert weights also split over EP."""
    shared = counts.total_params - counts.expert_params
    return shared / (layout.tp * layout.pp) + counts.expert_params / (layout.tp * layout.pp * layout.ep)


def activation_bytes_per_token_layer(cfg: ModelConfig, checkpointing: bool) -> float:
    """bf16 activations kept for the backward pass, per token and layer, with flash attention (no
    T x T scores). Full checkpointing keeps only the block input."""
    h, f, k = cfg.d_model, cfg.ffn_dim, cfg.top_k if cfg.n_experts > 1 else 1
    kv = 2 * cfg.n_kv_heads * cfg.hd
    if checkpointing:
        return 2 * h
    attn = 2 * h + cfg.n_heads * cfg.hd * 2 + kv + h  # norm in/out, q + attention output, k/v, proj out
    mlp = 2 * h + k * (h + 4 * f)  # norm in/out; per chosen expert: its input, w1, w3, silu, product
    return 2 * (attn + mlp)  # 2 bytes per element


def memory_per_gpu(cfg: ModelConfig, counts: ModelCounts, layout: Layout, micro_batch: int, seq_len: int,
                   checkpointing: bool = False) -> dict[str, float]:
    """Bytes per GPU: bf16 weights and grads, fp32 Adam (master, m, v), activations of the
    micro-batches in flight (1F1B keeps up to pp of them on the first stage)."""
    p = params_per_gpu(counts, layout)
    shard = layout.dp if layout.zero else 1
    weights = 2 * p
    grads = 2 * p / shard
    optimizer = 12 * p / shard
    layers_here = cfg.n_layers / layout.pp
    tokens = micro_batch * seq_len
    # with 1F1B the first stage holds pp micro-batches in flight
    act = activation_bytes_per_token_layer(cfg, checkpointing) * layers_here * tokens * layout.pp / layout.tp
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": act,
            "total": weights + grads + optimizer + act}


# -- inference --------------------------------------------------------------------------------

def kv_bytes_per_token(cfg: ModelConfig, bytes_per_elem: float = 2, n_kv_heads: int | None = None) -> float:
    """K and V of every layer for one token; n_kv_heads = cfg.n_heads gives the MHA figure."""
    return 2 * cfg.n_layers * (n_kv_heads or cfg.n_kv_heads) * cfg.hd * bytes_per_elem


def longest_context(cfg: ModelConfig, counts: ModelCounts, hw: Hardware, n_gpus: int, batch: int = 1,
                    bytes_per_param: float = 2, bytes_per_elem: float = 2, headroom: float = 0.9) -> int:
    """Tokens of context per sequence whose KV cache fits beside the weights."""
    free = headroom * hw.hbm_bytes * n_gpus - counts.total_params * bytes_per_param
    return max(0, int(free / (batch * kv_bytes_per_token(cfg, bytes_per_elem))))


def expected_experts_touched(n_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a layer reads for `batch` tokens with uniform routing:
    E x (1 - (1 - k/E)^B)."""
    if n_experts <= 1:
        return 1.0
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def decode_step_bytes(cfg: ModelConfig, counts: ModelCounts, batch: int, context: int,
                      bytes_per_param: float = 2, bytes_per_elem: float = 2) -> float:
    """Bytes read from memory per decode step: the shared weights, the experts the batch touches,
    one embedding row per token, and every sequence's KV cache."""
    # the embedding table is a lookup (one row per token) unless it doubles as the lm head
    shared = counts.shared_params - (0 if cfg.tie_embeddings else counts.embedding_params)
    touched = expected_experts_touched(cfg.n_experts, cfg.top_k, batch) if counts.n_moe_layers else 0
    weights = (shared + touched * counts.params_per_expert + batch * cfg.d_model) * bytes_per_param
    return weights + batch * context * kv_bytes_per_token(cfg, bytes_per_elem)


@dataclass
class DecodeEstimate:
    batch: int
    tokens_per_s: float  # all sequences together
    per_sequence_tokens_per_s: float
    bound: str  # "memory" or "compute"
    flop_utilisation: float
    step_bytes: float
    fits: bool  # weights + this batch's KV cache fit in the GPUs' memory


def decode_speed(cfg: ModelConfig, counts: ModelCounts, hw: Hardware, n_gpus: int, batch: int, context: int,
                 bytes_per_param: float = 2, bandwidth: float | None = None) -> DecodeEstimate:
    """Upper bound: a step takes max(bytes / bandwidth, FLOPs / peak) over n_gpus (perfect split)."""
    bw = (bandwidth or hw.hbm_bandwidth) * n_gpus
    step_bytes = decode_step_bytes(cfg, counts, batch, context, bytes_per_param)
    flops = batch * (2 * counts.matmul_params_active + 4 * cfg.n_layers * context * cfg.n_heads * cfg.hd)
    t_mem, t_flop = step_bytes / bw, flops / (hw.bf16_flops * n_gpus)
    t = max(t_mem, t_flop)
    tps = batch / t
    util = flops / t / (hw.bf16_flops * n_gpus)
    need = counts.total_params * bytes_per_param + batch * context * kv_bytes_per_token(cfg)
    return DecodeEstimate(batch, tps, 1 / t, "memory" if t_mem >= t_flop else "compute", util, step_bytes,
                          need <= hw.hbm_bytes * n_gpus)


def serving_cost_per_1k(tokens_per_s: float, n_gpus: int, hw: Hardware, price_per_hour: float | None = None) -> float:
    price = (hw.price_per_hour if price_per_hour is None else price_per_hour) * n_gpus
    return price / 3600 / tokens_per_s * 1000


def dense_decode_tokens_per_s(params: float, bytes_per_param: float, bandwidth: float,
                              overhead: float = 1.0) -> float:
    """A dense model reads every parameter per token; overhead multiplies the bytes (the published
    chart counts KV reads, unfused ops and hardware overhead as equal to the parameter reads: 2)."""
    return bandwidth / (params * bytes_per_param * overhead)


def reading_speed_tokens_per_s(words_per_minute: float, tokens_per_word: float = 2.0) -> float:
    return words_per_minute / 60 * tokens_per_word


def batch_per_expert(batch_tokens: float, n_experts: int, top_k: int) -> float:
    """Each expert sees top_k / n_experts of the assignments on average."""
    return batch_tokens * top_k / n_experts


def fits(memory: dict[str, float], hw: Hardware) -> bool:
    return memory["total"] <= hw.hbm_bytes

