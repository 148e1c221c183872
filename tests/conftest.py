"""Shared test setup.

MOEKIT_TUNE=quick (unless set otherwise): the fused decode kernels tune among a few tiles.

The tensors in these tests are tiny, so one intra-op thread is as fast as two on an idle machine
and avoids OpenMP oversubscription slowing the suite down many-fold when other work (a training
run, a parallel test runner) shares the two cores.
"""

import os
import shutil
from pathlib import Path

# the GPU tests build many model shapes: each tuned decode kernel chooses among a few tiles
# (with and without splits) instead of compiling and timing every one (moekit.infer.triton_sync)
os.environ.setdefault("MOEKIT_TUNE", "quick")

import pytest
import torch

from moekit.data.tokenizer import train_tokenizer
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.generate import load_for_inference

torch.set_num_threads(1)


# -- the server tests' fixtures (test_serve.py, test_serve_robustness.py): one checkpoint and one
# server for the session. The server's libraries are imported here, not at the top, so that suites
# which need none of them (tests/test_gpu.py on a GPU image) load without them.
@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    from serve_helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="session")
def ckpt_dir(ckpt):
    return ckpt[0]


@pytest.fixture(scope="session")
def tok(ckpt):
    return ckpt[1]


@pytest.fixture(scope="session")
def srv(ckpt_dir):
    from serve_helpers import start_server

    s = start_server(ckpt_dir)
    yield s
    s.stop()
    assert not s.thread.is_alive()


@pytest.fixture(scope="session")
def oai(srv):
    import openai

    client = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="session")
def http(srv):
    import httpx

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def ref_engine(ckpt_dir):
    """An engine of its own over the same checkpoint, for greedy parity with the server."""
    from serve_helpers import ENGINE_KW

    model, tok = load_for_inference(str(ckpt_dir), "cpu")
    return Engine(model, tok, EngineConfig(**ENGINE_KW))


# -- the Hugging Face interop tests' fixtures (test_interop.py, test_interop_upcycle.py): one set
# per module
@pytest.fixture(scope="module")
def hf_tok():
    """A byte-level tokenizer trained on a few sentences."""
    from interop_helpers import TEXTS  # imports transformers (or skips its tests)

    return train_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, hf_tok):
    """name -> (HF model in memory, its save_pretrained dir with a tokenizer.json)."""
    from interop_helpers import ARCHS, hf_model

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, name in enumerate(ARCHS):
        model = hf_model(name, seed=i)
        d = root / name
        model.save_pretrained(d)
        hf_tok.save(d / "tokenizer.json")
        out[name] = (model, d)
    return out


@pytest.fixture
def hf_copy(hf_dirs, tmp_path):
    """A writable copy of one saved HF dir (to corrupt)."""
    def copy(name: str) -> Path:
        dst = tmp_path / f"copy-{name}"
        shutil.copytree(hf_dirs[name][1], dst)
        return dst
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_tok):
    """Saved moekit runs, one per ROUNDTRIP config (interop_helpers.py)."""
    from interop_helpers import ROUNDTRIP, make_run

    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(cfg, hf_tok, root / name, seed=i) for i, (name, (cfg, _)) in enumerate(ROUNDTRIP.items())}
