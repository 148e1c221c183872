"""KV-cache sizing against closed forms (MQA vs MHA bytes per token, budgets in bytes and units),
and the paged decode reference against a float64 attention over a contiguous copy."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.errors import ConfigError
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.kv_cache import kv_bytes_per_token, num_blocks_for_budget
from moekit.infer.paged_attention import paged_decode_reference
from tests.engine_helpers import BS, get_model, model_cfg

# ------------------------------------------------------------------------------------------------
# KV sizing

ELEM = {torch.float32: 4, torch.bfloat16: 2, torch.float64: 8, torch.float16: 2}


@pytest.mark.parametrize("dtype", list(ELEM))
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_bytes_per_token_closed_form(n_kv_heads, dtype):
    cfg = model_cfg(n_kv_heads=n_kv_heads, n_layers=3)
    head_dim = 64 // 4
    assert kv_bytes_per_token(cfg, dtype) == 2 * 3 * n_kv_heads * head_dim * ELEM[dtype]
    cfg = model_cfg(n_kv_heads=n_kv_heads, head_dim=24)
    assert kv_bytes_per_token(cfg, dtype) == 2 * 2 * n_kv_heads * 24 * ELEM[dtype]


def test_mqa_needs_n_heads_times_fewer_kv_bytes_than_mha():
    for n_heads in (4, 8):
        mha = model_cfg(n_heads=n_heads, n_kv_heads=n_heads)
        mqa = model_cfg(n_heads=n_heads, n_kv_heads=1)
        assert kv_bytes_per_token(mha) == n_heads * kv_bytes_per_token(mqa)


def test_num_blocks_for_budget_parses_sizes():
    cfg = model_cfg()
    dev, dt = torch.device("cpu"), torch.float32
    per_block = 2 * 2 * 1 * 16 * 4 * BS  # 1024 bytes
    for budget, nbytes in [("256KiB", 256 * 1024), ("1MiB", 2**20), (" 2 mib ", 2 * 2**20), ("1GiB", 2**30),
                           ("100kb", 100_000), ("3MB", 3_000_000), ("2.5KiB", 2560), ("4096b", 4096),
                           ("65536", 65536), (65536, 65536), (5000, 5000)]:
        assert num_blocks_for_budget(cfg, budget, BS, dev, dt) == nbytes // per_block, budget
    for bad in ["abc", "12XB", "MiB", "", "1..5MiB", "-1MiB", "1KB", 0, 100, "1.5", "0.5", 0.5, "nanMiB"]:
        with pytest.raises(ConfigError):
            num_blocks_for_budget(cfg, bad, BS, dev, dt)
    with pytest.raises(ConfigError):
        Engine(get_model(), None, EngineConfig(kv_budget="lots", block_size=BS))


@pytest.mark.parametrize("bad", ["infMiB", "1e400KiB"])
def test_num_blocks_for_budget_rejects_infinite_sizes(bad):
    with pytest.raises(ConfigError):
        num_blocks_for_budget(model_cfg(), bad, BS, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_engine_cache_size_matches_budget(n_kv_heads):
    model = get_model(n_kv_heads)
    budget = 100_000
    engine = Engine(model, None, EngineConfig(kv_budget=budget, block_size=BS))
    per_token = 2 * 2 * n_kv_heads * 16 * 8
    n_blocks = budget // (per_token * BS)
    st = engine.stats()
    assert st["kv_bytes_per_token"] == engine.kv_bytes_per_token == per_token
    assert st["kv_blocks_total"] == n_blocks - 1  # block 0 is the reserved scratch block
    assert engine.kv.k.shape == (2, n_blocks, BS, n_kv_heads, 16)
    assert engine.kv.k.nbytes + engine.kv.v.nbytes == n_blocks * BS * per_token <= budget


# ------------------------------------------------------------------------------------------------
# paged decode reference

def _contiguous_attention(q, k_cache, v_cache, table, n):
    """One row, float64, written out: gather the first n positions in order, softmax(q k / sqrt d) v,
    query head h reading K/V head h // (H / Hkv)."""
    H, hd = q.shape
    Hkv = k_cache.shape[2]
    bs = k_cache.shape[1]
    k = torch.stack([k_cache[int(table[p // bs]), p % bs] for p in range(n)]).double()  # [n, Hkv, hd]
    v = torch.stack([v_cache[int(table[p // bs]), p % bs] for p in range(n)]).double()
    out = torch.empty(H, hd, dtype=torch.float64)
    for h in range(H):
        kv = h // (H // Hkv)
        scores = k[:, kv] @ q[h].double() / math.sqrt(hd)  # [n]
        w = torch.exp(scores - scores.max())
        out[h] = (w / w.sum()) @ v[:, kv]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2), (6, 3), (4, 4)], ids=["mqa", "gqa2", "gqa3", "mha"])
def test_paged_decode_reference_matches_contiguous_attention(H, Hkv, dtype):
    g = torch.Generator().manual_seed(100 * H + Hkv)
    num_blocks, bs, hd, B, max_blocks = 48, 4, 8, 7, 9
    k_cache = torch.randn(num_blocks, bs, Hkv, hd, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, hd, generator=g).to(dtype)
    q = torch.randn(B, H, hd, generator=g).to(dtype)
    lens = [1, bs, bs + 1, max_blocks * bs, 17, 30, 2]
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # distinct blocks, never 0
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    for b, n in enumerate(lens):
        used = math.ceil(n / bs)
        tables[b, :used] = torch.tensor([perm.pop() for _ in range(used)], dtype=torch.int32)
        # padding entries point anywhere (0 in the engine); the reference must mask them out
        tables[b, used:] = torch.randint(0, num_blocks, (max_blocks - used,), generator=g, dtype=torch.int32)
    out = paged_decode_reference(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
    assert out.shape == (B, H, hd)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for b, n in enumerate(lens):
        ref = _contiguous_attention(q[b], k_cache, v_cache, tables[b], n)
        torch.testing.assert_close(out[b].double(), ref, atol=tol, rtol=0)
