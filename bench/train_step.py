"""Full training step (forward, backward, AdamW) of bench-1b: moekit vs HF MixtralForCausalLM of
the same shapes, same run. Tokens/s, MFU (training FLOPs = 3 x (2 x active matmul params +
attention)) against the dense bf16 matmul rate measured in the same run, peak memory.

    python bench/train_step.py                                    # batch 8 x 2048, bf16 autocast
    python bench/train_step.py --impls moekit --compile moekit --ac
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cuda_time_ms, env_info, gpu_tag, hf_mixtral, matmul_tflops, write_result  # noqa: E402
from moekit.config import preset  # noqa: E402
from moekit.model.transformer import build_model, count_model  # noqa: E402

H100_BF16_SPEC = 989e12  # dense bf16 datasheet rate, SXM


def hf_model(cfg, impl: str):
    return hf_mixtral(cfg, impl, output_router_logits=True, router_aux_loss_coef=cfg.balance_loss_coef)


def run(impl: str, cfg, batch: int, seq: int, steps: int, compile_: bool, flops_per_token: float, peak: float):
    torch.manual_seed(0)
    if impl.startswith("moekit"):
        model = build_model(cfg, "cuda")
        model.activation_checkpointing = impl == "moekit-ac"
        fwd = torch.compile(model) if compile_ else model

        def loss_fn(x, y):
            return fwd(x, y).loss
    else:
        model = hf_model(cfg, impl.removeprefix("hf-"))
        fwd = torch.compile(model) if compile_ else model

        def loss_fn(x, y):
            return fwd(input_ids=x, labels=x).loss  # HF shifts labels internally
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda") for _ in range(4)]
    it = iter(range(10**9))
    losses = []

    def step():
        seqs = data[next(it) % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(seqs[:, :-1], seqs[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(step, warmup=3 if not compile_ else 5, iters=steps)
    tokens_s = batch * seq / (ms * 1e-3)
    out = {"impl": impl + ("-compiled" if compile_ else ""), "step_ms": ms, "tokens_per_s": tokens_s,
           "tflops": flops_per_token * tokens_s / 1e12,
           "mfu_vs_measured_matmul": flops_per_token * tokens_s / (peak * 1e12),
           "mfu_vs_989_spec": flops_per_token * tokens_s / H100_BF16_SPEC,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "loss_first": losses[0].item(), "loss_last": losses[-1].item()}
    del model, fwd, opt, data, losses
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--impls", default="moekit,hf-grouped_mm,hf-eager")
    ap.add_argument("--compile", default="moekit", help="impls to also run under torch.compile ('' = none)")
    ap.add_argument("--ac", action="store_true", help="moekit with activation checkpointing as well")
    ap.add_argument("--suffix", default="", help="appended to the result file name")
    args = ap.parse_args()

    cfg = preset(args.preset)
    counts = count_model(build_model(cfg, "meta"), context=args.seq)
    flops_per_token = counts.train_flops_per_token
    peak = matmul_tflops()
    results = []
    impls = args.impls.split(",") + (["moekit-ac"] if args.ac else [])
    for impl in impls:
        for c in ([False, True] if impl in args.compile.split(",") else [False]):
            try:
                results.append(run(impl, cfg, args.batch, args.seq, args.steps, c, flops_per_token, peak))
            except Exception as e:  # an OOM or missing feature in one impl keeps the others
                results.append({"impl": impl + ("-compiled" if c else ""), "error": f"{type(e).__name__}: {e}"[:300]})
                gc.collect()
                torch.cuda.empty_cache()
            print(results[-1], flush=True)
    payload = {"bench": "train_step", **env_info(), "preset": args.preset, "batch": args.batch, "seq": args.seq,
               "total_params": counts.total_params, "active_params": counts.active_params,
               "train_flops_per_token": flops_per_token, "matmul_peak_tflops": peak, "results": results}
    path = write_result(f"train_step_{gpu_tag()}{args.suffix}", payload)
    print(f"\n{args.preset}: {counts.total_params / 1e9:.2f}B total, {counts.active_params / 1e9:.3f}B active, "
          f"{flops_per_token / 1e9:.2f} GFLOP/token (train); measured bf16 matmul peak {peak:.0f} TFLOP/s")
    print(f"{'impl':24s} {'ms/step':>8s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:24s} {r['error']}")
        else:
            print(f"{r['impl']:24s} {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} {r['tflops']:8.0f} "
                  f"{r['mfu_vs_measured_matmul']:6.1%} {r['peak_mem_gib']:8.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
