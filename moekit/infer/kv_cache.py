"""Paged KV cache: fixed-size blocks in one pre-allocated tensor, a block allocator, sizing."""

from __future__ import annotations

from collections import Counter, OrderedDict, deque

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
    batches write there), so ids 1 .. num_blocks-1 are allocatable. A block may be held by several
    requests (a shared prefix): it is free again when the last one lets it go.

    Prefix caching (caching=True): a full block whose K/V are computed can be registered under
    its contents, the tokens of all blocks before it included (a chain of keys: the id of the
    block before, and this block's tokens). A freed registered block keeps its K/V and stays
    findable (match) until it is reused for other contents, least recently freed first, when
    no never-used block is left. Blocks are shared only whole and are never written again."""

    def __init__(self, num_blocks: int, caching: bool = False):
        if num_blocks < 2:
            raise ConfigError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.caching = num_blocks, caching
        self._free = deque(range(1, num_blocks))
        self._ref: dict[int, int] = {}  # block -> requests holding it
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered, held by none: reusable, LRU first
        self._key: dict[int, tuple] = {}  # registered block -> (id of the key before, its tokens)
        self._by_key: dict[tuple, int] = {}
        self._id: dict[int, int] = {}  # registered block -> the id of its key (never reused)
        self._next_id = 1

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return len(self._ref)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: {n} asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # reuse the least recently freed cached block for new contents
                b, _ = self._cached.popitem(last=False)
                del self._by_key[self._key.pop(b)]
                del self._id[b]
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        if any(self._ref.get(b, 0) < n for b, n in Counter(blocks).items()):
            raise RuntimeError("KV blocks freed twice")
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                del self._ref[b]
                if b in self._key:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # -- prefix caching ----------------------------------------------------------------------------
    def match(self, tokens: list[int], block_size: int, most: int) -> list[int]:
        """The registered blocks holding the longest prefix of tokens, at most `most` blocks (no
        reference taken: see acquire)."""
        out: list[int] = []
        parent = 0
        while self.caching and len(out) < most and (len(out) + 1) * block_size <= len(tokens):
            i = len(out) * block_size
            b = self._by_key.get((parent, tuple(tokens[i:i + block_size])))
            if b is None:
                break
            out.append(b)
            parent = self._id[b]
        return out

    def key_id(self, block: int) -> int:
        """The id of a registered block's key (the parent of the block after it)."""
        return self._id[block]

    def num_reclaimed(self, blocks: list[int]) -> int:
        """How many of these registered blocks acquire would take off the free count."""
        return sum(1 for b in blocks if b in self._cached)

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on each of these registered blocks (from match)."""
        for b in blocks:
            if b in self._cached:
                del self._cached[b]
                self._ref[b] = 1
            else:
                self._ref[b] += 1

    def register(self, blocks: list[int], tokens: list[int], block_size: int, start: int, parent: int) -> int:
        """blocks[i] holds the computed K/V of tokens[i * bs:(i + 1) * bs]: register full blocks
        from index start on, parent being the key id of the block before start (0 at the first).
        Returns the key id of the last full block (the parent of the next call). A block whose
        contents another block already holds stays unregistered; the chain continues through it."""
        for i in range(start, len(tokens) // block_size):
            b = blocks[i]
            if b not in self._key:
                key = (parent, tuple(tokens[i * block_size:(i + 1) * block_size]))
                if key in self._by_key:
                    parent = self._id[self._by_key[key]]
                    continue
                self._key[b], self._by_key[key], self._id[b] = key, b, self._next_id
                self._next_id += 1
            parent = self._id[b]
        return parent


class PagedKVCache:
    """k, v: [n_layers, num_blocks, block_size, n_kv_heads, hd]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype, prefix_caching: bool = False):
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, prefix_caching)


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
