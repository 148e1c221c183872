"""Batch-1 greedy decode: moekit's engine (paged KV, CUDA graphs, grouped-GEMM experts) vs HF
generate on the same model shape, against the memory-bandwidth roofline measured in the same run.

    python bench/decode.py                      # bench-decode preset: 4.7B total / 1.34B active, bf16
    python bench/decode.py --new-tokens 256 --prompt-len 128

Roofline: every decode step reads the active weights (attention, router, the k chosen experts
per layer, norms, lm_head, one embedding row) and the KV cache of the context once, so
tok/s <= copy bandwidth / (active bytes + KV bytes at the mean context).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_tbps, cuda_time_ms, decode_graph_ms, env_info, gpu_tag, hf_mixtral, rel_err, write_result  # noqa: E402
from moekit.config import preset  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.kv_cache import kv_bytes_per_token  # noqa: E402
from moekit.infer.paged_attention import paged_decode_reference  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.model.transformer import build_model, count_model  # noqa: E402


def check_paged_kernel() -> dict:
    """Triton paged decode vs a float64 reference on fresh random data (bf16 cache)."""
    from moekit.infer.triton_paged import paged_decode_triton

    torch.manual_seed(1)
    out = {}
    for B, H, Hkv, hd, page, ctx_max in ((1, 16, 4, 128, 16, 1000), (7, 16, 1, 64, 16, 300), (32, 8, 8, 128, 16, 77)):
        nb = B * (ctx_max // page + 2) + 1
        kc = torch.randn(nb, page, Hkv, hd, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        lens = torch.randint(1, ctx_max + 1, (B,), device="cuda", dtype=torch.int32)
        maxb = (ctx_max + page - 1) // page
        tables = torch.randperm(nb - 1, device="cuda")[: B * maxb].view(B, maxb).int() + 1
        q = torch.randn(B, H, hd, device="cuda", dtype=torch.bfloat16)
        y = paged_decode_triton(q, kc, vc, tables, lens)
        ref = paged_decode_reference(q.double(), kc.double(), vc.double(), tables.long(), lens)
        out[f"B{B}_H{H}_Hkv{Hkv}_hd{hd}"] = rel_err(y, ref)
    return out


def hf_decode(cfg, prompt: torch.Tensor, new_tokens: int, impl: str) -> float:
    model = hf_mixtral(cfg, impl, torch.bfloat16).eval()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(prompt, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    del model
    torch.cuda.empty_cache()
    return new_tokens / dt


def check_fused_step(cfg) -> dict:
    """The fused decode step (bf16) and the model path (bf16) against the model path in float64,
    on a 2-layer model of the bench shape with random weights: relative error of the logits."""
    import dataclasses
    from types import SimpleNamespace

    from moekit.infer.fused_decode import FusedDecoder
    from moekit.infer.kv_cache import PagedKVCache
    from moekit.infer.runner import ModelRunner

    small = dataclasses.replace(cfg, n_layers=2)
    torch.manual_seed(3)
    base = build_model(small, "cuda").eval()
    out = {}
    lens = [37, 300, 5, 129]
    toks = torch.randint(0, small.vocab_size, (len(lens),), device="cuda")
    prompts = [torch.randint(0, small.vocab_size, (L,)).tolist() for L in lens]
    logits = {}
    for name, dtype in (("fp64", torch.float64), ("bf16", torch.bfloat16), ("fused", torch.bfloat16)):
        model = build_model(small, "cuda").eval()
        model.load_state_dict(base.state_dict())
        model = model.to(dtype)
        kv = PagedKVCache(small, 1 + 20 * len(lens), 16, "cuda", dtype)
        runner = ModelRunner(model, kv, 1024, 8, cuda_graphs=False, fused=False)
        reqs = [SimpleNamespace(blocks=list(range(1 + 20 * i, 21 + 20 * i))) for i in range(len(lens))]
        for r, p in zip(reqs, prompts):
            runner.forward_chunks([(r, 0, p)])
        if name == "fused":
            fused = FusedDecoder(model, kv.k, kv.v)
            tables = torch.tensor([r.blocks + [0] * (runner.max_blocks - len(r.blocks)) for r in reqs],
                                  device="cuda", dtype=torch.int32)
            slots = torch.tensor([r.blocks[L // 16] * 16 + L % 16 for r, L in zip(reqs, lens)], device="cuda")
            logits[name] = fused(toks, torch.tensor(lens, device="cuda"), slots, tables,
                                 torch.tensor(lens, device="cuda", dtype=torch.int32) + 1)
        else:
            logits[name] = runner.forward_chunks([(r, L, [int(t)]) for r, L, t in zip(reqs, lens, toks)])
    out["fused_bf16_vs_fp64"] = rel_err(logits["fused"], logits["fp64"])
    out["model_bf16_vs_fp64"] = rel_err(logits["bf16"], logits["fp64"])
    out["argmax_agree_fused_vs_fp64"] = float((logits["fused"].argmax(-1) == logits["fp64"].argmax(-1)).float().mean())
    return out


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds per call of fn, replayed back to back from one CUDA graph (no launch gaps from
    the host, as in the decode step's graph)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return cuda_time_ms(g.replay, warmup=3, iters=20) * 1e3 / reps


def kernel_table(model, bw_tbps: float) -> dict:
    """The fused step's weight-reading kernels one at a time at batch 1 (layer 0's weights, two
    experts chosen): microseconds and share of copy bandwidth."""
    from moekit.infer.fused_decode import FusedDecoder, expert_down, expert_up, norm_linear

    c, blk = model.cfg, model.blocks[0]
    wqkv = FusedDecoder(model, torch.empty(1, 1, 1, 1, 1), torch.empty(1, 1, 1, 1, 1)).wqkv[0]
    x = torch.randn(1, c.d_model, device="cuda")
    y = torch.randn(1, c.n_heads * c.hd, device="cuda", dtype=torch.bfloat16)
    xn = x.bfloat16()
    ids = torch.tensor([[1, 5 % c.n_experts]], device="cuda", dtype=torch.int32)
    gates = torch.full((1, 2), 0.5, device="cuda")
    ex = blk.ffn.experts
    h = expert_up(xn, ids, ex.w1, ex.w3)
    logits = torch.empty(1, c.vocab_size, device="cuda")
    hd, dev = c.hd, "cuda"
    rope = (torch.tensor([7], device=dev), model.rope_cos, model.rope_sin, torch.tensor([5], device=dev),
            torch.empty(1, c.n_heads, hd, device=dev, dtype=torch.bfloat16),
            *(torch.empty(16, c.n_kv_heads, hd, device=dev, dtype=torch.bfloat16) for _ in range(2)),
            c.n_heads, c.n_kv_heads)
    rows = {"qkv (norm + linear)": (lambda: norm_linear(x, wqkv, blk.attn_norm.weight), wqkv.numel()),
            "qkv + rotary + K/V store": (lambda: norm_linear(x, wqkv, blk.attn_norm.weight, rope=rope), wqkv.numel()),
            "wo (linear, accumulate)": (lambda: norm_linear(y, blk.attn.wo.weight, out=x, accumulate=True),
                                        blk.attn.wo.weight.numel()),
            "lm_head (norm + linear)": (lambda: norm_linear(x, model.lm_head.weight, model.norm.weight, out=logits),
                                        model.lm_head.weight.numel()),
            "experts gate/up + silu": (lambda: expert_up(xn, ids, ex.w1, ex.w3), 2 * 2 * ex.w1[0].numel()),
            "experts down + combine": (lambda: expert_down(h, ids, gates, ex.w2, x), 2 * ex.w2[0].numel())}
    out = {}
    for name, (fn, params) in rows.items():
        us = graph_us(fn)
        out[name] = {"us": us, "weight_mb": 2 * params / 1e6, "fraction_of_copy_bw": 2 * params / (us * 1e-6) / (bw_tbps * 1e12)}
        print(f"  {name:26s} {us:7.2f} us  {2 * params / 1e6:7.1f} MB  {out[name]['fraction_of_copy_bw']:6.1%} of copy bandwidth")
    return out


def tuned_configs() -> dict:
    """The tile each autotuned decode kernel chose, by kernel and weight shape."""
    from moekit.infer import fused_decode as fd

    out = {}
    for name in ("_norm_linear_store", "_norm_linear_accum", "_expert_up_tuned", "_expert_down_tuned"):
        for key, cfg in getattr(fd, name).cache.items():
            out[f"{name.strip('_')}{tuple(key[:2])}"] = str(cfg)
    return out


TUNING: dict = {}  # what graph tuning chose (--tune-graph), by engine variant


def engine_decode(model, prompt: list[int], new_tokens: int, max_num_seqs: int, fused: bool, compile: bool = False,
                  pdl: bool = True, prefetch: bool = False, rope: bool = True, route_in_wo: bool = False,
                  prefetch_self: bool = False, tune: bool = False, attn_in_wo: bool = False, decode_steps: int = 4):
    """Greedy batch-1 decode through the engine: (tok/s, tokens, {batch: GPU ms per replayed decode
    graph}, start-up seconds). pdl=False launches the kernels without programmatic dependent launch;
    prefetch=True has each layer's expert down projection ask L2 for the next layer's attention
    weights while the experts stream theirs evict-first (fused_decode.PREFETCH_NEXT; the same tuned
    tiles, so the same tokens); rope=False runs the rotary embedding and K/V store as a kernel of
    their own (its projection is tuned apart, so greedy tokens may differ where a tie falls
    differently);
    route_in_wo=True routes each layer's rows at the end of its output projection;
    prefetch_self=True has each kernel ask L2 for its first weights (attention: its pages) before
    it waits for the kernel before it; attn_in_wo=True computes attention inside the output
    projection (triton_attn_wo); decode_steps: greedy steps chained per CUDA graph
    (EngineConfig.decode_steps; the variant fused-one-step: 1). Variants run after moekit-fused keep
    the tiles it chose (the tuners' caches are the process's), so their tokens compare bit for bit."""
    from moekit.infer import fused_decode, triton_attn_wo, triton_paged, triton_route, triton_sync

    flags = [(triton_sync, "ENABLED", pdl), (fused_decode, "PREFETCH_NEXT", prefetch), (fused_decode, "FUSED_ROPE", rope),
             (triton_route, "ROUTE_IN_WO", route_in_wo), (fused_decode, "PREFETCH_SELF", prefetch_self),
             (triton_paged, "PREFETCH", prefetch_self), (triton_attn_wo, "ATTN_IN_WO", attn_in_wo)]
    was = [getattr(m, name) for m, name, _ in flags]
    for m, name, v in flags:
        setattr(m, name, v)
    try:
        return _engine_decode(model, prompt, new_tokens, max_num_seqs, fused, compile, tune, decode_steps)
    finally:
        for (m, name, _), v in zip(flags, was):
            setattr(m, name, v)


def _engine_decode(model, prompt, new_tokens, max_num_seqs, fused, compile, tune=False, decode_steps=4):
    engine = Engine(model, None, EngineConfig(kv_budget="4GiB", max_num_seqs=max_num_seqs, cuda_graphs=True,
                                              compile=compile, fused_decode=fused, decode_steps=decode_steps))
    t = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))  # warm-up, autotune, graph capture
    startup_s = time.perf_counter() - t
    if tune:  # the tiles refined in the batch-1 graph (moekit.infer.graph_tune), graphs captured again
        t = time.perf_counter()
        tuned = engine.tune_decode(prompt_len=len(prompt), force=True) or {}
        TUNING["_last"] = {**tuned, "seconds": time.perf_counter() - t}
        engine.warmup()  # captured again before the timed run
    rid = engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    engine.step()  # prefill + first token
    torch.cuda.synchronize()
    t = time.perf_counter()
    toks = []
    while engine.has_unfinished():
        for o in engine.step():
            toks += o.new_token_ids if o.request_id == rid else []
    torch.cuda.synchronize()
    tps = len(toks) / (time.perf_counter() - t)
    step_ms = {}
    for b in (1, 2, 4, 8):  # the decode step alone, no host work, b real rows
        step_ms[b] = decode_graph_ms(engine.runner, b)
    # batch 1 at the context the roofline's KV bytes are counted at (the run's mean)
    step_ms["1@mean_context"] = decode_graph_ms(engine.runner, 1, context=len(prompt) + new_tokens // 2)
    del engine
    torch.cuda.empty_cache()
    return tps, toks, step_ms, startup_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-decode")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-impls", default="grouped_mm,eager")
    ap.add_argument("--compile", action="store_true", help="also run the model path compiled inside the CUDA graphs")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="print the kernel table of the fused decode step")
    ap.add_argument("--tune-graph", action="store_true",
                    help="refine the decode kernels' tiles inside the batch-1 decode graph first (moekit.infer.graph_tune)")
    ap.add_argument("--variants", default="fused-prefetch,fused-route-in-wo,fused-prefetch-route-in-wo,fused-no-pdl,unfused",
                    help="engine variants timed beside moekit-fused (comma-separated; empty: none)")
    args = ap.parse_args()
    variants = {v for v in args.variants.split(",") if v} | ({"unfused-compiled"} if args.compile else set())
    if variants - {"fused-prefetch", "fused-route-in-wo", "fused-prefetch-route-in-wo", "fused-no-pdl",
                   "fused-separate-rope", "fused-prefetch-self", "fused-prefetch-self-route-in-wo", "fused-attn-in-wo",
                   "fused-one-step",
                   "unfused",
                   "unfused-compiled"}:
        ap.error(f"unknown --variants: {args.variants}")

    numerics = check_paged_kernel()
    cfg = preset(args.preset)
    fused_numerics = check_fused_step(cfg)
    bw = copy_tbps()
    torch.manual_seed(0)
    model = build_model(cfg, "cuda").to(torch.bfloat16).eval()
    counts = count_model(model, context=args.prompt_len + args.new_tokens)
    mean_ctx = args.prompt_len + args.new_tokens / 2
    # active bytes per token: matmul weights of the k chosen experts + shared, one embedding row, norms
    weight_bytes = 2 * (counts.matmul_params_active + cfg.d_model)
    kv_bytes = kv_bytes_per_token(cfg, torch.bfloat16) * mean_ctx
    roofline = bw * 1e12 / (weight_bytes + kv_bytes)

    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    runs = {"moekit-fused": dict(fused=True, tune=args.tune_graph), "moekit-fused-prefetch": dict(fused=True, prefetch=True),
            "moekit-fused-route-in-wo": dict(fused=True, route_in_wo=True),
            "moekit-fused-prefetch-route-in-wo": dict(fused=True, prefetch=True, route_in_wo=True),
            "moekit-fused-prefetch-self": dict(fused=True, prefetch_self=True),
            "moekit-fused-prefetch-self-route-in-wo": dict(fused=True, prefetch_self=True, route_in_wo=True),
            "moekit-fused-attn-in-wo": dict(fused=True, attn_in_wo=True),
            "moekit-fused-one-step": dict(fused=True, decode_steps=1),
            "moekit-fused-no-pdl": dict(fused=True, pdl=False), "moekit-fused-separate-rope": dict(fused=True, rope=False),
            "moekit-unfused": dict(fused=False)}
    if args.compile:
        runs["moekit-unfused-compiled"] = dict(fused=False, compile=True)
    runs = {k: v for k, v in runs.items() if k == "moekit-fused" or k[len("moekit-"):] in variants}
    results, step_ms, startup, tokens, kernels = {}, {}, {}, {}, None
    for name, kw in runs.items():
        results[name], tokens[name], step_ms[name], startup[name] = engine_decode(
            model, prompt[0].tolist(), args.new_tokens, args.max_num_seqs, **kw)
        if "_last" in TUNING:
            TUNING[name] = TUNING.pop("_last")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        engine = Engine(model, None, EngineConfig(kv_budget="4GiB", max_num_seqs=args.max_num_seqs))
        engine.generate([prompt[0].tolist()], SamplingParams(max_tokens=4, temperature=0))
        buf = engine.runner._graph_inputs(1)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):  # the fused step outside the graph: one row per kernel
                engine.runner._run_static(buf)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=50))
        del engine
        print("kernels at batch 1, one at a time (20 back to back in a graph):")
        try:
            kernels = kernel_table(model, bw)
            kernels["tuned"] = tuned_configs()
            for k, v in kernels["tuned"].items():
                print(f"  {k}: {v}")
        except Exception as e:  # a diagnostic: never lose the run's results to it
            kernels = f"{type(e).__name__}: {e}"[:300]
            print(kernels)
    fused, unfused = tokens["moekit-fused"], tokens.get("moekit-unfused", [])
    same = sum(1 for _ in zip(fused, unfused))
    agree = next((i for i, (a, b) in enumerate(zip(fused, unfused)) if a != b), same)
    pdl_same = fused == tokens["moekit-fused-no-pdl"] if "moekit-fused-no-pdl" in tokens else None
    rope_same = fused == tokens["moekit-fused-separate-rope"] if "moekit-fused-separate-rope" in tokens else None
    prefetch_same = fused == tokens["moekit-fused-prefetch"] if "moekit-fused-prefetch" in tokens else None
    for impl in [s for s in args.hf_impls.split(",") if s]:
        try:
            results[f"hf-{impl}"] = hf_decode(cfg, prompt.cuda(), args.new_tokens, impl)
        except Exception as e:
            results[f"hf-{impl}"] = f"{type(e).__name__}: {e}"[:200]
    payload = {"bench": "decode", **env_info(), "preset": args.preset, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "startup_s": startup, "copy_tbps": bw,
               "active_weight_bytes": weight_bytes, "kv_bytes_per_token_read_mean": kv_bytes, "roofline_tok_s": roofline,
               "total_params": counts.total_params, "active_params": counts.active_params,
               "paged_kernel_rel_err_vs_fp64": numerics, "fused_step_numerics": fused_numerics,
               "greedy_tokens_identical_prefix_fused_vs_unfused": agree,
               "greedy_tokens_identical_pdl_vs_no_pdl": pdl_same,
               "greedy_tokens_identical_rope_in_qkv_vs_separate": rope_same,
               "greedy_tokens_identical_prefetch_vs_not": prefetch_same,
               "greedy_tokens_identical_to_fused": {k: v == fused for k, v in tokens.items() if k != "moekit-fused"},
               "decode_graph_ms_by_batch": step_ms, "kernels_batch1": kernels, "graph_tuning": TUNING or None,
               "decode_graph_fraction_of_roofline": {k: 1e3 / v[1] / roofline for k, v in step_ms.items()
                                                     if v.get(1) is not None},
               "mean_context": mean_ctx,
               "decode_graph_fraction_of_roofline_at_mean_context": {
                   k: 1e3 / v["1@mean_context"] / roofline for k, v in step_ms.items() if v.get("1@mean_context")},
               "tok_s": results,
               "fraction_of_roofline": {k: v / roofline for k, v in results.items() if isinstance(v, float)}}
    path = write_result(f"decode_{gpu_tag()}", payload)
    print(f"paged decode kernel vs float64: {numerics}")
    print(f"fused step vs float64: {fused_numerics}")
    print(f"{args.preset}: {counts.total_params / 1e9:.2f}B total, {counts.active_params / 1e9:.2f}B active; "
          f"copy {bw:.2f} TB/s; roofline {roofline:.0f} tok/s (weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e6:.1f} MB)")
    for k, v in step_ms.items():
        by_batch = "by batch " + ", ".join(f"{b}: {ms:.3f} ms" for b, ms in v.items() if ms is not None)
        if v.get(1) is None:
            print(f"  {k:24s} no decode graph; {by_batch}")
            continue
        print(f"  {k:24s} graph replay {v[1]:.3f} ms = {1e3 / v[1]:7.1f} tok/s  {1e3 / v[1] / roofline:6.1%} of roofline; "
              + by_batch)
        if v.get("1@mean_context"):
            ms = v["1@mean_context"]
            print(f"  {'':24s} at the roofline's context ({mean_ctx:.0f} tokens): {ms:.3f} ms = {1e3 / ms:7.1f} tok/s  "
                  f"{1e3 / ms / roofline:6.1%} of roofline")
    for k, v in results.items():
        print(f"  {k:24s} " + (f"{v:8.1f} tok/s  {v / roofline:6.1%} of roofline" if isinstance(v, float) else v))
    print(f"greedy tokens identical (fused vs unfused): first {agree} of {same}; "
          f"fused with PDL vs without: {pdl_same}; rope in the QKV projection vs its own kernel: {rope_same}; "
          f"with next-layer prefetch vs without: {prefetch_same}")
    print("greedy tokens identical to moekit-fused:", {k: v == fused for k, v in tokens.items() if k != "moekit-fused"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
