"""Decode with and without speculative decoding, same prompts from the held-out corpus, same
run: output tok/s at batch 1, 8 and 32 (decode: after the first token; end to end: with prefill), acceptance rate, mean accepted length, per-position
acceptance, and whether greedy outputs are identical.

    python bench/speculative.py --target runs/tiny --draft runs/draft            # CPU or GPU
    python bench/speculative.py --target RUN --draft DRAFT --k 4 --new-tokens 128 --batches 1,8,32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cuda_time_ms, decode_graph_ms, env_info, gpu_tag, write_result  # noqa: E402
from moekit.data.corpus import load_corpus  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.generate import load_draft, load_for_inference  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.train import checkpoint as ckpt_io  # noqa: E402


def prompts_from_corpus(target: str, n: int, chars: int = 200) -> list[str]:
    data = ckpt_io.load_run_config(ckpt_io.resolve_checkpoint(target)).data
    docs = [d.text for _, val in load_corpus(data).values() for d in val]
    return [d[:chars] for d in docs[:n]]


def timed(engine: Engine, rounds: list[list[str]], params, k: int) -> tuple[float, float, list[list[int]]]:
    """Rounds of prompts, each round's prompts decoded together, the rounds one after another:
    end-to-end output tok/s (prefill included), decode tok/s (tokens after each request's first,
    over the time after the round's last first token) and the outputs."""
    engine.warmup()  # every graph size captured, the kernels compiled and tuned for each
    # every prompt once, briefly: what the first prefill of a length costs (kernel specialisations,
    # allocations) stays out of the end-to-end figures
    engine.generate([p for r in rounds for p in r], SamplingParams(max_tokens=4 * (k + 1), temperature=0,
                                                                   ignore_eos=True))
    if engine.spec is not None:  # acceptance counted over the measured runs only
        engine.spec.stats = type(engine.spec.stats)(accepted_at=[0] * k)
    tokens = seconds = decode_tokens = decode_seconds = 0.0
    outputs = []
    for prompts in rounds:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.monotonic()
        outs = engine.generate(prompts, params)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.monotonic()
        n = sum(len(o.output_token_ids) for o in outs)
        tokens, seconds = tokens + n, seconds + end - t
        decode_tokens += n - len(outs)
        decode_seconds += end - max(o.first_token_time for o in outs)
        outputs += [o.output_token_ids for o in outs]
    return tokens / seconds, decode_tokens / decode_seconds, outputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True, help="a draft run, or 'ngram' for prompt lookup (no draft model)")
    ap.add_argument("--prompt-lookup-max", type=int, default=3, help="prompt lookup: the longest n-gram matched")
    ap.add_argument("--prompt-lookup-min", type=int, default=0,
                    help="prompt lookup: the shortest n-gram matched (0: 1 alone, 3 next to a draft)")
    ap.add_argument("--prompt-lookup-tokens", type=int, default=0,
                    help="with --with-lookup: proposals per lookup step (0: k)")
    ap.add_argument("--with-lookup", action="store_true",
                    help="with a draft run: prompt lookup's proposals on steps where every request finds a match")
    ap.add_argument("--k", default="4", help="proposals per step; a list (5,8,12) runs each against the same "
                    "baseline run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompts", type=int, default=8, help="at least this many prompts per batch size, in rounds of "
                    "`batch` (acceptance varies from prompt to prompt: one prompt at batch 1 is a noisy figure)")
    ap.add_argument("--prompt-chars", type=int, default=200, help="characters of each corpus document as its prompt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy, outputs compared)")
    ap.add_argument("--kv-budget", default="256MiB")
    ap.add_argument("--name", default="speculative_{gpu}", help="result file name ({gpu}: the GPU, or cpu)")
    args = ap.parse_args()

    target, tok = load_for_inference(args.target, args.device)
    lookup = args.draft == "ngram"
    draft = None if lookup else load_draft(args.draft, tok, args.device)
    if next(target.parameters()).is_cuda:
        target = target.to(torch.bfloat16)
        draft = draft.to(torch.bfloat16) if draft is not None else None
    params = SamplingParams(max_tokens=args.new_tokens, temperature=args.temperature, seed=0 if args.temperature else None,
                            ignore_eos=True)
    ks = [int(x) for x in str(args.k).split(",")]
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = prompts_from_corpus(args.target, b * max(1, args.prompts // b), args.prompt_chars)
        rounds = [prompts[i:i + b] for i in range(0, len(prompts), b)]
        cfg = EngineConfig(kv_budget=args.kv_budget, max_num_seqs=b, num_speculative_tokens=ks[0],
                           speculative_max_batch=max(b, 1))
        base = Engine(target, tok, cfg)
        base_tps, base_dec, base_out = timed(base, rounds, params, ks[0])
        target_ms = decode_graph_ms(base.runner, b)
        del base
        for k in ks:
            spec_cfg = dataclasses.replace(cfg, num_speculative_tokens=k)
            if lookup or args.with_lookup:
                spec_cfg = dataclasses.replace(spec_cfg, prompt_lookup_max=args.prompt_lookup_max,
                                               prompt_lookup_min=args.prompt_lookup_min,
                                               prompt_lookup_tokens=args.prompt_lookup_tokens)
            spec_engine = Engine(target, tok, spec_cfg, draft=draft)
            spec_tps, spec_dec, spec_out = timed(spec_engine, rounds, params, k)
            st = spec_engine.spec.stats
            # GPU time of one step alone: the target's and the draft's decode graphs with b real rows, and
            # the step graph (draft steps + verification) with the inputs of the last step it ran
            step = spec_engine.spec.step_graphs.get(b)
            graphs = {"target_step_ms": target_ms,
                      "draft_step_ms": decode_graph_ms(spec_engine.spec.runner, b) if not lookup else None,
                      "speculative_step_graph_ms": (cuda_time_ms(step[0].replay, warmup=5, iters=50)
                                                    if torch.cuda.is_available() and step is not None else None)}
            del spec_engine
            rows.append({**graphs, "batch": b, "k": k, "decode_tok_s": base_dec, "decode_tok_s_speculative": spec_dec,
                         "decode_speedup": spec_dec / base_dec,
                         "tok_s": base_tps, "tok_s_speculative": spec_tps, "speedup": spec_tps / base_tps,
                         "identical_greedy": spec_out == base_out if args.temperature == 0 else None,
                         "acceptance_rate": st.acceptance_rate,
                         "mean_accepted_length": st.mean_accepted_length, "accepted_at_position": st.accepted_at,
                         "speculative_steps": st.steps, "lookup_steps": st.lookup_steps})
            print(rows[-1], flush=True)
            tag = gpu_tag() if torch.cuda.is_available() else "cpu"
            path = write_result(args.name.format(gpu=tag), {  # after each run
                "bench": "speculative", **env_info(), "target": args.target, "draft": args.draft,
                "with_lookup": args.with_lookup, "prompt_lookup_tokens": args.prompt_lookup_tokens, "k": ks, "new_tokens": args.new_tokens,
                "temperature": args.temperature, "prompts_at_least": args.prompts, "prompt_chars": args.prompt_chars,
                "results": rows})
    print("decode: output tok/s after the first token; end to end: with prefill")
    print(f"{'batch':>5s} {'k':>3s} {'decode':>8s} {'spec':>8s} {'speedup':>8s} {'e2e':>8s} {'spec':>8s} {'speedup':>8s} "
          f"{'accept':>7s} {'len':>5s} identical")
    for r in rows:
        print(f"{r['batch']:5d} {r['k']:3d} {r['decode_tok_s']:8.1f} {r['decode_tok_s_speculative']:8.1f} {r['decode_speedup']:8.2f} "
              f"{r['tok_s']:8.1f} {r['tok_s_speculative']:8.1f} {r['speedup']:8.2f} "
              f"{r['acceptance_rate']:7.1%} {r['mean_accepted_length']:5.2f} {r['identical_greedy']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
