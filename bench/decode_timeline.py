"""Where a batch-1 decode step's time goes: the fused step's CUDA graph replayed under the
profiler, and each kernel charged with its marginal time (its end minus the previous kernel's
end, in stream order), grouped by kernel and summed per step. With programmatic dependent launch
a kernel starts before the previous one ends, so its own duration counts its wait; the marginal
time is what it adds to the step.

    python bench/decode_timeline.py                        # bench-decode preset, as bench/decode.py
    MOEKIT_ROUTE_IN_WO=1 python bench/decode_timeline.py --tag route-in-wo

--engine-tokens N also profiles the engine decoding N tokens (one step ahead, as bench/decode.py
times it) and splits each step into the graph's span and what the GPU does between two graphs:
each copy and kernel outside the graph, and idle time, with how long after its launch call each
graph started (a GPU that waits for the host starts a graph right after the launch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_tbps, cuda_time_ms, decode_graph_ms, env_info, gpu_tag, write_result  # noqa: E402
from moekit.config import preset  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.model.transformer import build_model, count_model  # noqa: E402


def kernel_events(trace: dict) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the trace's GPU kernels, in start order."""
    ev = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in trace["traceEvents"]
          if e.get("cat") == "kernel" and "dur" in e]
    return sorted(ev, key=lambda e: e[1])


def label(step: list[tuple[str, float, float]], i: int) -> str:
    """A kernel's short name; the projections by their place: before attention the QKV projection,
    after it the output projection, the last of the step the LM head."""
    short = step[i][0].split("(")[0].split("<")[0].strip()[:60]
    if short != "_norm_linear":
        return short
    after = step[i + 1][0] if i + 1 < len(step) else ""
    before = step[i - 1][0] if i else ""
    if "_paged_decode" in after:
        return "_norm_linear qkv"
    if "_paged_decode" in before:
        return "_norm_linear wo"
    return "_norm_linear lm_head" if not any("_norm_linear" in e[0] for e in step[i + 1:]) else short


def tuned_timings() -> dict:
    """Per autotuned decode kernel and weight shape: each config's time (ms, Triton's benchmark)."""
    from moekit.infer import fused_decode as fd

    out = {}
    for name in ("_norm_linear_store", "_norm_linear_accum", "_norm_linear_rope", "_expert_up_tuned", "_expert_down_tuned"):
        tuner = getattr(fd, name)
        timings = getattr(tuner, "configs_timings", None) or {}
        best = {str(k): str(v) for k, v in tuner.cache.items()}
        out[name] = {"chosen": best, "timings_ms": {str(c): (t[0] if isinstance(t, (list, tuple)) else t)
                                                     for c, t in sorted(timings.items(), key=lambda ct: str(ct[1]))}}
    return out


def marginal_by_kernel(events: list[tuple[str, float, float]], per_step: int) -> dict:
    """Per kernel name: calls per step, marginal us per step (end minus the previous end, the
    first of each step its own duration) and own duration us per step, over whole steps."""
    steps = len(events) // per_step
    out: dict[str, dict] = defaultdict(lambda: {"calls": 0, "marginal_us": 0.0, "duration_us": 0.0})
    for s in range(steps):
        step = events[s * per_step:(s + 1) * per_step]
        for i, (name, start, end) in enumerate(step):
            short = label(step, i)
            prev_end = step[i - 1][2] if i else start
            out[short]["calls"] += 1
            out[short]["marginal_us"] += max(end - prev_end, 0.0)
            out[short]["duration_us"] += end - start
    return {k: {"calls": v["calls"] / steps, "marginal_us": v["marginal_us"] / steps,
                "duration_us": v["duration_us"] / steps} for k, v in out.items()}


def engine_gaps(trace: dict) -> dict:
    """Between consecutive decode graphs of a profiled engine run: the graph's span, the GPU work
    outside graphs (kernels, copies, by name) and the idle rest, and the delay from each
    cudaGraphLaunch call to its first kernel; means per step, in us."""
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in trace["traceEvents"]
                if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"}
    graphs: dict[int, list[float]] = {}
    other = []
    for e in trace["traceEvents"]:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in e:
            continue
        start, end, corr = float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("args", {}).get("correlation")
        if corr in launches:
            span = graphs.setdefault(corr, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        else:
            other.append((e["name"].split("(")[0].split("<")[0].strip()[:50], start, end))
    spans = sorted((s, t, launches[c]) for c, (s, t) in graphs.items())
    if len(spans) < 2:
        return {"graphs": len(spans)}
    n = len(spans) - 1
    by_op: dict[str, float] = defaultdict(float)
    gap = busy = lag = 0.0
    for (s0, t0, _), (s1, _, launch1) in zip(spans, spans[1:]):
        gap += s1 - t0
        lag += s1 - launch1
        for name, s, t in other:
            if s >= t0 and t <= s1:
                by_op[name] += t - s
                busy += t - s
    return {"graphs": len(spans), "graph_span_us": sum(t - s for s, t, _ in spans) / len(spans),
            "between_graphs_us": gap / n, "outside_graph_ops_us": {k: v / n for k, v in by_op.items()},
            "idle_between_graphs_us": (gap - busy) / n, "launch_to_graph_start_us": lag / n,
            "step_us": (spans[-1][0] - spans[0][0]) / n}


@torch.inference_mode()
def queued_replays(runner, reps: int = 100) -> dict:
    """Milliseconds per step of the batch-1 decode graph queued back to back (CUDA events around
    all reps), alone and with the engine's copies between graphs: the staged row to the device
    (from pinned memory), the greedy token to the host, both."""
    graph, buf = runner.graphs[1]
    stage = buf["stage"]
    host_stage = stage.cpu().pin_memory()
    host_tok = torch.empty(1, dtype=torch.int32, pin_memory=True)
    tok = runner.greedy_tokens[0, :1]
    steps = {"graph": lambda: graph.replay(),
             "h2d+graph": lambda: (stage.copy_(host_stage, non_blocking=True), graph.replay()),
             "graph+d2h": lambda: (graph.replay(), host_tok.copy_(tok, non_blocking=True)),
             "h2d+graph+d2h": lambda: (stage.copy_(host_stage, non_blocking=True), graph.replay(),
                                       host_tok.copy_(tok, non_blocking=True))}
    out = {}
    for name, fn in steps.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(reps):
            fn()
        t1.record()
        t1.synchronize()
        out[name] = t0.elapsed_time(t1) / reps
    return out


def engine_profile(engine: Engine, prompt: list[int], tokens: int) -> dict:
    """The engine's timed greedy decode (unprofiled, tok/s) and the same under the profiler
    (engine_gaps)."""
    from torch.profiler import ProfilerActivity, profile

    def decode():
        engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        engine.step()  # prefill + first token
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = 0
        while engine.has_unfinished():
            n += len(engine.step())
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    tok_s = decode()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled_tok_s = decode()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.load(open(path))
    return {"tok_s": tok_s, "step_ms": 1e3 / tok_s, "profiled_tok_s": profiled_tok_s, **engine_gaps(trace)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-decode")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--tag", default="default", help="names this run's flags in the result file")
    ap.add_argument("--engine-tokens", type=int, default=0, help="also profile the engine decoding this many tokens")
    args = ap.parse_args()

    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg, "cuda").to(torch.bfloat16).eval()
    counts = count_model(model, context=args.prompt_len + 128)
    bw = copy_tbps()
    weight_bytes = 2 * (counts.matmul_params_active + cfg.d_model)
    engine = Engine(model, None, EngineConfig(kv_budget="4GiB", max_num_seqs=8, cuda_graphs=True))
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))  # autotune, capture, a real row
    step_ms = decode_graph_ms(engine.runner, 1)  # also stages a real row into the batch-1 graph
    graph = engine.runner.graphs[1][0]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        trace = json.load(open(path))
    events = kernel_events(trace)
    per_step = len(events) // args.replays
    if per_step == 0:
        sys.exit("the profiler saw no kernels of the replayed graph")
    table = marginal_by_kernel(events, per_step)
    total = sum(v["marginal_us"] for v in table.values())
    ideal_us = weight_bytes / (bw * 1e12) * 1e6
    payload = {"bench": "decode_timeline", **env_info(), "preset": args.preset, "tag": args.tag,
               "flags": {k: v for k, v in os.environ.items() if k.startswith("MOEKIT_")},
               "copy_tbps": bw, "active_weight_bytes": weight_bytes, "weights_at_copy_bw_us": ideal_us,
               "graph_replay_ms": step_ms, "graph_replay_ms_profiled": cuda_time_ms(graph.replay, warmup=3, iters=20),
               "kernels_per_step": per_step, "marginal_us_per_step": total, "by_kernel": table,
               "autotune": tuned_timings()}
    if args.engine_tokens:
        mean_ctx = args.prompt_len + args.engine_tokens // 2
        payload["engine"] = gaps = engine_profile(engine, prompt, args.engine_tokens)
        gaps["graph_replay_ms_at_mean_context"] = decode_graph_ms(engine.runner, 1, context=mean_ctx)
        gaps["queued_step_ms"] = queued_replays(engine.runner)
    print(f"{args.tag}: graph replay {step_ms:.3f} ms; {per_step} kernels per step; weights at copy bandwidth "
          f"{ideal_us:.0f} us")
    for k, v in sorted(table.items(), key=lambda kv: -kv[1]["marginal_us"]):
        print(f"  {k:40s} x{v['calls']:5.1f}  marginal {v['marginal_us']:8.1f} us  "
              f"({v['marginal_us'] / max(v['calls'], 1):6.2f} each)  own duration {v['duration_us']:8.1f} us")
    if args.engine_tokens:
        print(f"engine, {args.engine_tokens} tokens: {gaps['step_ms']:.3f} ms per step; graph alone at the mean "
              f"context {gaps['graph_replay_ms_at_mean_context']:.3f} ms; profiled: graph span "
              f"{gaps.get('graph_span_us', 0):.1f} us, between graphs {gaps.get('between_graphs_us', 0):.1f} us "
              f"(idle {gaps.get('idle_between_graphs_us', 0):.1f}), launch to start "
              f"{gaps.get('launch_to_graph_start_us', 0):.1f} us")
        print("  queued back to back, ms per step: " + ", ".join(f"{k} {v:.4f}" for k, v in gaps["queued_step_ms"].items()))
        for k, v in sorted(gaps.get("outside_graph_ops_us", {}).items(), key=lambda kv: -kv[1]):
            print(f"  outside the graph: {k:50s} {v:6.2f} us per step")
    out = write_result(f"decode_timeline_{gpu_tag()}_{args.tag}", payload)
    print(f"  sum of marginals {total:.1f} us; wrote {out}")


if __name__ == "__main__":
    main()
