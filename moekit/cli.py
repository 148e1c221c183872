"""The `moekit` command: plan, train, generate.

Every flag maps onto one config field. Errors a user can cause end as one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from moekit.errors import MoekitError
from moekit.config import ModelConfig, RunConfig, TrainConfig, load_toml, preset, run_preset
from moekit.errors import ConfigError


def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One --flag per dataclass field; defaults None so only given flags override."""
    for f in dataclasses.fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = getattr(cls(), f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=prefix + f.name, default=None, action=argparse.BooleanOptionalAction)
        elif isinstance(default, list):
            continue
        else:
            parser.add_argument(flag, dest=prefix + f.name, type=type(default), default=None, metavar=f.name.upper())


def _overrides(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, prefix + f.name, None)
        if v is not None:
            out[f.name] = v
    return out


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = load_toml(args.config) if args.config else run_preset(args.preset or "tiny")
    cfg.train = dataclasses.replace(cfg.train, **_overrides(args, TrainConfig))
    if cfg.train.init_from:
        # the weights decide the architecture; flags may still change what has no weights (RoPE scaling)
        from moekit.interop.convert import source_config

        cfg.model = source_config(cfg.train.init_from)
    cfg.model = dataclasses.replace(cfg.model, **_overrides(args, ModelConfig, "model_"))
    if cfg.model.max_seq_len < cfg.train.seq_len:
        cfg.model = dataclasses.replace(cfg.model, max_seq_len=cfg.train.seq_len)
    return cfg.validate()


def cmd_plan(args) -> int:
    import json

    from rich.console import Console

    from moekit.plan import costs
    from moekit.plan.report import (PlanInputs, against, measured_decode_points, plan_model, render_against,
                                    render_gpt4, render_model, roofline_png)

    console = Console(width=max(120, Console().width))
    out: dict = {}
    if args.preset == "gpt4":
        with console.capture() if args.json else _null():
            out["gpt4"] = render_gpt4(console)
        name = "gpt4-16x111b"
    else:
        name = args.preset
    cfg = dataclasses.replace(preset(name), **_overrides(args, ModelConfig, "model_")).validate()
    for v, flag in ((args.gpus, "--gpus"), (args.dp, "--dp"), (args.tp, "--tp"), (args.pp, "--pp"), (args.ep, "--ep")):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}") from None
    inp = PlanInputs(hardware=args.hardware, hardware_file=args.hardware_file, gpus=args.gpus, mfu=args.mfu,
                     tokens=args.tokens, days=args.days, price=args.price,
                     layout=costs.Layout(args.dp, args.tp, args.pp, args.ep), micro_batch=args.micro_batch,
                     seq_len=args.seq_len, checkpointing=args.checkpointing, context=args.context,
                     batch_sizes=batches)
    if args.preset != "gpt4":
        out.update(plan_model(name, cfg, inp), model=dataclasses.asdict(cfg))
        if not args.json:
            render_model(out, console)
    if args.against:
        out["against"] = against(args.against)
        if not args.json:
            render_against(out["against"], console, args.against)
    if args.png:
        path = roofline_png(cfg, name, inp, args.png, measured_decode_points(args.against))
        if not args.json:
            console.print(f"wrote {path}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def cmd_train(args) -> int:
    from moekit.train.stopping import EXIT_STOPPED
    from moekit.train.trainer import train_main

    trainer: list = []
    if args.resume:
        layout = {k: getattr(args, k) for k in ("dp", "ep", "tp", "pp") if getattr(args, k) is not None}
        train_main(None, resume=args.resume, steps=args.steps, layout=layout, time_limit=args.time_limit,
                   trainer_out=trainer)
    else:
        train_main(run_config_from_args(args), trainer_out=trainer)
    return EXIT_STOPPED if trainer and trainer[0].stopped else 0


def cmd_generate(args) -> int:
    from moekit.infer.generate import generate_main

    return generate_main(args)


def cmd_convert(args) -> int:
    from moekit.interop.convert import convert_from_hf, convert_to_hf

    if bool(args.from_hf) == bool(args.to_hf):
        raise ConfigError("give exactly one of --from-hf DIR or --to-hf RUN")
    out = convert_from_hf(args.from_hf, args.out) if args.from_hf else convert_to_hf(args.to_hf, args.out)
    print(f"wrote {out}")
    return 0


def cmd_upcycle(args) -> int:
    from moekit.interop.convert import upcycle

    out = upcycle(args.dense, args.experts, args.top_k, args.out, args.noise, seed=args.seed)
    print(f"wrote {out}: every expert a copy of the dense MLP; continue with "
          f"`moekit train --init-from {out} ...`")
    return 0


def cmd_eval(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from moekit.eval.long_context import (long_sequences, loss_by_position, passkey_accuracy,
                                          plot_loss_by_position)
    from moekit.infer.generate import load_for_inference
    from moekit.train import checkpoint as ckpt_io

    try:
        lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
        depths = [float(x) for x in args.depths.split(",") if x]
    except ValueError:
        raise ConfigError("--passkey-lengths and --depths are comma-separated numbers") from None
    results, passkey, trained = {}, {}, {}
    for path in args.ckpt:
        model, tok = load_for_inference(path, args.device)
        if args.length > model.cfg.max_seq_len:
            raise ConfigError(f"{path}: --length {args.length} exceeds its context of {model.cfg.max_seq_len}")
        run = ckpt_io.load_run_config(ckpt_io.resolve_checkpoint(path))
        trained[path] = run.train.seq_len
        seqs = long_sequences(tok, run.data, args.length)
        results[path] = {src: loss_by_position(model, s, args.buckets) for src, s in seqs.items()}
        passkey[path] = {f"{n}@{d:g}": passkey_accuracy(model, tok, n, d, args.trials)
                         for n in lengths for d in depths if n + 8 <= model.cfg.max_seq_len}
    if args.json:
        print(json.dumps({"length": args.length, "loss_by_position": results, "passkey": passkey,
                          "trained_seq_len": trained}, indent=2))
    else:
        console = Console(width=max(120, Console().width))
        tab = Table(title=f"loss by position bucket ({args.length} tokens, {args.buckets} buckets)")
        tab.add_column("checkpoint / source")
        for i in range(args.buckets):
            lo, hi = i * args.length // args.buckets, (i + 1) * args.length // args.buckets
            tab.add_column(f"{lo}-{hi}", justify="right")
        for path, per_source in results.items():
            for src, losses in per_source.items():
                tab.add_row(f"{path} ({src}, trained at {trained[path]})", *[f"{v:.3f}" for v in losses])
        console.print(tab)
        pk = Table(title="passkey retrieval accuracy (length@depth)")
        pk.add_column("checkpoint")
        keys = sorted({k for v in passkey.values() for k in v}, key=lambda k: (int(k.split("@")[0]), k))
        for k in keys:
            pk.add_column(k, justify="right")
        for path, accs in passkey.items():
            pk.add_row(path, *[f"{accs[k]:.0%}" if k in accs else "-" for k in keys])
        console.print(pk)
    if args.png:
        plot_loss_by_position(results, args.length, args.png, trained)
        if not args.json:
            print(f"wrote {args.png}")
    return 0


def cmd_serve(args) -> int:
    from moekit.serve.server import serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Build, train, serve and size sparse MoE language models.")
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="cost and capacity plan of a preset ('gpt4' = the published GPT-4 figures)")
    plan.add_argument("preset", help="a preset name, or gpt4 for the published GPT-4 figures")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("--hardware", default="h100-sxm", help="a100-40gb, a100-80gb, h100-sxm, h200, or one from --hardware-file")
    plan.add_argument("--hardware-file", default=None, help="TOML with [gpu-name] tables overriding or adding hardware")
    plan.add_argument("--gpus", type=int, default=8)
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for training")
    plan.add_argument("--tokens", type=float, default=1e12, help="training tokens")
    plan.add_argument("--days", type=float, default=0.0, help="a run length: report the MFU it implies")
    plan.add_argument("--price", type=float, default=0.0, help="$ per GPU-hour (0 = the hardware default)")
    plan.add_argument("--dp", type=int, default=1)
    plan.add_argument("--tp", type=int, default=1)
    plan.add_argument("--pp", type=int, default=1)
    plan.add_argument("--ep", type=int, default=1)
    plan.add_argument("--micro-batch", type=int, default=1)
    plan.add_argument("--seq-len", type=int, default=0, help="0 = the model's max_seq_len")
    plan.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    plan.add_argument("--context", type=int, default=2048, help="decode context length")
    plan.add_argument("--batch-sizes", default="1,8,32,128,512", help="decode batch sizes")
    plan.add_argument("--against", default=None, metavar="RESULT.json", help="predict a measured benchmark result")
    plan.add_argument("--png", default=None, help="write a decode roofline plot here")
    _add_fields(plan, ModelConfig, "model_")
    plan.set_defaults(func=cmd_plan)

    train = sub.add_parser("train", help="train a model on the bundled text+code corpus")
    train.add_argument("--preset", default=None, help="preset name (default tiny)")
    train.add_argument("--config", default=None, help="TOML run config")
    train.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder exactly")
    _add_fields(train, ModelConfig, "model_")
    _add_fields(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("prompt", nargs="?", default="def ")
    gen.add_argument("--ckpt", required=True, metavar="RUN")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--kv-budget", default="64MiB", help="KV cache size: bytes (e.g. 2GiB) or a fraction of free GPU memory")
    gen.add_argument("--decode-steps", type=int, default=4,
                     help="greedy decode steps chained in one CUDA graph for batches of up to 8 (GPU; tokens then come this "
                          "many at a time; 1: a graph per step)")
    gen.add_argument("--tune-decode", action="store_true",
                     help="first refine the fused decode kernels' tiles inside the decode graph (GPU; a minute or so)")
    gen.add_argument("--speculative-model", default=None, metavar="RUN", help="a smaller model with the same tokenizer")
    gen.add_argument("--num-speculative-tokens", type=int, default=4, help="proposals per step (default 4; with prompt lookup "
                     "alone on a GPU MoE target longer runs pay: 12 measured best, bench/results)")
    gen.add_argument("--prompt-lookup-max", type=int, default=0, metavar="N",
                     help="speculate from history: propose what followed the last N (down to --prompt-lookup-min) "
                          "tokens earlier; with --speculative-model, on steps where every request finds a match")
    gen.add_argument("--prompt-lookup-min", type=int, default=0, metavar="N",
                     help="the shortest n-gram matched (0: 1 alone, 3 with --speculative-model)")
    gen.add_argument("--prompt-lookup-tokens", type=int, default=0, metavar="K",
                     help="proposals per prompt lookup step (0: --num-speculative-tokens); next to a draft, "
                          "lookup steps may propose more than drafting ones")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="moekit run <-> Hugging Face directory")
    conv.add_argument("--from-hf", default=None, metavar="DIR", help="Llama, Mistral, Mixtral, OLMoE or Qwen2-MoE")
    conv.add_argument("--to-hf", default=None, metavar="RUN")
    conv.add_argument("--out", required=True)
    conv.set_defaults(func=cmd_convert)

    up = sub.add_parser("upcycle", help="turn a dense model into an MoE whose experts start as copies of its MLP")
    up.add_argument("--dense", required=True, metavar="RUN_OR_HF_DIR")
    up.add_argument("--experts", type=int, required=True)
    up.add_argument("--top-k", type=int, default=2)
    up.add_argument("--noise", type=float, default=0.0, help="std of noise added to each expert, relative to the weights' std")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--out", required=True)
    up.set_defaults(func=cmd_upcycle)

    ev = sub.add_parser("eval", help="long-context evaluation: loss by position, passkey retrieval")
    ev.add_argument("--ckpt", nargs="+", required=True, metavar="RUN", help="one or more runs to compare")
    ev.add_argument("--length", type=int, default=1024, help="evaluation sequence length")
    ev.add_argument("--buckets", type=int, default=8)
    ev.add_argument("--passkey-lengths", default="256,512,1000")
    ev.add_argument("--depths", default="0.1,0.5,0.9")
    ev.add_argument("--trials", type=int, default=4)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--png", default=None, help="write loss vs position here")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("--ckpt", required=True, metavar="RUN")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model-name", default="moekit", help="the model id clients ask for")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--kv-budget", default="256MiB", help="KV cache: bytes (e.g. 8GiB) or a fraction of free GPU memory")
    srv.add_argument("--decode-steps", type=int, default=4,
                     help="greedy decode steps chained in one CUDA graph for batches of up to 8 (GPU; tokens then come this "
                          "many at a time; 1: a graph per step)")
    srv.add_argument("--tune-decode", action="store_true",
                     help="before serving, refine the fused decode kernels' tiles inside the decode graph (GPU; a minute or so)")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch")
    srv.add_argument("--max-batched-tokens", type=int, default=1024, help="tokens per engine step")
    srv.add_argument("--max-pending", type=int, default=512, help="requests in flight before answering 429")
    srv.add_argument("--enable-prefix-caching", action="store_true",
                     help="keep the K/V of whole blocks of earlier prompts (a shared system prompt) for later requests")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    srv.add_argument("--speculative-model", default=None, metavar="RUN", help="draft model for speculative decoding")
    srv.add_argument("--num-speculative-tokens", type=int, default=4, help="proposals per step (default 4; with prompt lookup "
                     "alone on a GPU MoE target longer runs pay: 12 measured best, bench/results)")
    srv.add_argument("--speculative-max-batch", type=int, default=8, help="no speculation above this many requests")
    srv.add_argument("--prompt-lookup-max", type=int, default=0, metavar="N",
                     help="speculate from history: propose what followed the last N (down to --prompt-lookup-min) "
                          "tokens earlier; with --speculative-model, on steps where every request finds a match")
    srv.add_argument("--prompt-lookup-min", type=int, default=0, metavar="N",
                     help="the shortest n-gram matched (0: 1 alone, 3 with --speculative-model)")
    srv.add_argument("--prompt-lookup-tokens", type=int, default=0, metavar="K",
                     help="proposals per prompt lookup step (0: --num-speculative-tokens); next to a draft, "
                          "lookup steps may propose more than drafting ones")
    srv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoekitError as e:
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
