"""The speculative-decoding benchmark on CPU, end to end on a small trained run: its JSON rows are
complete and, with the target as its own draft, every proposal is accepted (a closed form: k + 1
tokens a step), and greedy output always equals plain decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.train.trainer import train_main
from tests.test_train import small_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bench")
    out = base / "run"
    train_main(small_cfg(out, base / "cache", steps=2, ckpt_every=2), progress=False)
    return out


def _bench(run: Path, tmp_path: Path, draft: str, k: int | str, extra: tuple = ()) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "bench" / "speculative.py"), "--target", str(run), "--draft", draft,
           "--k", str(k), "--new-tokens", "9", "--prompt-chars", "60", "--batches", "1,2", "--prompts", "2", "--kv-budget", "8MiB",
           "--device", "cpu", "--name", "spec_{gpu}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "spec_cpu.json").read_text())
    ks = [int(x) for x in str(k).split(",")]
    assert res["k"] == ks and res["draft"] == draft
    assert [(row["batch"], row["k"]) for row in res["results"]] == [(b, k) for b in (1, 2) for k in ks]
    for row in res["results"]:
        k = row["k"]
        assert row["identical_greedy"] is True
        assert row["target_step_ms"] is None and row["speculative_step_graph_ms"] is None  # GPU figures
        assert 0 <= row["acceptance_rate"] <= 1
        assert len(row["accepted_at_position"]) == (k if not extra or not row["lookup_steps"] else max(k, 5))
    return res["results"]


def test_the_target_as_its_own_draft_is_always_accepted(run, tmp_path):
    for row in _bench(run, tmp_path, str(run), k=3):
        assert row["acceptance_rate"] == 1.0 and row["mean_accepted_length"] == 4.0
        # 2 prompts x 8 tokens after the first, 4 a step: 4 verifications, all 3 proposals accepted in each
        assert row["accepted_at_position"] == [4, 4, 4]


def test_prompt_lookup_bench_runs(run, tmp_path):
    rows = _bench(run, tmp_path, "ngram", k="2,5")  # two k against one baseline run per batch
    assert all(row["draft_step_ms"] is None for row in rows)
    assert rows[0]["decode_tok_s"] == rows[1]["decode_tok_s"] and rows[2]["decode_tok_s"] == rows[3]["decode_tok_s"]


def test_draft_with_longer_lookup_steps_bench_runs(run, tmp_path):
    """The target as its own draft proposing 2, prompt lookup steps proposing 5 next to it: greedy
    output identical and acceptance counted at up to 5 positions (checked in _bench), both kinds of
    step taken."""
    rows = _bench(run, tmp_path, str(run), k=2, extra=("--with-lookup", "--prompt-lookup-tokens", "5",
                                                       "--prompt-lookup-min", "1"))
    assert all(0 < row["lookup_steps"] < row["speculative_steps"] for row in rows), rows


def test_engine_gaps_splits_the_time_between_graphs():
    """bench/decode_timeline.engine_gaps on a hand-built trace: two graphs (kernels tied to their
    cudaGraphLaunch by correlation id), a copy and a kernel between them; the spans, the ops and
    the idle rest are sums of the events' own times."""
    from bench.decode_timeline import engine_gaps

    def ev(cat, name, ts, dur=None, corr=None):
        e = {"cat": cat, "name": name, "ts": ts, "args": {"correlation": corr}}
        return e if dur is None else {**e, "dur": dur}

    trace = {"traceEvents": [
        ev("cuda_runtime", "cudaGraphLaunch", 0.0, 5.0, corr=1), ev("cuda_runtime", "cudaGraphLaunch", 90.0, 5.0, corr=2),
        ev("kernel", "embed", 10.0, 20.0, corr=1), ev("kernel", "lm_head", 30.0, 50.0, corr=1),  # graph 1: 10 ... 80
        ev("kernel", "argmax_kernel<float>(x)", 83.0, 4.0, corr=7), ev("gpu_memcpy", "Memcpy DtoH", 88.0, 2.0, corr=8),
        ev("kernel", "embed", 100.0, 10.0, corr=2), ev("kernel", "lm_head", 110.0, 70.0, corr=2),  # graph 2: 100 ... 180
    ]}
    out = engine_gaps(trace)
    assert out["graphs"] == 2
    assert out["graph_span_us"] == 75.0  # (70 + 80) / 2
    assert out["between_graphs_us"] == 20.0
    assert out["outside_graph_ops_us"] == {"argmax_kernel": 4.0, "Memcpy DtoH": 2.0}
    assert out["idle_between_graphs_us"] == 14.0
    assert out["launch_to_graph_start_us"] == 10.0 and out["step_us"] == 90.0
