"""Shared setup of the Hugging Face interop tests (test_interop.py, test_interop_upcycle.py): tiny
random transformers models of each supported architecture, saved without the hub; moekit runs to
export; helpers to compare them.

Every parameter of the reference models is randomised (norm weights around 1, biases non-zero,
routers sharp) so that a swapped, transposed or dropped tensor shows in the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

T = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from moekit.config import ModelConfig  # noqa: E402
from moekit.interop.convert import save_as_run  # noqa: E402
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
