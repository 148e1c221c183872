"""moekit.infer.graph_tune: the tile kept for each tuned kernel is the one of the fastest step, a
tile is kept only when it beats the current one by more than the margin, and a tile that fails
is skipped. The step's time is a function of the tuners' caches (no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moekit.infer import fused_decode, graph_tune


class _Tuner(SimpleNamespace):
    pass


@pytest.fixture
def tuners(monkeypatch):
    a = _Tuner(configs=["a1", "a2", "a3"], cache={(64, 32, "bf16"): "a1"})
    b = _Tuner(configs=["b1", "b2", "b3", "b4"], cache={(16, 8): "b1", (32, 8): "b2"},
               early_config_prune=lambda configs, named: [c for c in configs if c != "b4" or named["K"] == 32])
    monkeypatch.setattr(graph_tune, "TUNERS", ("_ta", "_tb"))
    monkeypatch.setattr(fused_decode, "_ta", a, raising=False)
    monkeypatch.setattr(fused_decode, "_tb", b, raising=False)
    return a, b


def test_each_kernel_keeps_the_tile_of_the_fastest_step(tuners):
    a, b = tuners
    cost = {"a1": 5.0, "a2": 3.0, "a3": 4.0, "b1": 2.0, "b2": 2.0, "b3": 1.0, "b4": 0.5}
    tried = []

    def step_ms():
        tried.append((a.cache[(64, 32, "bf16")], b.cache[(16, 8)], b.cache[(32, 8)]))
        if b.cache[(16, 8)] == "b4":
            raise AssertionError("b4 is pruned for K = 16")
        if b.cache[(32, 8)] == "b1":
            raise RuntimeError("out of resources")  # skipped, not kept
        return 100.0 + sum(cost[c] for c in tried[-1])

    out = graph_tune.tune_in_graph(step_ms, min_gain=0.0, log=lambda s: None)
    assert a.cache == {(64, 32, "bf16"): "a2"}
    assert b.cache == {(16, 8): "b3", (32, 8): "b4"}
    assert out["_ta"]["(64, 32)"] == ("a2", 109.0, 107.0)  # (tile, step before, step after)
    assert out["_tb"]["(32, 8)"][0] == "b4" and out["_tb"]["(32, 8)"][2] == 100.0 + 3.0 + 1.0 + 0.5
    # the start, every other tile (pruning applied) once per key, and the chosen tiles captured last
    assert len(tried) == 1 + 2 + 2 + 3 + 1 and tried[-1] == ("a2", "b3", "b4")
    assert out["start_ms"] == 109.0 and out["final_ms"] == 100.0 + 3.0 + 1.0 + 0.5


def test_a_tile_within_the_margin_does_not_replace_the_current_one(tuners):
    a, b = tuners
    cost = {"a1": 1.0, "a2": 0.9, "a3": 1.2, "b1": 0.0, "b2": 0.0, "b3": 0.0, "b4": 0.0}

    def step_ms():
        return 1000.0 + cost[a.cache[(64, 32, "bf16")]]

    graph_tune.tune_in_graph(step_ms, min_gain=0.001, log=lambda s: None)  # 0.1 ms of 1001 is < 0.1 %
    assert a.cache[(64, 32, "bf16")] == "a1"
    graph_tune.tune_in_graph(step_ms, min_gain=0.00005, log=lambda s: None)
    assert a.cache[(64, 32, "bf16")] == "a2"


def test_only_the_keys_asked_for_are_tuned(tuners):
    a, b = tuners
    seen = []

    def step_ms():
        seen.append((a.cache[(64, 32, "bf16")], b.cache[(16, 8)], b.cache[(32, 8)]))
        return 1.0

    graph_tune.tune_in_graph(step_ms, log=lambda s: None, only=lambda name, key: key[:2] == (32, 8))
    assert {row[0] for row in seen} == {"a1"} and {row[1] for row in seen} == {"b1"}
    assert {row[2] for row in seen} == {"b1", "b2", "b3", "b4"}


def test_an_engine_without_the_fused_step_on_graphs_has_nothing_to_tune():
    """On the CPU there is no decode graph: tune_decode says so (None), and warmup with
    tune_decode on does what it did without."""
    import torch

    from moekit.config import ModelConfig
    from moekit.infer.engine import Engine, EngineConfig
    from moekit.infer.sampling import SamplingParams
    from moekit.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48,
                                    n_experts=2, top_k=1, max_seq_len=64))
    eng = Engine(model, None, EngineConfig(kv_budget="1MiB", tune_decode=True))
    assert eng.tune_decode() is None
    eng.warmup()
    out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].output_token_ids) == 3 and not eng.has_unfinished()


def test_chosen_tiles_are_kept_per_machine_and_put_back(tuners, tmp_path):
    """save_tiles writes each tuner's tiles under a machine key (beside other machines' and in one
    rename); load_tiles puts them back into the tuners' caches, only for the keys asked for and
    only tiles the kernel may still take; a damaged file holds nothing."""
    import triton

    a, b = tuners
    ta = triton.Config({"BN": 64, "SPLIT_K": 4}, num_warps=8, num_stages=3)
    tb = triton.Config({"BN": 16}, num_warps=4, num_stages=2)
    a.configs, b.configs = [ta], [tb, triton.Config({"BN": 32}, num_warps=4, num_stages=2)]
    b.early_config_prune = None
    a.cache[(64, 32, "bf16")] = ta
    b.cache.clear()
    b.cache[(16, 8)] = tb
    path = tmp_path / "tiles" / "decode_tiles.json"
    assert graph_tune.save_tiles(path, "gpu-a", only=lambda name, key: key[:2] != (99, 99)) == 2
    assert graph_tune.save_tiles(path, "gpu-b") == 2
    assert not list(path.parent.glob("*.tmp"))
    a.cache.clear()
    b.cache.clear()
    assert graph_tune.load_tiles(path, "gpu-c") == set()  # another machine: nothing
    assert graph_tune.load_tiles(path, "gpu-a", only=lambda name, key: name == "_ta") == {("_ta", (64, 32, "bf16"))}
    assert not b.cache
    cfg = a.cache[(64, 32, "bf16")]
    assert cfg.kwargs == {"BN": 64, "SPLIT_K": 4} and (cfg.num_warps, cfg.num_stages) == (8, 3)
    assert len(graph_tune.load_tiles(path, "gpu-a")) == 2 and b.cache[(16, 8)].num_stages == 2
    b.cache.clear()
    b.configs = [triton.Config({"BN": 32}, num_warps=4, num_stages=2)]  # the kept tile is no longer one of b's
    assert graph_tune.load_tiles(path, "gpu-a") == {("_ta", (64, 32, "bf16"))} and not b.cache
    assert graph_tune.load_tiles(tmp_path / "none.json", "gpu-a") == set()
    path.write_text('{"gpu-a": {"_ta": {"(64,": 1}')  # cut short
    assert graph_tune.load_tiles(path, "gpu-a") == set()
    assert graph_tune.save_tiles(path, "gpu-a") == 1  # written afresh
