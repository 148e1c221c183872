"""Hugging Face interop against transformers itself: tiny random Llama / Mistral / Mixtral / OLMoE /
Qwen2-MoE models built and saved by transformers (no hub, no network) must give the same logits and
the same greedy tokens in moekit; moekit -> HF -> moekit is bitwise; sharded exports load in
transformers; the fused expert layout of transformers 5 is read; `moekit convert` / `generate` on
HF dirs. Upcycling and malformed checkpoints: test_interop_upcycle.py.
"""

from __future__ import annotations

import json

import pytest
import torch

T = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.errors import CheckpointError, ConfigError  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.generate import generate  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.interop.convert import convert_to_hf, model_from_source  # noqa: E402
from moekit.interop.hf import load_hf  # noqa: E402
from moekit.model.transformer import build_model  # noqa: E402

from interop_helpers import (ARCHS, ATOL, COMMON, ROUNDTRIP, VOCAB, make_run,  # noqa: E402
                             max_diff, moekit_cfg, one_error_line, randomize, run_state, tokens)


# -- 1. logits parity -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_transformers(hf_dirs, name):
    ref, d = hf_dirs[name]
    model, tk = model_from_source(d)
    model.eval()
    assert tk.eot_id is not None
    x = tokens(1)
    with torch.no_grad():
        want, got = ref(x).logits, model(x).logits
    assert got.shape == want.shape == (2, 20, VOCAB)
    assert want.abs().max() > 0.5  # the comparison is not between near-zero outputs
    assert max_diff(got, want) <= ATOL


def test_config_mapping(hf_dirs):
    """Fields that the logits alone would not pin down."""
    cfg, _ = load_hf(hf_dirs["llama-tied"][1])
    assert cfg.tie_embeddings and cfg.n_experts == 1
    cfg, _ = load_hf(hf_dirs["llama-linear-rope-hd32"][1])
    assert (cfg.hd, cfg.rope_scaling, cfg.rope_theta) == (32, 2.0, 5000.0)
    cfg, _ = load_hf(hf_dirs["mixtral"][1])
    assert (cfg.n_experts, cfg.top_k, cfg.renorm_gates, cfg.ffn_dim) == (4, 2, True, 96)
    cfg, _ = load_hf(hf_dirs["olmoe"][1])
    assert cfg.qk_norm and not cfg.renorm_gates
    cfg, _ = load_hf(hf_dirs["qwen2-moe-sparse2"][1])
    assert (cfg.moe_every, cfg.shared_expert_ffn, cfg.ffn_dim, cfg.dense_hidden, cfg.attn_bias, cfg.renorm_gates) \
        == (2, 80, 48, 96, True, True)
    assert [cfg.is_moe_layer(i) for i in range(2)] == [False, True]


def test_mistral_sliding_window_caps_context(tmp_path, hf_tok):
    """Full attention equals sliding-window attention up to the window: the context is capped there."""
    torch.manual_seed(0)
    ref = randomize(T.MistralForCausalLM(T.MistralConfig(**{**COMMON, "sliding_window": 16}))).eval()
    ref.save_pretrained(tmp_path / "m")
    hf_tok.save(tmp_path / "m" / "tokenizer.json")
    model, _ = model_from_source(tmp_path / "m")
    assert model.cfg.max_seq_len == 16
    x = tokens(2, (2, 16))
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, ref(x).logits) <= ATOL


# -- 2. greedy generation ---------------------------------------------------------------------

@torch.no_grad()
def hf_greedy(ref, prompt: torch.Tensor, n: int = 12) -> torch.Tensor:
    return ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_generation_matches_transformers(hf_dirs, name):
    ref, d = hf_dirs[name]
    model, _ = model_from_source(d)
    prompt = tokens(3, (2, 8))
    want = hf_greedy(ref, prompt)
    got = generate(model, prompt, 12, temperature=0)
    assert want.shape == (2, 20)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["qwen2-moe"])
def test_engine_greedy_matches_transformers(hf_dirs, name):
    ref, d = hf_dirs[name]
    model, _ = model_from_source(d)
    prompt = tokens(4, (2, 8))
    want = hf_greedy(ref, prompt)[:, 8:].tolist()
    engine = Engine(model, None, EngineConfig(kv_budget="4MiB", block_size=4, cuda_graphs=False))
    outs = engine.generate([p.tolist() for p in prompt], SamplingParams(max_tokens=12, temperature=0))
    assert [o.output_token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)


# -- 3. export: bitwise round trip, sharding, transformers loads it -----------------------------



@pytest.mark.parametrize("name", list(ROUNDTRIP))
def test_to_hf_from_hf_is_bitwise(runs, tmp_path, name):
    cfg, arch = ROUNDTRIP[name]
    out = convert_to_hf(runs[name], tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == arch
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    cfg2, sd2 = load_hf(out)
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "hd", "ffn_dim", "dense_hidden",
                  "n_experts", "top_k", "moe_every", "shared_expert_ffn", "qk_norm", "attn_bias", "max_seq_len",
                  "rope_theta", "rope_scaling", "tie_embeddings", "norm_eps"):
        assert getattr(cfg2, field) == getattr(cfg, field), field
    if cfg.n_experts > 1:
        assert cfg2.renorm_gates == cfg.renorm_gates
    sd = run_state(runs[name])
    assert set(sd2) == set(sd)
    for k, v in sd.items():
        assert sd2[k].dtype == v.dtype and torch.equal(sd2[k], v), k


@pytest.mark.parametrize("name", list(ROUNDTRIP))
def test_transformers_loads_export(runs, tmp_path, name):
    out = convert_to_hf(runs[name], tmp_path / "hf")
    ref = T.AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = model_from_source(runs[name])
    x = tokens(5)
    with torch.no_grad():
        want = ref(x).logits
        got = model.eval()(x).logits
    assert max_diff(got, want) <= ATOL


def test_sharded_export(runs, tmp_path):
    run = runs["mixtral-like"]
    out = convert_to_hf(run, tmp_path / "hf", max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3 and not (out / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    on_disk = {}
    for s in shards:
        on_disk.update(load_file(str(out / s)))
    assert set(index["weight_map"]) == set(on_disk)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    # moekit reads it back bitwise, transformers loads it with the same logits
    _, sd2 = load_hf(out)
    sd = run_state(run)
    assert all(torch.equal(sd2[k], v) for k, v in sd.items())
    ref = T.AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = model_from_source(run)
    x = tokens(6)
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, ref(x).logits) <= ATOL
    # a shard the index names is gone: one error, no traceback
    (out / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_hf(out)


def test_reads_transformers_sharded_checkpoint(hf_dirs, tmp_path, hf_tok):
    ref, _ = hf_dirs["qwen2-moe-sparse2"]
    d = tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="60KB")
    hf_tok.save(d / "tokenizer.json")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    model, _ = model_from_source(d)
    x = tokens(11)
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, ref(x).logits) <= ATOL


UNREPRESENTABLE = {
    # configs that no supported HF architecture holds: export must refuse, not drop tensors
    "qk-norm+shared-expert": moekit_cfg(qk_norm=True, shared_expert_ffn=80),
    "qk-norm+attn-bias": moekit_cfg(qk_norm=True, attn_bias=True),
    "qk-norm+moe-every-2": moekit_cfg(qk_norm=True, shared_expert_ffn=80, moe_every=2),
    "dense+qk-norm": moekit_cfg(n_experts=1, top_k=1, qk_norm=True),
    "dense+attn-bias": moekit_cfg(n_experts=1, top_k=1, attn_bias=True),
}


@pytest.mark.parametrize("name", list(UNREPRESENTABLE))
def test_export_refuses_configs_no_hf_arch_holds(hf_tok, tmp_path, name):
    cfg = UNREPRESENTABLE[name]
    run = make_run(cfg, hf_tok, tmp_path / "run")
    try:
        out = convert_to_hf(run, tmp_path / "hf")
    except ConfigError:
        return  # refusing is fine
    _, sd2 = load_hf(out)  # else the export must be lossless
    sd = run_state(run)
    assert set(sd2) == set(sd)
    assert all(torch.equal(sd2[k], v) for k, v in sd.items())


def test_export_refuses_dense_between_moe_without_shared_expert(hf_tok, tmp_path):
    run = make_run(moekit_cfg(moe_every=2), hf_tok, tmp_path / "run")
    with pytest.raises(ConfigError, match="shared expert"):
        convert_to_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.*"))  # no temp dir left behind


# -- 4. fused expert layout (transformers 5 in memory) ------------------------------------------

@pytest.mark.parametrize("name", [
    "mixtral",
    "olmoe", "qwen2-moe", "qwen2-moe-sparse2"])
def test_fused_expert_layout(hf_dirs, tmp_path, name):
    ref, _ = hf_dirs[name]
    sd = ref.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)  # really the fused layout
    d = tmp_path / "fused"
    ref.config.save_pretrained(d)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    cfg, msd = load_hf(d)
    model = build_model(cfg)
    model.load_state_dict(msd)
    x = tokens(7)
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, ref(x).logits) <= ATOL


def test_fused_layout_matches_per_expert_bitwise(hf_dirs, tmp_path):
    ref, d = hf_dirs["qwen2-moe"]
    fused = tmp_path / "fused"
    ref.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(fused / "model.safetensors"))
    _, a = load_hf(d)
    _, b = load_hf(fused)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- 5. CLI ------------------------------------------------------------------------------------

def test_cli_convert_and_generate(hf_dirs, tmp_path, capsys):
    _, d = hf_dirs["qwen2-moe"]
    run, out2 = tmp_path / "run", tmp_path / "hf-again"
    assert main(["convert", "--from-hf", str(d), "--out", str(run)]) == 0
    assert str(run) in capsys.readouterr().out
    gen = ["--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "--kv-budget", "4MiB"]
    assert main(["generate", "the quick", "--ckpt", str(run), *gen]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", "the quick", "--ckpt", str(d), *gen]) == 0
    from_hf = capsys.readouterr().out
    assert from_run == from_hf and from_run.startswith("the quick")
    # the converted run holds exactly the HF weights
    _, sd_hf = load_hf(d)
    assert all(torch.equal(run_state(run)[k], v) for k, v in sd_hf.items())

    assert main(["convert", "--to-hf", str(run), "--out", str(out2)]) == 0
    capsys.readouterr()
    _, sd2 = load_hf(out2)
    assert all(torch.equal(sd2[k], v) for k, v in sd_hf.items())
    assert main(["generate", "the quick", "--ckpt", str(out2), *gen]) == 0
    assert capsys.readouterr().out == from_run

    # non-empty / already used outputs
    assert main(["convert", "--to-hf", str(run), "--out", str(out2)]) == 2
    assert "not empty" in one_error_line(capsys, "convert")
    assert main(["convert", "--from-hf", str(d), "--out", str(run)]) == 2
    assert "already holds checkpoints" in one_error_line(capsys, "convert")


def test_cli_convert_bad_arguments(hf_dirs, runs, tmp_path, capsys):
    _, d = hf_dirs["llama"]
    assert main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one" in one_error_line(capsys, "convert")
    assert main(["convert", "--from-hf", str(d), "--to-hf", str(runs["dense"]), "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "convert")
    assert main(["convert", "--to-hf", str(d), "--out", str(tmp_path / "x")]) == 2
    assert "already a Hugging Face directory" in one_error_line(capsys, "convert")
    assert main(["convert", "--from-hf", str(runs["dense"]), "--out", str(tmp_path / "x")]) == 2
    assert "not a Hugging Face model directory" in one_error_line(capsys, "convert")
    assert not (tmp_path / "x").exists()
