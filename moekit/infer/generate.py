"""Autoregressive sampling with a contiguous KV cache, and `moekit generate`."""

from __future__ import annotations

import sys

import torch

from moekit.data.tokenizer import Tokenizer
from moekit.errors import ConfigError
from moekit.infer.sampling import sample_next
from moekit.model.transformer import Transformer, build_model


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """prompt: [B, T] -> [B, T + n] (n <= max_new_tokens; stops early once every row hit stop_token)."""
    model.eval()
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.cfg.max_seq_len)
    if T >= total:
        raise ConfigError(f"prompt of {T} tokens leaves no room in the {model.cfg.max_seq_len}-token context")
    gen = torch.Generator(device=prompt.device)
    gen.manual_seed(0 if seed is None else seed)
    caches = model.new_caches(B, total)
    logits = model(prompt, caches=caches).logits[:, -1]  # prefill: [B, V]
    out, done = [prompt], torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(total - T):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # [B]
        if stop_token is not None:
            nxt = nxt.masked_fill(done, stop_token)
            done |= nxt == stop_token
        out.append(nxt[:, None])
        if stop_token is not None and bool(done.all()):
            break
        if len(out) - 1 < total - T:
            logits = model(nxt[:, None], caches=caches).logits[:, -1]
    return torch.cat(out, dim=1)


def sample_text(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    x = torch.tensor([ids], device=device)
    y = generate(model, x, max_new_tokens, temperature, top_k, top_p, seed, stop_token=tokenizer.eot_id)
    new = [t for t in y[0, len(ids):].tolist() if t != tokenizer.eot_id]
    return prompt + tokenizer.decode(new)


def load_for_inference(path: str, device: str = "auto") -> tuple[Transformer, Tokenizer]:
    """A moekit run or checkpoint folder, or a Hugging Face model directory."""
    from moekit.interop.convert import model_from_source
    from moekit.interop.hf import is_hf_dir
    from moekit.train import checkpoint as ckpt_io
    from moekit.train.trainer import resolve_device

    if is_hf_dir(path):
        model, tok = model_from_source(path, resolve_device(device))
        return model.eval(), tok
    ckpt = ckpt_io.resolve_checkpoint(path)
    ckpt_io.verify(ckpt)
    cfg = ckpt_io.load_run_config(ckpt)
    model = build_model(cfg.model, resolve_device(device))
    ckpt_io.load_weights(model, ckpt)
    return model.eval(), Tokenizer.load(ckpt / "tokenizer.json")


def load_draft(path: str, tokenizer: Tokenizer, device: str = "auto") -> Transformer:
    """A draft model for speculative decoding; it must use the target's tokenizer."""
    draft, draft_tok = load_for_inference(path, device)
    if draft_tok.hf.to_str() != tokenizer.hf.to_str():
        raise ConfigError(f"the speculative model {path} uses another tokenizer than the target")
    return draft


def generate_main(args) -> int:
    from moekit.infer.engine import Engine, EngineConfig
    from moekit.infer.sampling import SamplingParams

    params = [SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed + i).validate() for i in range(args.num_samples)]
    model, tok = load_for_inference(args.ckpt, args.device)
    draft = load_draft(args.speculative_model, tok, args.device) if args.speculative_model else None
    if model.embed.weight.is_cuda:
        model = model.to(torch.bfloat16)
        draft = draft.to(torch.bfloat16) if draft is not None else None
    engine = Engine(model, tok, EngineConfig(kv_budget=args.kv_budget, max_num_seqs=max(1, args.num_samples),
                                             num_speculative_tokens=args.num_speculative_tokens,
                                             prompt_lookup_max=args.prompt_lookup_max,
                                             prompt_lookup_min=getattr(args, "prompt_lookup_min", 0),
                                             prompt_lookup_tokens=getattr(args, "prompt_lookup_tokens", 0),
                                             tune_decode=getattr(args, "tune_decode", False),
                                             decode_steps=getattr(args, "decode_steps", 4)),
                    draft=draft)
    if getattr(args, "tune_decode", False):
        engine.tune_decode(log=lambda line: print(line, file=sys.stderr))
    for i, out in enumerate(engine.generate([args.prompt] * args.num_samples, params)):
        text = args.prompt + out.text
        sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))
        if i + 1 < args.num_samples:
            sys.stdout.write("-" * 40 + "\n")
    return 0
