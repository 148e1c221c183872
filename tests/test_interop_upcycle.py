"""Sparse upcycling keeps the dense function (runs and HF dirs, the CLI), and malformed checkpoints
are one clear error naming the tensor or field (interop_helpers.py builds the models).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

T = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.errors import CheckpointError, ConfigError  # noqa: E402
from moekit.interop.convert import convert_to_hf, model_from_source, upcycle  # noqa: E402
from moekit.interop.hf import save_hf  # noqa: E402
from moekit.train import checkpoint as ckpt_io  # noqa: E402

from interop_helpers import (ROUNDTRIP, make_run,  # noqa: E402
                             max_diff, moekit_cfg, one_error_line, run_state, tokens)


# -- 6. upcycling ------------------------------------------------------------------------------

@torch.no_grad()
def test_upcycle_dense_run_keeps_the_function(runs, tmp_path):
    dense, _ = model_from_source(runs["dense"])
    out = upcycle(runs["dense"], 4, 2, tmp_path / "up", noise=0)
    moe, _ = model_from_source(out)
    assert (moe.cfg.n_experts, moe.cfg.top_k, moe.cfg.ffn_dim, moe.cfg.renorm_gates) == (4, 2, 96, True)
    assert all(b.is_moe for b in moe.blocks)
    w1 = moe.blocks[0].ffn.experts.w1
    assert all(torch.equal(w1[e], dense.blocks[0].ffn.w1.weight.t()) for e in range(4))
    x = tokens(8)
    want = dense.eval()(x).logits
    assert max_diff(moe.eval()(x).logits, want) <= 1e-5
    # noise > 0: the experts differ, and so does the function
    noisy, _ = model_from_source(upcycle(runs["dense"], 4, 2, tmp_path / "noisy", noise=0.1))
    assert max_diff(noisy.eval()(x).logits, want) > 1e-3
    assert not torch.equal(noisy.blocks[0].ffn.experts.w1[0], noisy.blocks[0].ffn.experts.w1[1])


@torch.no_grad()
def test_upcycle_llama_hf_dir_and_export(hf_dirs, tmp_path):
    ref, d = hf_dirs["llama-tied"]
    out = upcycle(d, 4, 2, tmp_path / "up", noise=0, seed=3)
    moe, _ = model_from_source(out)
    assert moe.cfg.tie_embeddings and moe.cfg.n_experts == 4
    x = tokens(9)
    want = ref(x).logits
    assert max_diff(moe.eval()(x).logits, want) <= 1e-5
    # the upcycled MoE exports as Mixtral, and transformers computes the dense function too
    hf = convert_to_hf(out, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["model_type"] == "mixtral"
    mixtral = T.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert max_diff(mixtral(x).logits, want) <= 1e-5


def test_upcycle_errors(hf_dirs, runs, tmp_path):
    with pytest.raises(ConfigError, match="already an MoE"):
        upcycle(hf_dirs["mixtral"][1], 8, 2, tmp_path / "a")
    with pytest.raises(ConfigError, match="already an MoE"):
        upcycle(runs["mixtral-like"], 8, 2, tmp_path / "b")
    with pytest.raises(ConfigError):
        upcycle(runs["dense"], 4, 5, tmp_path / "c")
    with pytest.raises(ConfigError):
        upcycle(runs["dense"], 1, 1, tmp_path / "d")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        upcycle(runs["dense"], 4, 2, runs["dense"])


def test_cli_upcycle(runs, tmp_path, capsys):
    out = tmp_path / "up"
    assert main(["upcycle", "--dense", str(runs["dense"]), "--experts", "4", "--top-k", "1", "--out", str(out)]) == 0
    assert "--init-from" in capsys.readouterr().out
    moe, _ = model_from_source(out)
    dense, _ = model_from_source(runs["dense"])
    assert (moe.cfg.n_experts, moe.cfg.top_k) == (4, 1)
    x = tokens(10)
    with torch.no_grad():
        assert max_diff(moe.eval()(x).logits, dense.eval()(x).logits) <= 1e-5
    assert main(["upcycle", "--dense", str(out), "--experts", "8", "--out", str(tmp_path / "again")]) == 2
    assert "already an MoE" in one_error_line(capsys, "upcycle")


# -- 7. malformed checkpoints --------------------------------------------------------------------

def _drop_tensor(name: str):
    def mutate(d: Path):
        sd = load_file(str(d / "model.safetensors"))
        del sd[name]
        save_file(sd, str(d / "model.safetensors"))
    return mutate


def _edit_config(**changes):
    def mutate(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is _DELETE:
                del cfg[k]
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return mutate


_DELETE = object()


def _rename_eot(d: Path, new: str) -> None:
    path = d / "tokenizer.json"
    text = path.read_text()
    assert '"<|endoftext|>"' in text
    path.write_text(text.replace('"<|endoftext|>"', json.dumps(new)))

MALFORMED = {
    # case -> (arch, mutation, error class, text the message must contain)
    "missing-tensor": ("llama", _drop_tensor("model.layers.1.self_attn.k_proj.weight"), CheckpointError,
                       "model.layers.1.self_attn.k_proj.weight"),
    "missing-expert": ("mixtral", _drop_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight"),
                       CheckpointError, "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
    "missing-qk-norm": ("olmoe", _drop_tensor("model.layers.1.self_attn.q_norm.weight"), CheckpointError,
                        "model.layers.1.self_attn.q_norm.weight"),
    "missing-bias": ("qwen2-moe", _drop_tensor("model.layers.0.self_attn.v_proj.bias"), CheckpointError,
                     "model.layers.0.self_attn.v_proj.bias"),
    "wrong-hidden-size": ("llama", _edit_config(hidden_size=128), CheckpointError, "embed.weight"),
    "wrong-ffn-size": ("mixtral", _edit_config(intermediate_size=64), CheckpointError, "ffn.experts.w1"),
    "unknown-arch": ("llama", _edit_config(model_type="gpt2"), ConfigError, "'gpt2'"),
    "missing-field": ("llama", _edit_config(num_attention_heads=_DELETE), ConfigError, "'num_attention_heads'"),
    "missing-moe-field": ("mixtral", _edit_config(num_local_experts=_DELETE), ConfigError, "'num_local_experts'"),
    "missing-qwen-field": ("qwen2-moe", _edit_config(moe_intermediate_size=_DELETE), ConfigError,
                           "'moe_intermediate_size'"),
    "rope-longrope": ("llama", _edit_config(rope_parameters={"rope_type": "longrope", "factor": 4.0,
                                                             "rope_theta": 1e4}),
                      ConfigError, "'longrope'"),
    "rope-legacy-dynamic": ("llama", _edit_config(rope_parameters=_DELETE, rope_theta=1e4,
                                                  rope_scaling={"type": "dynamic", "factor": 2.0}),
                            ConfigError, "'dynamic'"),
    "gelu": ("llama", _edit_config(hidden_act="gelu"), ConfigError, "'gelu'"),
    "attention-bias": ("llama", _edit_config(attention_bias=True), ConfigError, "attention_bias"),
    "olmoe-clip-qkv": ("olmoe", _edit_config(clip_qkv=8.0), ConfigError, "clip_qkv"),
    "qwen-mlp-only-layers": ("qwen2-moe", _edit_config(mlp_only_layers=[0]), ConfigError, "mlp_only_layers"),
    "no-tokenizer": ("llama", lambda d: (d / "tokenizer.json").unlink(), CheckpointError, "tokenizer.json"),
    "no-eos-in-tokenizer": ("llama", lambda d: _rename_eot(d, "<|junk|>"), ConfigError, "end-of-text"),
    "no-weights": ("llama", lambda d: (d / "model.safetensors").unlink(), CheckpointError, "model.safetensors"),
    "truncated-weights": ("llama", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), CheckpointError, "cannot read the weights"),
    "bad-config-json": ("llama", lambda d: (d / "config.json").write_text("{not json"), CheckpointError,
                        "config.json"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_one_clear_error(hf_copy, tmp_path, capsys, case):
    arch, mutate, err_cls, text = MALFORMED[case]
    d = hf_copy(arch)
    mutate(d)
    with pytest.raises(err_cls) as info:
        model_from_source(d)
    msg = str(info.value)
    assert text in msg and "\n" not in msg, msg
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["convert", "--from-hf", str(d), "--out", str(out)]) == 2
    assert text in one_error_line(capsys, "convert")
    assert not ckpt_io.list_checkpoints(out)
    assert main(["generate", "x", "--ckpt", str(d), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    assert text in one_error_line(capsys, "generate")
    assert main(["upcycle", "--dense", str(d), "--experts", "4", "--out", str(tmp_path / "up")]) == 2
    assert text in one_error_line(capsys, "upcycle")


def test_tied_checkpoint_with_extra_lm_head_is_accepted(hf_copy):
    """Some tied checkpoints also store lm_head.weight: it is ignored, the embedding is the head."""
    d = hf_copy("llama-tied")
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(d / "model.safetensors"))
    model, _ = model_from_source(d)
    assert model.lm_head.weight is model.embed.weight


def test_save_hf_refuses_non_empty_dir(runs, tmp_path):
    cfg = ROUNDTRIP["dense"][0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        save_hf(cfg, run_state(runs["dense"]), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # an existing empty dir is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf(cfg, run_state(runs["dense"]), empty)
    assert (empty / "config.json").is_file()


def test_tokenizer_with_llama_style_eos(hf_copy, capsys):
    """Tokenizers of other families end text with one of EOS_CANDIDATES (here Llama's </s>)."""
    d = hf_copy("llama")
    _rename_eot(d, "</s>")
    _, tk = model_from_source(d)
    assert tk.eot_id == tk.hf.token_to_id("</s>")
    capsys.readouterr()
    assert main(["generate", "hello", "--ckpt", str(d), "--temperature", "0", "--max-new-tokens", "5",
                 "--device", "cpu", "--kv-budget", "4MiB"]) == 0
    assert capsys.readouterr().out.startswith("hello")


@pytest.mark.parametrize("command", ["to-hf", "from-hf", "upcycle"])
def test_out_is_an_existing_file(hf_dirs, runs, tmp_path, capsys, command):
    f = tmp_path / "afile"
    f.write_text("mine")
    argv = {"to-hf": ["convert", "--to-hf", str(runs["dense"])],
            "from-hf": ["convert", "--from-hf", str(hf_dirs["llama"][1])],
            "upcycle": ["upcycle", "--dense", str(runs["dense"]), "--experts", "4"]}[command]
    assert main([*argv, "--out", str(f)]) == 2
    one_error_line(capsys, argv[0])
    assert f.read_text() == "mine"


@torch.no_grad()
def test_upcycle_uses_the_dense_hidden_size(hf_tok, tmp_path):
    run = make_run(moekit_cfg(n_experts=1, top_k=1, ffn_dim=32, dense_ffn_dim=80), hf_tok, tmp_path / "dense")
    dense, _ = model_from_source(run)
    moe, _ = model_from_source(upcycle(run, 3, 2, tmp_path / "up"))
    assert (moe.cfg.ffn_dim, moe.cfg.dense_ffn_dim, moe.cfg.n_experts) == (80, 0, 3)
    x = tokens(12)
    assert max_diff(moe.eval()(x).logits, dense.eval()(x).logits) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_scaled_rope_matches_transformers_both_ways(hf_tok, tmp_path, kind):
    """Context-extended RoPE (position interpolation, YaRN) reads from and writes to transformers."""
    params = {"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0}
    if kind == "yarn":
        params["original_max_position_embeddings"] = 32
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          rope_parameters=params)).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    hf_tok.save(src / "tokenizer.json")
    model, _ = model_from_source(src)
    assert model.cfg.rope_type == kind and model.cfg.rope_scaling == 4.0
    idx = torch.randint(0, 320, (2, 100))  # beyond the original 32 positions
    with torch.no_grad():
        assert (model(idx).logits - hf(idx).logits).abs().max() <= 1e-4
    run = tmp_path / "run"
    from moekit.interop.convert import convert_to_hf, save_as_run

    save_as_run(model, hf_tok, run)
    out = convert_to_hf(run, tmp_path / "back")
    again = T.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(idx).logits - hf(idx).logits).abs().max() <= 1e-4
