"""`moekit serve --ckpt RUN`: load a checkpoint, start the engine, run uvicorn."""

from __future__ import annotations

import torch

from moekit.infer.async_engine import AsyncEngine
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.generate import load_draft, load_for_inference
from moekit.serve.app import ServerConfig, create_app
from moekit.serve.chat import load_chat_template
from moekit.train import checkpoint as ckpt_io


def build_app(ckpt: str, device: str = "auto", engine_cfg: EngineConfig | None = None,
              server_cfg: ServerConfig | None = None, draft_path: str | None = None):
    model, tok = load_for_inference(ckpt, device)
    draft = load_draft(draft_path, tok, device) if draft_path else None
    if model.embed.weight.is_cuda:
        model = model.to(torch.bfloat16)
        draft = draft.to(torch.bfloat16) if draft is not None else None
    server_cfg = server_cfg or ServerConfig()
    from moekit.interop.hf import is_hf_dir

    server_cfg.chat_template = load_chat_template(ckpt if is_hf_dir(ckpt) else ckpt_io.resolve_checkpoint(ckpt))
    engine = Engine(model, tok, engine_cfg or EngineConfig(), draft=draft)
    engine.warmup()  # decode graphs of every batch size before the first request (GPU; nothing on CPU)
    return create_app(AsyncEngine(engine), tok, server_cfg)


def serve_main(args) -> int:
    import uvicorn

    engine_cfg = EngineConfig(kv_budget=args.kv_budget, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_batched_tokens,
                              num_speculative_tokens=args.num_speculative_tokens,
                              speculative_max_batch=args.speculative_max_batch,
                              prompt_lookup_max=args.prompt_lookup_max,
                              prompt_lookup_min=getattr(args, "prompt_lookup_min", 0),
                              prompt_lookup_tokens=getattr(args, "prompt_lookup_tokens", 0),
                              tune_decode=getattr(args, "tune_decode", False),
                              decode_steps=getattr(args, "decode_steps", 4),
                              prefix_caching=getattr(args, "enable_prefix_caching", False))
    server_cfg = ServerConfig(model_name=args.model_name, api_key=args.api_key, max_pending=args.max_pending,
                              request_timeout=args.request_timeout)
    app = build_app(args.ckpt, args.device, engine_cfg, server_cfg, args.speculative_model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)
    return 0
