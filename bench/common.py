"""Shared helpers for the GPU benchmarks: CUDA-event timing, the two ceilings (dense bf16 matmul
rate, device copy bandwidth), environment facts, JSON results."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() over iters runs, timed with CUDA events after warm-up."""
    from moekit.infer.graph_tune import replay_ms

    return replay_ms(fn, warmup, iters)


def matmul_tflops(n: int = 8192) -> float:
    """Measured dense bf16 matmul rate on random data (the compute ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_tbps(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written (the memory ceiling)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def env_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict) -> Path:
    """Write to $OUT (device runs) or bench/results/."""
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


def gpu_tag() -> str:
    """Short lowercase name of the GPU for result file names, e.g. 'h100'."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for tag in ("H200", "H100", "A100", "L40S", "A10G"):
        if tag in name:
            return tag.lower()
    return "".join(c for c in name.lower() if c.isalnum())[:16]


def hf_mixtral(cfg, impl: str, dtype=None, **extra):
    """HF transformers' MixtralForCausalLM with the shapes of a moekit ModelConfig, on the GPU;
    impl picks its experts implementation ("grouped_mm", "eager")."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hcfg = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, num_local_experts=cfg.n_experts,
                         num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.max_seq_len,
                         tie_word_embeddings=False, attn_implementation="sdpa", **extra)
    hcfg._experts_implementation = impl
    model = MixtralForCausalLM(hcfg).cuda()
    return model.to(dtype) if dtype is not None else model


def row_at_context(real: torch.Tensor, context: int, block_size: int, n_meta: int = 4) -> torch.Tensor:
    """A staged decode row [token, position, slot, context length, block table...] moved back to
    the step that sees `context` tokens: position context - 1, the cache slot its block table gives
    that position, that context length. The K/V of the positions before it are the request's own."""
    if not 1 <= context <= int(real[3]):
        raise ValueError(f"context {context} is not within the row's 1 ... {int(real[3])} tokens")
    p = context - 1
    row = real.clone()
    row[1], row[2], row[3] = p, int(real[n_meta + p // block_size]) * block_size + p % block_size, context
    return row


@torch.inference_mode()
def decode_graph_ms(runner, rows: int, context: int | None = None) -> float | None:
    """Median GPU milliseconds of one replay of the decode graph a step of `rows` requests uses
    (CUDA events around each replay), with `rows` real rows: copies of the last real row any of the
    runner's graphs ran (one request's context, so attention reads the same K/V for every row),
    each with a token of its own, so that rows route to experts as requests do (a padding row, K/V
    slot 0, chooses no expert and reads no expert weights). context: the row moved back to the
    step that sees that many tokens (row_at_context; the roofline's mean context, say). None off
    the GPU, if no graph ran a request, or if no graph serves that many rows."""
    sizes = [b for b in runner.graph_sizes if b >= rows and runner.graph_fits(b)]
    if not torch.cuda.is_available() or not sizes:
        return None
    real = next((buf["stage"][0] for _, buf in runner.graphs.values() if int(buf["stage"][0, 2]) != 0), None)
    if real is None:
        return None
    if context is not None:
        real = row_at_context(real, context, runner.block_size, runner._META)
    b = sizes[0]
    if b not in runner.graphs:
        runner.capture_graph(b)
    graph, buf = runner.graphs[b]
    stage = buf["stage"]
    stage[:rows] = real
    g = torch.Generator().manual_seed(0)
    stage[:rows, 0] = torch.randint(1, buf["logits"].shape[-1], (rows,), generator=g).to(stage)
    stage[rows:, :5] = torch.tensor([0, 0, 0, 1, 0], dtype=stage.dtype)  # padding rows
    return cuda_time_ms(graph.replay, warmup=5, iters=50)
