"""Tile choice of the fused decode kernels inside the decode graph they run in.

Triton's autotuner times each kernel alone, on a cold cache. Inside a decode step the kernels
overlap (programmatic dependent launch places a kernel's programs while the one before runs, and
they load what no kernel of the step writes before they wait), so the tile that is fastest alone
is not always the one that makes the step fastest. This refines the autotuner's choice kernel by
kernel: for each tuned kernel and weight shape, every tile it may take is put in the tuner's
cache, the decode graph is captured again and replayed, and the tile of the fastest step stays
(one kernel at a time, the others at their best so far).

A tile changes how a projection splits its sums, so the chosen tiles give other logits in the
last bits than the autotuner's would (each tile's numbers are still the same for every batch and
every run); the engine keeps whatever tiles are in the tuners' caches when a graph is captured.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Callable

from moekit.infer import fused_decode as fd

TUNERS = ("_norm_linear_rope", "_norm_linear_accum", "_norm_linear_store", "_expert_up_tuned", "_expert_down_tuned")


def _candidates(tuner, key) -> list:
    """The tiles the tuner may take for this key (its pruning applied, as for the autotuner)."""
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if prune is not None and len(key) >= 2:  # the decode kernels are keyed by their two widths
        configs = prune(configs, {"K": key[0], "N": key[1]})
    return configs


def replay_ms(replay: Callable[[], None], warmup: int = 3, iters: int = 30) -> float:
    """Median milliseconds of replay() (a CUDA graph's, or any GPU work), timed with CUDA events
    after warm-up."""
    import statistics

    import torch

    for _ in range(warmup):
        replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _drain() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tune_in_graph(step_ms: Callable[[], float], min_gain: float = 0.002,
                  log: Callable[[str], None] = print, only: Callable[[str, tuple], bool] | None = None) -> dict:
    """step_ms(): capture the decode graph again with the tuners' caches as they are and return
    the milliseconds of one replay (a real row staged). Returns {kernel: {key: (tile, ms before,
    ms after)}, "start_ms": ..., "final_ms": ...}; the tuners' caches keep the chosen tiles, and
    the last step_ms() call captures the graph with them (final_ms). A tile replaces the current
    one only when the step is faster by more than min_gain (a fraction), which keeps timing
    noise from moving the choice. only(kernel, key): which keys to tune (default: all; a key
    whose kernel the timed step does not run would only cost time)."""
    best_ms = start = step_ms()
    log(f"graph tuning: step {best_ms:.4f} ms with the autotuner's tiles")
    out: dict = {"start_ms": start}
    for name in TUNERS:
        tuner = getattr(fd, name)
        for key, current in list(tuner.cache.items()):
            if only is not None and not only(name, key):
                continue
            before, best = best_ms, current
            for cfg in _candidates(tuner, key):
                if str(cfg) == str(current):
                    continue
                tuner.cache[key] = cfg
                try:
                    ms = step_ms()
                except Exception as e:  # a tile this kernel cannot take here (resources): skip it
                    log(f"  {name}: {cfg} failed: {type(e).__name__}")
                    _drain()  # what the failed step launched ends before the next one starts
                    continue
                if ms < best_ms * (1 - min_gain):
                    best_ms, best = ms, cfg
            tuner.cache[key] = best
            mine = out.setdefault(name, {})
            label = str(key[:2])  # the widths; keys that differ only in dtypes are numbered
            mine[label if label not in mine else f"{label} #{len(mine)}"] = (str(best), before, best_ms)
            log(f"  {name}{tuple(key[:2])}: {best} ({before:.4f} -> {best_ms:.4f} ms)")
    out["final_ms"] = step_ms()  # the graph captured again with every chosen tile
    log(f"graph tuning: step {out['final_ms']:.4f} ms with the chosen tiles")
    return out


def model_widths(model) -> set[tuple[int, int]]:
    """The (input, output) widths of a model's tuned decode kernels: QKV, output projection, LM
    head, the experts' up and down projections (the tuners' keys begin with them)."""
    c, ffn = model.cfg, model.blocks[0].ffn.experts.w1.shape[-1]
    return {(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.hd), (c.n_heads * c.hd, c.d_model),
            (c.d_model, c.vocab_size), (c.d_model, ffn), (ffn, c.d_model)}


# -- chosen tiles kept on disk, per GPU and library versions ------------------------------------------
def tiles_path() -> Path:
    """Where chosen tiles are kept: $MOEKIT_CACHE (as the data pipeline's cache) or ~/.cache/moekit."""
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "decode_tiles.json"


def machine_key() -> str:
    """The GPU and the library versions the tiles were timed with: tiles are kept per machine key."""
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{gpu} | torch {torch.__version__} | triton {triton.__version__}"


def _read(path: Path) -> dict:
    """The tile file's contents; a missing, unreadable or damaged file holds nothing."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_tiles(path: Path, machine: str, only: Callable[[str, tuple], bool] | None = None) -> int:
    """Write the tuners' current tiles (those only() accepts) under machine in the JSON file at path,
    beside what it holds for other machines and keys; the file is replaced in one rename (from a
    file of this process's own). Returns the number of tiles written."""
    import tempfile

    path = Path(path)
    data = _read(path)
    mine = data.setdefault(machine, {})
    n = 0
    for name in TUNERS:
        for key, cfg in getattr(fd, name).cache.items():
            if only is None or only(name, key):
                mine.setdefault(name, {})[repr(tuple(key))] = {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps,
                                                               "num_stages": cfg.num_stages}
                n += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    fd_, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd_, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def load_tiles(path: Path, machine: str, only: Callable[[str, tuple], bool] | None = None) -> set:
    """Put the tiles kept under machine (those only() accepts) into the tuners' caches: the
    autotuner then takes them instead of timing. A tile the kernel can no longer take (another
    version of it, another tuning mode) or an entry that does not parse is passed over. Returns
    the (kernel, key) pairs put."""
    import triton

    put = set()
    tiles_by_kernel = _read(path).get(machine, {})
    for name, tiles in tiles_by_kernel.items() if isinstance(tiles_by_kernel, dict) else ():
        tuner = getattr(fd, name, None)
        if name not in TUNERS or tuner is None or not isinstance(tiles, dict):
            continue
        for key_repr, t in tiles.items():
            try:
                key = ast.literal_eval(key_repr)
                cfg = triton.Config(dict(t["kwargs"]), num_warps=int(t["num_warps"]), num_stages=int(t["num_stages"]))
            except (ValueError, SyntaxError, KeyError, TypeError):
                continue
            if not isinstance(key, tuple) or (only is not None and not only(name, key)):
                continue
            if str(cfg) in {str(c) for c in _candidates(tuner, key)}:
                tuner.cache[key] = cfg
                put.add((name, key))
    return put
