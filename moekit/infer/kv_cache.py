"""Paged KV cache: fixed-size blocks in one pre-allocated tensor, a block allocator, sizing."""

from __future__ import annotations

from collections import deque

import torch

from moekit.config import ModelConfig
from moekit.errors import ConfigError


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys + values of one token over all layers. Multi-query attention stores one K/V head
    instead of n_heads: n_heads times fewer bytes than multi-head attention."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.hd * elem


class BlockAllocator:
    """Hands out block ids. Block 0 is reserved as a scratch block (padding rows of CUDA-graph
    batches write there), so ids 1 .. num_blocks-1 are allocatable."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ConfigError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: {n} asked, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        if len(self._free) + len(blocks) > self.num_blocks - 1:
            raise RuntimeError("KV blocks freed twice")
        self._free.extend(blocks)


class PagedKVCache:
    """k, v: [n_layers, num_blocks, block_size, n_kv_heads, hd]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype):
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)


def num_blocks_for_budget(cfg: ModelConfig, budget: str | float | int, block_size: int,
                          device: torch.device, dtype: torch.dtype) -> int:
    """budget: bytes (int, or a string like "2GiB"), or a fraction of free GPU memory (0 < f <= 1)."""
    if isinstance(budget, str):
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}
        s = budget.strip().lower()
        for u, mult in units.items():
            if s.endswith(u):
                try:
                    budget = int(float(s[: -len(u)]) * mult)
                except (ValueError, OverflowError):
                    raise ConfigError(f"cannot read KV budget {budget!r}") from None
                break
        else:
            try:
                budget = float(s) if "." in s else int(s)
            except (ValueError, OverflowError):
                raise ConfigError(f"cannot read KV budget {budget!r} (bytes like '2GiB' or a fraction like 0.5)") from None
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"a fractional KV budget must be in (0, 1], got {budget}")
        if device.type != "cuda":
            raise ConfigError("a fractional KV budget needs a GPU; give bytes (e.g. 256MiB) on CPU")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * budget)
    per_block = kv_bytes_per_token(cfg, dtype) * block_size
    n = int(budget) // per_block
    if n < 2:
        raise ConfigError(f"KV budget of {budget} bytes holds {n} blocks of {per_block} bytes; need >= 2")
    return n
