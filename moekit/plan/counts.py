"""`moekit plan PRESET`: parameter and FLOP counts of a config, built on the meta device."""

from __future__ import annotations

import json
from dataclasses import asdict

from moekit.config import ModelConfig
from moekit.model.transformer import ModelCounts, count_config


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def plan_report(name: str, cfg: ModelConfig) -> dict:
    counts: ModelCounts = count_config(cfg)
    return {"preset": name, "model": asdict(cfg), "counts": asdict(counts)}


def format_report(report: dict) -> str:
    c, m = report["counts"], report["model"]
    rows = [
        ("layers (MoE layers)", f"{c['n_layers']} ({c['n_moe_layers']})"),
        ("experts, routed per token", f"{c['n_experts']}, top-{c['top_k']}"),
        ("attention heads / KV heads", f"{m['n_heads']} / {m['n_kv_heads']}"),
        ("d_model, expert ffn", f"{m['d_model']}, {m['ffn_dim']}"),
        ("total parameters", _human(c["total_params"])),
        ("active parameters per token", _human(c["active_params"])),
        ("shared (non-expert) parameters", _human(c["shared_params"])),
        ("parameters per expert (all layers)", _human(c["params_per_expert"])),
        ("forward FLOPs/token, 2 x matmul params", _human(2 * c["matmul_params_active"])),
        (f"forward FLOPs/token incl. attention @ {c['context']}", _human(c["forward_flops_per_token"])),
        ("training FLOPs/token (3 x forward)", _human(c["train_flops_per_token"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"moekit plan: {report['preset']}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def plan_main(name: str, cfg: ModelConfig, as_json: bool) -> str:
    report = plan_report(name, cfg)
    return json.dumps(report, indent=2) if as_json else format_report(report)
