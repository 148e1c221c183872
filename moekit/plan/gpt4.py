"""`moekit plan gpt4`: every figure of the public GPT-4 reports recomputed from the gpt4 preset,
beside the reported value and the ratio, with the difference explained where there is one."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config import preset
from moekit.model.transformer import count_config
from moekit.plan import costs
from moekit.plan.hardware import get_hardware

TOKENS = 13e12  # reported: ~13T tokens (text 2 epochs, code 4 epochs)
A100S, DAYS_LOW, DAYS_HIGH = 25_000, 90, 100
BATCH_TOKENS = 60e6


@dataclass
class ReportedFigure:
    name: str
    computed: float
    reported: float | None
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.reported else self.computed / self.reported


def gpt4_rows(preset_name: str = "gpt4-16x111b") -> list[ReportedFigure]:
    cfg = preset(preset_name)
    c = count_config(cfg, context=8192)
    a100 = get_hardware("a100-40gb")
    h100 = get_hardware("h100-sxm")
    rows = [
        ReportedFigure("total parameters", c.total_params, 1.8e12, "params"),
        ReportedFigure("active parameters per token (2 of 16 experts)", c.active_params, 280e9, "params"),
        ReportedFigure("shared (attention, embeddings) parameters", c.shared_params, 55e9, "params"),
        ReportedFigure("parameters per expert (MLP, all layers)", c.params_per_expert, 111e9, "params"),
        ReportedFigure("forward FLOP per token (2 x active)", 2 * c.matmul_params_active, 560e9, "FLOP",
                "the reports write '560 TFLOPs per forward pass': 560 GFLOP is one token's forward pass; "
                "560 TFLOP would be a 1000-token pass"),
        ReportedFigure("  + attention at 8k context", c.forward_flops_per_token, None, "FLOP",
                "PaLM's 4 x layers x context x heads x head_dim; the reports leave attention out"),
        ReportedFigure("dense 1.8T forward FLOP per token", 2 * c.total_params, 3700e9, "FLOP",
                "a dense model of the same size touches every parameter"),
    ]
    flops_6n = costs.training_flops(c, TOKENS, attention=False)
    flops_all = costs.training_flops(c, TOKENS, attention=True)
    rows += [
        ReportedFigure("training FLOP, 13T tokens (6 x active)", flops_6n, 2.15e25, "FLOP"),
        ReportedFigure("  with attention at 8k", flops_all, 2.15e25, "FLOP",
                f"attention adds {flops_all / flops_6n - 1:.0%}; the reported figure matches 6N"),
    ]
    mfu_low = costs.implied_mfu(2.15e25, a100, A100S, DAYS_HIGH)
    mfu_high = costs.implied_mfu(2.15e25, a100, A100S, DAYS_LOW)
    mfu = (mfu_low + mfu_high) / 2
    days = costs.wall_clock_days(flops_6n, a100, A100S, mfu)
    rows += [
        ReportedFigure("MFU implied by 2.15e25 FLOP on 25,000 A100 x 90-100 days", mfu, None, "fraction",
                f"{mfu_low:.1%} at 100 days to {mfu_high:.1%} at 90 days"),
        ReportedFigure("days on 25,000 A100 at that MFU", days, (DAYS_LOW + DAYS_HIGH) / 2, "days"),
        ReportedFigure("A100-days", days * A100S, (DAYS_LOW + DAYS_HIGH) / 2 * A100S, "GPU-days"),
        ReportedFigure("training cost at $1.10 per A100-hour", costs.training_cost(A100S, days, a100), 63e6, "$"),
        ReportedFigure("tokens per expert in a 60M-token batch", costs.batch_per_expert(BATCH_TOKENS, cfg.n_experts, cfg.top_k),
                7.5e6, "tokens"),
    ]
    # inference: 128 A100-40GB as TP8 x PP16, bf16 weights
    serve = costs.memory_per_gpu(cfg, c, costs.Layout(tp=8, pp=16), micro_batch=0, seq_len=0)
    weights_gb = serve["weights"] / 1e9
    kv_room = a100.hbm_bytes - serve["weights"]
    ctx_tokens = kv_room * 128 / costs.kv_bytes_per_token(cfg)
    rows += [
        ReportedFigure("serving weights per GPU, 128 GPUs as TP8 x PP16 (GB)", weights_gb, 40, "GB",
                f"fits a 40 GB A100 with {kv_room / 1e9:.1f} GB per GPU left: KV for "
                f"{ctx_tokens / 1e6:.1f}M tokens of context (MQA)"),
        ReportedFigure("KV bytes per token, MQA", costs.kv_bytes_per_token(cfg), None, "bytes",
                f"MHA would need {costs.kv_bytes_per_token(cfg, n_kv_heads=cfg.n_heads) / 1e6:.1f} MB "
                f"({cfg.n_heads}x)"),
    ]
    gpt4_b1 = costs.decode_speed(cfg, c, a100, 128, batch=1, context=2048)
    rows.append(ReportedFigure("GPT-4 batch-1 decode bound on 128 A100 (tok/s)", gpt4_b1.tokens_per_s, None, "tok/s",
                        "far above the 33.33 tok/s reading-speed bar: only ~280B parameters are read per token "
                        "(pipeline stages run one after another, so 16-way PP divides this by up to 16)"))
    rows += [
        ReportedFigure("175B dense, 8-bit, one H100 at 3.35 TB/s", costs.dense_decode_tokens_per_s(175e9, 1, h100.hbm_bandwidth),
                19, "tok/s"),
        ReportedFigure("reading speed, 250 words/min at 2 tokens/word", costs.reading_speed_tokens_per_s(250), 8.33, "tok/s"),
        ReportedFigure("reading speed, 1000 words/min", costs.reading_speed_tokens_per_s(1000), 33.33, "tok/s"),
    ]
    bw8 = 8 * h100.hbm_bandwidth
    raw = costs.dense_decode_tokens_per_s(1e12, 2, bw8)
    chart = costs.dense_decode_tokens_per_s(1e12, 2, bw8, overhead=2.0)
    util20 = 2 * 1e12 * 20 / (8 * h100.bf16_flops)
    rows += [
        ReportedFigure("1T dense bf16 on 8 x H100: tok/s bound", raw, 33.33, "tok/s",
                f"misses 33.33 tok/s even with every byte at full bandwidth; {chart:.1f} tok/s with the "
                "published chart's equal overhead for KV and unfused ops"),
        ReportedFigure("1T dense on 8 x H100: FLOP utilisation at 20 tok/s", util20, 0.05, "fraction",
                "the reports say 'under 5%'"),
    ]
    return rows


def format_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "$":
        return f"${v / 1e6:.1f}M"
    if unit in ("tok/s", "days", "GB"):
        return f"{v:,.2f}"
    for suffix, div in (("e12", 1e12), ("e9", 1e9), ("e6", 1e6)):
        if abs(v) >= div and abs(v) < div * 1e3:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"
