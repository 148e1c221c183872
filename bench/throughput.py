"""Offline serving throughput: moekit's engine (continuous batching, chunked prefill, paged KV,
CUDA graphs) vs HF generate with static padded batches of 32, on the same requests.

    python bench/throughput.py                      # 256 requests, prompts 32-1024, outputs 32-512
    python bench/throughput.py --hf-requests 64     # HF on the first 64 (its static batches are slow)

Latency metrics as vLLM's benchmark_serving defines them: TTFT (arrival to first token), TPOT
(per request: (end - first token) / (output tokens - 1)), ITL (gaps between consecutive tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import env_info, gpu_tag, hf_mixtral, write_result  # noqa: E402
from moekit.config import preset  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.model.transformer import build_model  # noqa: E402


def make_requests(n: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    plens = rng.integers(32, 1025, n)
    olens = rng.integers(32, 513, n)
    return [(rng.integers(0, vocab, p).tolist(), int(o)) for p, o in zip(plens, olens)]


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_moekit(model, requests, args) -> dict:
    engine = Engine(model, None, EngineConfig(kv_budget=args.kv_budget, max_num_seqs=args.max_num_seqs,
                                              max_num_batched_tokens=args.max_batched_tokens))
    engine.generate([requests[0][0]], SamplingParams(max_tokens=8, temperature=0))  # warm-up, graphs
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=o, temperature=0, ignore_eos=True)) for p, o in requests]
    times: dict[str, list[float]] = {i: [] for i in ids}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            times[out.request_id].append(now)
    total = time.perf_counter() - t0
    n_out = sum(len(v) for v in times.values())
    ttft = [v[0] - t0 for v in times.values()]
    tpot = [(v[-1] - v[0]) / (len(v) - 1) for v in times.values() if len(v) > 1]
    itl = [b - a for v in times.values() for a, b in zip(v, v[1:])]
    return {"requests": len(requests), "output_tokens": n_out, "seconds": total, "output_tok_s": n_out / total,
            "ttft_ms_p50": 1e3 * pct(ttft, 50), "ttft_ms_p99": 1e3 * pct(ttft, 99),
            "tpot_ms_p50": 1e3 * pct(tpot, 50), "tpot_ms_p99": 1e3 * pct(tpot, 99),
            "itl_ms_p50": 1e3 * pct(itl, 50), "itl_ms_p99": 1e3 * pct(itl, 99),
            "preemptions": engine.stats()["preemptions"]}


def run_hf_static(cfg, requests, batch: int, impl: str) -> dict:
    model = hf_mixtral(cfg, impl, torch.bfloat16).eval()
    n_out = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch):
            chunk = requests[i:i + batch]
            L = max(len(p) for p, _ in chunk)
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            mask = torch.zeros(len(chunk), L, dtype=torch.long)
            for j, (p, _) in enumerate(chunk):  # left padding
                ids[j, L - len(p):] = torch.tensor(p)
                mask[j, L - len(p):] = 1
            new = max(o for _, o in chunk)
            model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
            n_out += sum(o for _, o in chunk)  # only the tokens each request asked for count
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return {"requests": len(requests), "output_tokens": n_out, "seconds": total, "output_tok_s": n_out / total,
            "batch": batch, "experts_impl": impl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-decode")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=64)
    ap.add_argument("--hf-impl", default="grouped_mm")
    ap.add_argument("--kv-budget", default="24GiB")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    args = ap.parse_args()
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda").to(torch.bfloat16).eval()
    requests = make_requests(args.requests, cfg.vocab_size)
    res = {"moekit_all": run_moekit(model, requests, args)}
    print("moekit, all requests:", res["moekit_all"], flush=True)
    if args.hf_requests:
        sub = requests[: args.hf_requests]
        res["moekit_subset"] = run_moekit(model, sub, args)
        print("moekit, HF subset:", res["moekit_subset"], flush=True)
        del model
        torch.cuda.empty_cache()
        try:
            res["hf_static32_subset"] = run_hf_static(cfg, sub, 32, args.hf_impl)
        except Exception as e:
            res["hf_static32_subset"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print("HF static batch 32, subset:", res["hf_static32_subset"], flush=True)
        hf = res["hf_static32_subset"].get("output_tok_s")
        if hf:
            res["speedup_vs_hf_static_same_requests"] = res["moekit_subset"]["output_tok_s"] / hf
    payload = {"bench": "throughput", **env_info(), "preset": args.preset, **res}
    path = write_result(f"throughput_{gpu_tag()}", payload)
    print(f"speedup vs HF static batching (same requests): {res.get('speedup_vs_hf_static_same_requests')}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
