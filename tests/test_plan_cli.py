"""`moekit plan`: parameter counts of the presets, a closed-form count, and CLI error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.config import PRESETS


def plan_json(capsys, *argv: str) -> dict:
    rc = main(["plan", *argv, "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err == ""
    return json.loads(captured.out)


def within(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


def test_gpt4_16x111b_matches_the_seed_numbers(capsys):
    rep = plan_json(capsys, "gpt4-16x111b")
    c = rep["counts"]
    assert rep["preset"] == "gpt4-16x111b"
    assert within(c["total_params"], 1.8e12, 0.03), c["total_params"]
    assert within(c["active_params"], 280e9, 0.03), c["active_params"]
    assert within(c["shared_params"], 55e9, 0.10), c["shared_params"]
    assert within(c["params_per_expert"], 111e9, 0.03), c["params_per_expert"]
    assert c["n_layers"] == 120 and c["n_moe_layers"] == 120
    assert c["n_experts"] == 16 and c["top_k"] == 2
    assert rep["model"]["n_kv_heads"] == 1  # multi-query attention
    # internal consistency of the report
    assert c["total_params"] == c["shared_params"] + c["expert_params"]
    assert c["expert_params"] == 16 * c["params_per_expert"]
    assert c["active_params"] == c["shared_params"] + 2 * c["params_per_expert"]


def test_glam_matches_published_counts(capsys):
    c = plan_json(capsys, "glam-1.2t")["counts"]
    assert within(c["total_params"], 1.2e12, 0.03), c["total_params"]
    assert within(c["active_params"], 96.6e9, 0.05), c["active_params"]
    assert c["n_layers"] == 64 and c["n_moe_layers"] == 32
    assert c["n_experts"] == 64 and c["top_k"] == 2


def test_mixtral_matches_published_counts(capsys):
    c = plan_json(capsys, "mixtral-8x7b")["counts"]
    assert within(c["total_params"], 46.7e9, 0.02), c["total_params"]
    assert within(c["active_params"], 12.9e9, 0.02), c["active_params"]
    assert c["n_layers"] == 32 and c["n_experts"] == 8 and c["top_k"] == 2


def closed_form_total(m: dict) -> tuple[int, int]:
    """Total and active parameter counts written out from the architecture (untied, no biases)."""
    V, d, L = m["vocab_size"], m["d_model"], m["n_layers"]
    H, Hkv = m["n_heads"], m["n_kv_heads"]
    hd = m["head_dim"] or d // H
    E, k, f = m["n_experts"], m["top_k"], m["ffn_dim"]
    f_dense = m["dense_ffn_dim"] or f
    embed = V * d
    lm_head = 0 if m["tie_embeddings"] else V * d
    final_norm = d
    attn = d * H * hd + 2 * d * Hkv * hd + H * hd * d  # q, k, v, o
    norms = 2 * d
    expert = 3 * d * f  # w1, w3: d x f; w2: f x d
    total, active = embed + lm_head + final_norm, embed + lm_head + final_norm
    for i in range(L):
        moe = E > 1 and (i + 1) % m["moe_every"] == 0
        if moe:
            layer_shared = attn + norms + E * d  # router: E x d
            total += layer_shared + E * expert
            active += layer_shared + k * expert
        else:
            total += attn + norms + 3 * d * f_dense
            active += attn + norms + 3 * d * f_dense
    return total, active


@pytest.mark.parametrize("extra", [[], ["--model-moe-every", "2", "--model-dense-ffn-dim", "192"],
                                   ["--model-n-kv-heads", "2", "--model-tie-embeddings"]])
def test_tiny_counts_equal_closed_form(capsys, extra):
    rep = plan_json(capsys, "tiny", *extra)
    m, c = rep["model"], rep["counts"]
    total, active = closed_form_total(m)
    assert c["total_params"] == total
    assert c["active_params"] == active
    if not extra:
        # the plain tiny preset, spelled out: 2048 vocab, d 128, 4 layers, 4 heads / 1 kv, ffn 256, 8 experts
        assert (m["vocab_size"], m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"],
                m["ffn_dim"], m["n_experts"], m["top_k"]) == (2048, 128, 4, 4, 1, 256, 8, 2)
        per_layer = (128 * 128 + 2 * 128 * 32 + 128 * 128) + 2 * 128 + 8 * 128 + 8 * 3 * 128 * 256
        assert c["total_params"] == 2 * 2048 * 128 + 128 + 4 * per_layer


def test_plan_text_output(capsys):
    assert main(["plan", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "moekit plan: tiny" in out.splitlines()[0]
    assert "total / active / shared parameters" in out and "decode bound" in out


@pytest.mark.parametrize("argv", [
    ["plan", "nope"],
    ["plan", "tiny", "--model-top-k", "9"],  # tiny has 8 experts
    ["plan", "mixtral-8x7b", "--model-top-k", "12"],
    ["plan", "tiny", "--model-n-heads", "3"],  # 128 is not divisible by 3
    ["plan", "gpt4-16x111b", "--model-n-heads", "7", "--json"],
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("moekit plan: error:")
    assert "Traceback" not in captured.err


def test_unknown_preset_error_names_the_choices(capsys):
    assert main(["plan", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and all(name in err for name in PRESETS)


def test_module_entry_point_bad_preset_exits_2():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "moekit", "plan", "nope"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moekit plan: error:")
    assert "Traceback" not in proc.stderr
