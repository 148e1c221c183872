"""Hugging Face interop against transformers itself: tiny random Llama / Mistral / Mixtral / OLMoE /
Qwen2-MoE models built and saved by transformers (no hub, no network) must give the same logits and
the same greedy tokens in moekit; moekit -> HF -> moekit is bitwise; sharded exports load in
transformers; the fused expert layout of transformers 5 is read; `moekit convert` / `upcycle` /
`generate` on HF dirs; sparse upcycling keeps the dense function; malformed checkpoints are one
clear error naming the tensor or field.

Every parameter of the reference models is randomised (norm weights around 1, biases non-zero,
routers sharp) so that a swapped, transposed or dropped tensor shows in the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

T = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.data.tokenizer import train_tokenizer  # noqa: E402
from moekit.errors import CheckpointError, ConfigError  # noqa: E402
from moekit.infer.engine import Engine, EngineConfig  # noqa: E402
from moekit.infer.generate import generate  # noqa: E402
from moekit.infer.sampling import SamplingParams  # noqa: E402
from moekit.interop.convert import convert_to_hf, model_from_source, save_as_run, upcycle  # noqa: E402
from moekit.interop.hf import load_hf, save_hf  # noqa: E402
from moekit.model.transformer import build_model  # noqa: E402
from moekit.train import checkpoint as ckpt_io  # noqa: E402

VOCAB = 320
ATOL = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
MOE = dict(num_experts_per_tok=2)
QWEN = dict(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80, **MOE)

# name -> (config class, model class, extra config fields)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-linear-rope-hd32": ("LlamaConfig", "LlamaForCausalLM",
                               dict(head_dim=32, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 5000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **MOE)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, **MOE)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", QWEN),
    "qwen2-moe-sparse2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                          dict(decoder_sparse_step=2, norm_topk_prob=True, **QWEN)),
}
MOE_ARCHS = ("mixtral", "olmoe", "qwen2-moe")

TEXTS = ["the quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "hello world, this is a tiny corpus for a tiny tokenizer.", "a stitch in time saves nine."] * 4


# -- helpers ----------------------------------------------------------------------------------

@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: 1-D weights (norms) 1 + noise, biases noise, matrices std 0.1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if name.endswith("bias"):
            p.copy_(0.1 * r)
        elif p.dim() == 1:
            p.copy_(1.0 + 0.2 * r)
        else:
            p.copy_(0.1 * r)
    return model


def hf_model(name: str, seed: int = 0):
    cfg_cls, model_cls, extra = ARCHS[name]
    torch.manual_seed(seed)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**COMMON, **extra))
    return randomize(model, seed).eval()


def tokens(seed: int, shape=(2, 20)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"moekit {command}: error: "), err
    return err


def moekit_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, n_experts=4,
                top_k=2, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


def make_run(cfg: ModelConfig, tok, out: Path, seed: int = 0) -> Path:
    model = randomize(build_model(cfg), seed)
    save_as_run(model, tok, out)
    return out


def run_state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_io.resolve_checkpoint(run) / "model.safetensors"))


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tok):
    """name -> (HF model in memory, its save_pretrained dir with a tokenizer.json)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, name in enumerate(ARCHS):
        model = hf_model(name, seed=i)
        d = root / name
        model.save_pretrained(d)
        tok.save(d / "tokenizer.json")
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


def test_mistral_sliding_window_caps_context(tmp_path, tok):
    """Full attention equals sliding-window attention up to the window: the context is capped there."""
    torch.manual_seed(0)
    ref = randomize(T.MistralForCausalLM(T.MistralConfig(**{**COMMON, "sliding_window": 16}))).eval()
    ref.save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m" / "tokenizer.json")
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

ROUNDTRIP = {
    # name -> (moekit config, the HF architecture it exports as)
    "mixtral-like": (moekit_cfg(ffn_dim=96), "mixtral"),
    "mixtral-rope-hd": (moekit_cfg(head_dim=32, rope_scaling=2.0, rope_theta=5e5, n_kv_heads=1), "mixtral"),
    "dense": (moekit_cfg(n_experts=1, top_k=1, ffn_dim=96), "llama"),
    "dense-tied": (moekit_cfg(n_experts=1, top_k=1, ffn_dim=96, tie_embeddings=True), "llama"),
    "shared-expert": (moekit_cfg(shared_expert_ffn=80, attn_bias=True, moe_every=2, dense_ffn_dim=96,
                                 renorm_gates=False, n_layers=4), "qwen2_moe"),
    "qk-norm": (moekit_cfg(qk_norm=True, renorm_gates=False), "olmoe"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(cfg, tok, root / name, seed=i) for i, (name, (cfg, _)) in enumerate(ROUNDTRIP.items())}


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


def test_reads_transformers_sharded_checkpoint(hf_dirs, tmp_path, tok):
    ref, _ = hf_dirs["qwen2-moe-sparse2"]
    d = tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="60KB")
    tok.save(d / "tokenizer.json")
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
def test_export_refuses_configs_no_hf_arch_holds(tok, tmp_path, name):
    cfg = UNREPRESENTABLE[name]
    run = make_run(cfg, tok, tmp_path / "run")
    try:
        out = convert_to_hf(run, tmp_path / "hf")
    except ConfigError:
        return  # refusing is fine
    _, sd2 = load_hf(out)  # else the export must be lossless
    sd = run_state(run)
    assert set(sd2) == set(sd)
    assert all(torch.equal(sd2[k], v) for k, v in sd.items())


def test_export_refuses_dense_between_moe_without_shared_expert(tok, tmp_path):
    run = make_run(moekit_cfg(moe_every=2), tok, tmp_path / "run")
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
def test_upcycle_uses_the_dense_hidden_size(tok, tmp_path):
    run = make_run(moekit_cfg(n_experts=1, top_k=1, ffn_dim=32, dense_ffn_dim=80), tok, tmp_path / "dense")
    dense, _ = model_from_source(run)
    moe, _ = model_from_source(upcycle(run, 3, 2, tmp_path / "up"))
    assert (moe.cfg.ffn_dim, moe.cfg.dense_ffn_dim, moe.cfg.n_experts) == (80, 0, 3)
    x = tokens(12)
    assert max_diff(moe.eval()(x).logits, dense.eval()(x).logits) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_scaled_rope_matches_transformers_both_ways(tok, tmp_path, kind):
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
    tok.save(src / "tokenizer.json")
    model, _ = model_from_source(src)
    assert model.cfg.rope_type == kind and model.cfg.rope_scaling == 4.0
    idx = torch.randint(0, 320, (2, 100))  # beyond the original 32 positions
    with torch.no_grad():
        assert (model(idx).logits - hf(idx).logits).abs().max() <= 1e-4
    run = tmp_path / "run"
    from moekit.interop.convert import convert_to_hf, save_as_run

    save_as_run(model, tok, run)
    out = convert_to_hf(run, tmp_path / "back")
    again = T.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (again(idx).logits - hf(idx).logits).abs().max() <= 1e-4
