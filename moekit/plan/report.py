"""`moekit plan`: the planner's report for a preset (or the published GPT-4 table), as rich tables,
JSON or a roofline PNG, and a self-check against measured benchmark results."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moekit.config import ModelConfig, preset
from moekit.errors import ConfigError
from moekit.model.transformer import count_config
from moekit.plan import costs
from moekit.plan.counts import human as _human
from moekit.plan.hardware import Hardware, get_hardware
from moekit.plan.gpt4 import format_value, gpt4_rows


@dataclass
class PlanInputs:
    hardware: str = "h100-sxm"
    hardware_file: str | None = None
    gpus: int = 8
    mfu: float = 0.4
    tokens: float = 1e12
    days: float = 0.0  # > 0: report the MFU this duration implies instead
    price: float = 0.0  # $/GPU-hour, 0 = the hardware default
    layout: costs.Layout = field(default_factory=costs.Layout)
    micro_batch: int = 1
    seq_len: int = 0  # 0 = model.max_seq_len
    checkpointing: bool = False
    context: int = 2048
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128, 512)
    serve_gpus: int = 0  # 0 = gpus


def plan_model(name: str, cfg: ModelConfig, inp: PlanInputs) -> dict:
    hw = get_hardware(inp.hardware, inp.hardware_file)
    seq = inp.seq_len or cfg.max_seq_len
    c = count_config(cfg, context=seq)
    price = inp.price or hw.price_per_hour
    flops = costs.training_flops(c, inp.tokens)
    if inp.days > 0:
        days, mfu = inp.days, costs.implied_mfu(flops, hw, inp.gpus, inp.days)
    else:
        mfu, days = inp.mfu, costs.wall_clock_days(flops, hw, inp.gpus, inp.mfu)
    mem = costs.memory_per_gpu(cfg, c, inp.layout, inp.micro_batch, seq, inp.checkpointing)
    mem_ckpt = costs.memory_per_gpu(cfg, c, inp.layout, inp.micro_batch, seq, True)
    n_serve = inp.serve_gpus or inp.gpus
    decode = []
    for b in inp.batch_sizes:
        d = costs.decode_speed(cfg, c, hw, n_serve, b, inp.context)
        decode.append({**asdict(d), "usd_per_1k_tokens": costs.serving_cost_per_1k(d.tokens_per_s, n_serve, hw, price)})
    return {
        "preset": name, "hardware": asdict(hw), "counts": asdict(c),
        "training": {"tokens": inp.tokens, "gpus": inp.gpus, "flops": flops,
                     "flops_6n": costs.training_flops(c, inp.tokens, attention=False), "mfu": mfu, "days": days,
                     "gpu_days": days * inp.gpus, "cost_usd": costs.training_cost(inp.gpus, days, hw, price)},
        "memory_per_gpu": {"layout": asdict(inp.layout), "micro_batch": inp.micro_batch, "seq_len": seq,
                           "bytes": mem, "bytes_with_checkpointing": mem_ckpt, "fits": costs.fits(mem, hw),
                           "fits_with_checkpointing": costs.fits(mem_ckpt, hw)},
        "kv_cache": {"bytes_per_token_mqa_or_gqa": costs.kv_bytes_per_token(cfg),
                     "bytes_per_token_mha": costs.kv_bytes_per_token(cfg, n_kv_heads=cfg.n_heads),
                     "longest_context_batch1": costs.longest_context(cfg, c, hw, n_serve)},
        "decode": {"gpus": n_serve, "context": inp.context, "rows": decode},
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def render_model(r: dict, console: Console) -> None:
    c, t, m, kv, hw = r["counts"], r["training"], r["memory_per_gpu"], r["kv_cache"], r["hardware"]
    tab = Table(title=f"moekit plan: {r['preset']} on {hw['name']}", show_header=False)
    tab.add_column("", style="bold")
    tab.add_column("")
    for k, v in [
        ("total / active / shared parameters",
         f"{_human(c['total_params'])} / {_human(c['active_params'])} / {_human(c['shared_params'])}"),
        ("parameters per expert (all layers)", _human(c["params_per_expert"])),
        ("forward FLOP per token (2N + attention)", f"{_human(c['forward_flops_per_token'])} at {c['context']} context"),
        ("training FLOP per token", _human(c["train_flops_per_token"])),
        (f"training FLOP for {_human(t['tokens'])} tokens", f"{t['flops']:.3g} (6N alone {t['flops_6n']:.3g})"),
        (f"{t['gpus']} GPUs at {t['mfu']:.1%} MFU", f"{t['days']:,.2f} days, {t['gpu_days']:,.0f} GPU-days, "
                                                    f"${t['cost_usd']:,.0f}"),
        (f"memory per GPU, layout dp{m['layout']['dp']} tp{m['layout']['tp']} pp{m['layout']['pp']} ep{m['layout']['ep']}",
         " + ".join(f"{k} {_gb(v)}" for k, v in m["bytes"].items() if k != "total")
         + f" = {_gb(m['bytes']['total'])} ({'fits' if m['fits'] else 'does not fit'} in {_gb(hw['hbm_bytes'])})"),
        ("  with activation checkpointing", f"{_gb(m['bytes_with_checkpointing']['total'])} "
                                            f"({'fits' if m['fits_with_checkpointing'] else 'does not fit'})"),
        ("KV cache per token: this model / MHA",
         f"{kv['bytes_per_token_mqa_or_gqa'] / 1e3:,.1f} KB / {kv['bytes_per_token_mha'] / 1e3:,.1f} KB"),
        (f"longest context beside the weights ({r['decode']['gpus']} GPUs, batch 1)", f"{kv['longest_context_batch1']:,} tokens"),
    ]:
        tab.add_row(k, v)
    console.print(tab)
    d = Table(title=f"decode bound on {r['decode']['gpus']} x {hw['name']}, context {r['decode']['context']}")
    for col in ("batch", "tok/s (all)", "tok/s per sequence", "bound", "FLOP utilisation", "$ per 1k tokens", "fits"):
        d.add_column(col, justify="right")
    for row in r["decode"]["rows"]:
        d.add_row(str(row["batch"]), f"{row['tokens_per_s']:,.0f}", f"{row['per_sequence_tokens_per_s']:,.1f}",
                  row["bound"], f"{row['flop_utilisation']:.1%}", f"{row['usd_per_1k_tokens']:.5f}",
                  "yes" if row["fits"] else "NO: weights + KV exceed memory")
    console.print(d)


def render_gpt4(console: Console) -> list[dict]:
    rows = gpt4_rows()
    tab = Table(title="moekit plan gpt4: the published GPT-4 figures recomputed from the gpt4-16x111b preset")
    for col in ("figure", "moekit", "reported", "ratio", "note"):
        tab.add_column(col, justify="right" if col in ("moekit", "reported", "ratio") else "left", overflow="fold")
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}"
        tab.add_row(r.name, format_value(r.computed, r.unit), format_value(r.reported, r.unit), ratio, r.note)
    console.print(tab)
    return [{**asdict(r), "ratio": r.ratio} for r in rows]


def against(path: str | Path, hardware: Hardware | None = None) -> list[dict]:
    """Predict a committed benchmark result from its config and print predicted vs measured."""
    path = Path(path)
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read benchmark result {path}: {e}") from None
    kind = res.get("bench")
    out = []
    if kind == "train_step":
        cfg = preset(res["preset"])
        c = count_config(cfg, context=res["seq"])
        peak = res["matmul_peak_tflops"] * 1e12
        for r in res["results"]:
            if "tokens_per_s" not in r:
                continue
            # the planner's own FLOP count at the run's measured MFU must give the measured speed
            pred = r["mfu_vs_measured_matmul"] * peak / c.train_flops_per_token
            out.append({"what": f"training tokens/s, {r['impl']}", "predicted": pred, "measured": r["tokens_per_s"]})
    elif kind == "decode":
        cfg = preset(res["preset"])
        ctx = res["prompt_len"] + res["new_tokens"] // 2
        c = count_config(cfg, context=ctx)
        hw = hardware or get_hardware("h100-sxm")
        d = costs.decode_speed(cfg, c, hw, 1, 1, ctx, bandwidth=res["copy_tbps"] * 1e12)
        for impl, v in res["tok_s"].items():
            if isinstance(v, (int, float)):
                out.append({"what": f"batch-1 decode tok/s, {impl}", "predicted": d.tokens_per_s, "measured": v})
    else:
        raise ConfigError(f"{path}: the self-check knows train_step and decode results, not {kind!r}")
    for o in out:
        o["error"] = o["predicted"] / o["measured"] - 1
    return out


def render_against(rows: list[dict], console: Console, source: str) -> None:
    tab = Table(title=f"planner vs measured: {source}")
    for col in ("figure", "predicted", "measured", "error"):
        tab.add_column(col, justify="left" if col == "figure" else "right")
    for r in rows:
        tab.add_row(r["what"], f"{r['predicted']:,.1f}", f"{r['measured']:,.1f}", f"{r['error']:+.1%}")
    console.print(tab)


def roofline_png(cfg: ModelConfig, name: str, inp: PlanInputs, path: str | Path, measured: list[tuple[int, float]]) -> Path:
    """Decode tok/s vs batch size: the bandwidth and compute bounds, measured points overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw = get_hardware(inp.hardware, inp.hardware_file)
    c = count_config(cfg, context=inp.context)
    n = inp.serve_gpus or inp.gpus
    batches = [2**i for i in range(0, 11)]
    est = [costs.decode_speed(cfg, c, hw, n, b, inp.context) for b in batches]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(batches, [e.tokens_per_s for e in est], marker="o", label="bound: max(bytes/bandwidth, FLOP/peak)")
    mem_only = [b * n * hw.hbm_bandwidth / costs.decode_step_bytes(cfg, c, b, inp.context) for b in batches]
    ax.loglog(batches, mem_only, ls="--", color="gray", label="memory-bandwidth term")
    if measured:
        ax.loglog(*zip(*measured), "r*", ms=12, label="measured")
    ax.set_xlabel("decode batch size (sequences)")
    ax.set_ylabel("output tokens/s (all sequences)")
    ax.set_title(f"{name} on {n} x {hw.name}, context {inp.context}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def measured_decode_points(path: str | Path | None) -> list[tuple[int, float]]:
    if not path:
        return []
    res = json.loads(Path(path).read_text())
    if res.get("bench") == "decode" and isinstance(res.get("tok_s", {}).get("moekit"), (int, float)):
        return [(1, res["tok_s"]["moekit"])]
    return []
