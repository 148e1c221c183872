"""Helpers for the server tests (test_serve.py, test_serve_robustness.py): a tiny checkpoint built
without the corpus, real uvicorn servers running in background threads on free ports, engine
references, slowed engines and server-sent-event parsing."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from moekit.config import ModelConfig, RunConfig
from moekit.data.tokenizer import Tokenizer, train_tokenizer
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import SamplingParams
from moekit.serve.chat import render_chat
from moekit.model.transformer import Transformer
from moekit.serve import server as server_mod
from moekit.serve.app import ServerConfig
from moekit.train.checkpoint import save_checkpoint

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Once upon a time there was a small language model.",
    "The weather is nice today and the sun is shining.",
    "She sells sea shells by the sea shore.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "Please write a short poem about the ocean.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "def greet(name):\n    print(f'hello {name}')\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nimport sys\nimport json\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "while True:\n    break\n",
    "if x > 0:\n    y = x * 2\nelse:\n    y = -x\n",
    "numbers = [1, 2, 3, 4, 5]\ntotal = sum(numbers)\n",
    "with open('data.txt') as f:\n    lines = f.readlines()\n",
    "try:\n    run()\nexcept ValueError as e:\n    print(e)\n",
    "return {'status': 'ok', 'count': len(items)}\n",
    "The model generates one token at a time.",
    "Tests make sure the server answers every request.",
    "lambda x: x + 1",
] * 3

MODEL_KW = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=128, n_experts=4, top_k=2,
                max_seq_len=256)
ENGINE_KW = dict(kv_budget="4MiB", block_size=16, max_num_seqs=32)
MODEL_NAME = "moekit"


def make_checkpoint(run_dir: Path) -> tuple[Path, Tokenizer]:
    tok = train_tokenizer(CORPUS, 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **MODEL_KW)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_checkpoint(run_dir, step=1, model=model, cfg=RunConfig(model=cfg), tokenizer=tok, state={"step": 1})
    return run_dir, tok


@dataclass
class Served:
    """A running server: its URL, the app, and the engine behind it (for white-box checks)."""
    url: str
    port: int
    app: object
    aengine: object
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def build(ckpt_dir: Path, engine_cfg: EngineConfig | None = None, **server_kw):
    """moekit.serve.server.build_app, keeping hold of the AsyncEngine it creates."""
    captured = {}
    real = server_mod.create_app

    def spy(aengine, tok, cfg):
        captured["aengine"] = aengine
        return real(aengine, tok, cfg)

    with mock.patch.object(server_mod, "create_app", spy):
        app = server_mod.build_app(str(ckpt_dir), "cpu", engine_cfg or EngineConfig(**ENGINE_KW),
                                   ServerConfig(model_name=MODEL_NAME, **server_kw))
    return app, captured["aengine"]


def build_app_with_draft(ckpt_dir: Path, engine_kw: dict):
    """moekit.serve.server.build_app with the checkpoint as its own speculative draft."""
    return server_mod.build_app(str(ckpt_dir), "cpu", EngineConfig(**engine_kw), ServerConfig(model_name=MODEL_NAME),
                                draft_path=str(ckpt_dir))


def start_server(ckpt_dir: Path, engine_cfg: EngineConfig | None = None, uvicorn_kw: dict | None = None,
                 **server_kw) -> Served:
    app, aengine = build(ckpt_dir, engine_cfg, **server_kw)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **(uvicorn_kw or {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return Served(f"http://127.0.0.1:{port}", port, app, aengine, aengine.engine, server, thread)


def health(url: str) -> dict:
    r = httpx.get(f"{url}/health", timeout=10)
    r.raise_for_status()
    return r.json()


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Poll /health until nothing runs, waits, or holds KV blocks; return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["running"] == 0 and h["waiting"] == 0 and h["kv_blocks_used"] == 0:
            return h
        if time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def engine_greedy(engine: Engine, prompt, max_tokens: int):
    return engine.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0]


def chat_prompt(messages) -> str:
    return render_chat(messages)


def slow_down(engine: Engine, delay: float):
    """Each engine step takes `delay` seconds longer, so a long request is still running when the test
    acts on it (the tiny model makes ~1000 tokens a second otherwise). Returns the real step."""
    real_step = engine.step

    def step():
        time.sleep(delay)
        return real_step()

    engine.step = step
    return real_step


@contextlib.contextmanager
def slowed(engine: Engine, delay: float):
    real_step = slow_down(engine, delay)
    try:
        yield
    finally:
        engine.step = real_step


def iter_sse(lines):
    """data: payloads of an SSE stream as they come, decoded; the final [DONE] kept as the string."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def sse_events(lines) -> list:
    return list(iter_sse(lines))


def comp(**kw):
    """A /v1/completions body."""
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, **kw}


def chat(**kw):
    """A /v1/chat/completions body."""
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


def metric_value(text: str, sample_name: str, **labels) -> float | None:
    """A sample's value in a Prometheus exposition, or None."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None
