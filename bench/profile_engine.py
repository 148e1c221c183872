"""Where a batch-1 engine decode step spends its wall time, with and without speculation: per-step
wall time against the GPU time of the same steps, the Python functions holding the host
(cProfile), and the CUDA runtime calls (torch.profiler). Random weights: no training needed.

    python bench/profile_engine.py [--target bench-1b] [--draft bench-draft|self] [--k 4] [--cuda-trace]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moekit.config import preset  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.model.transformer import build_model  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, int, list[float]]:
    """Wall seconds, tokens, and per-step wall ms of one greedy generation."""
    engine.add_request(prompt, params)
    steps, n = [], 0
    sync()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        n += len(engine.step())
        steps.append((time.perf_counter() - t) * 1e3)
    sync()
    return time.perf_counter() - t0, n, steps


def launch_costs(name: str, runner) -> None:
    """Host time of one graph launch with the GPU idle and with launches queued, and the GPU time
    per replay back to back."""
    for b, (g, _) in sorted(runner.graphs.items()):
        idle = []
        for _ in range(30):
            sync()
            t = time.perf_counter()
            g.replay()
            idle.append((time.perf_counter() - t) * 1e6)
        sync()
        t = time.perf_counter()
        for _ in range(30):
            g.replay()
        queued = (time.perf_counter() - t) * 1e6 / 30
        sync()
        back_to_back = (time.perf_counter() - t) * 1e3 / 30
        idle.sort()
        print(f"{name} graph {b} rows: launch {idle[15]:.0f} us idle, {queued:.0f} us queued; "
              f"{back_to_back:.3f} ms per replay back to back")


def timing(name: str, engine: Engine, prompt, params) -> None:
    engine.warmup()
    if torch.cuda.is_available():
        launch_costs(name, engine.runner)
        if engine.spec is not None and engine.spec.runner is not None:
            launch_costs(f"{name} draft", engine.spec.runner)
    run(engine, prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    dt, n, steps = run(engine, prompt, params)
    steps.sort()
    print(f"=== {name}: {n / dt:.1f} tok/s, {len(steps)} steps, step ms p10 {steps[len(steps) // 10]:.3f} "
          f"p50 {steps[len(steps) // 2]:.3f} p90 {steps[9 * len(steps) // 10]:.3f}", flush=True)


def profiles(name: str, engine: Engine, prompt, params, rows: int, cuda_trace: bool) -> None:
    """cProfile of the host, then (cuda_trace) torch.profiler's CUDA runtime calls and kernels. The
    CUDA trace runs last: once the profiler has attached, CUDA calls stay slower in this process."""
    pr = cProfile.Profile()
    pr.enable()
    run(engine, prompt, params)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    print(f"=== {name}: cProfile\n{s.getvalue()}")
    if cuda_trace:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(engine, prompt, params)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="bench-1b")
    ap.add_argument("--draft", default="bench-draft", help="a preset, 'self' (the target drafts: all accepted), or "
                    "'ngram' (prompt lookup, no draft)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=35)
    ap.add_argument("--cuda-trace", action="store_true", help="also torch.profiler (slows CUDA calls afterwards)")
    args = ap.parse_args()
    torch.manual_seed(0)
    target = build_model(preset(args.target), DEVICE).to(torch.bfloat16).eval()
    if args.draft == "self":
        draft = target
    elif args.draft == "ngram":
        draft = None
    else:
        draft = build_model(dataclasses.replace(preset(args.draft), vocab_size=target.cfg.vocab_size), DEVICE)
        draft = draft.to(torch.bfloat16).eval()
    prompt = torch.randint(0, target.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    if draft is None:  # something to look up: the prompt repeats
        prompt = prompt[:16] * 4
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    cfg = EngineConfig(kv_budget="2GiB", max_num_seqs=1, num_speculative_tokens=args.k, speculative_max_batch=1)
    spec_cfg = dataclasses.replace(cfg, prompt_lookup_max=3) if draft is None else cfg
    engines = {"target alone": Engine(target, None, cfg),
               f"speculative, draft {args.draft}, k {args.k}": Engine(target, None, spec_cfg, draft=draft)}
    for name, engine in engines.items():
        timing(name, engine, prompt, params)
    for name, engine in engines.items():
        profiles(name, engine, prompt, params, args.rows, args.cuda_trace)
    spec = list(engines.values())[-1]
    st = spec.spec.stats
    print(f"acceptance {st.acceptance_rate:.1%}, mean accepted length {st.mean_accepted_length:.2f}")


if __name__ == "__main__":
    main()
