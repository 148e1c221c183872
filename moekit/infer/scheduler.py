"""Iteration-level scheduler: continuous batching with chunked prefill under a token budget,
FCFS admission, preemption by recompute when KV blocks run out. Pure Python; no tensors."""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from moekit.infer.kv_cache import BlockAllocator
from moekit.infer.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    # prefix caching: full blocks registered so far, and the key id of the last (BlockAllocator.register)
    num_registered: int = 0
    cache_parent: int = 0
    # engine-side state (generator, detokenizer, timings) lives in `extra`
    extra: dict = field(default_factory=dict)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class ScheduledBatch:
    items: list[tuple[Request, int]]  # (request, tokens to compute this step); decodes (1 token) first
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048):
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # prefix caching: tokens of newly admitted requests (not their recomputes after a
        # preemption), and those found in the cache
        self.prefix_query_tokens = self.prefix_hit_tokens = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, req: Request, n: int) -> int:
        """New KV blocks the request needs to compute n more tokens."""
        return self._new_blocks(req.num_computed + n, len(req.blocks))

    def _new_blocks(self, positions: int, held: int) -> int:
        """Blocks to add to `held` ones for K/V at `positions` positions."""
        return max(0, math.ceil(positions / self.block_size) - held)

    def _register(self, req: Request) -> None:
        """Make the request's full, computed blocks findable by later requests (prefix caching)."""
        if self.allocator.caching:
            done = min(req.num_computed, req.num_tokens) // self.block_size
            if done > req.num_registered:
                req.cache_parent = self.allocator.register(req.blocks, req.all_ids[:done * self.block_size],
                                                           self.block_size, req.num_registered, req.cache_parent)
                req.num_registered = done

    def _release(self, req: Request) -> None:
        self._register(req)
        # last block first: the cache reuses the least recently freed, so a prefix's tail goes
        # before its head (a chain without its head is never found again)
        self.allocator.free(req.blocks[::-1])
        req.blocks, req.num_registered, req.cache_parent = [], 0, 0

    def _preempt(self, req: Request) -> None:
        """Free the request's blocks; it goes back to the head of the queue and recomputes (what
        is left of its blocks in the prefix cache, it finds there)."""
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        self._release(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        for req in self.running:
            self._register(req)
        # 1. running requests, oldest first; the newest are preempted when blocks run out
        for req in list(self.running):
            if req.status is not Status.RUNNING or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            need = self.blocks_needed(req, n)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            req.blocks += self.allocator.allocate(need)
            items.append((req, n))
            budget -= n
        # 2. admit waiting requests in arrival order (FCFS: the head waits rather than being overtaken)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            # a prefix in the cache is not computed again (at least the last token is)
            hit = (self.allocator.match(req.all_ids, self.block_size, (req.num_tokens - 1) // self.block_size)
                   if self.allocator.caching else [])
            cached = len(hit) * self.block_size
            n = min(req.num_tokens - cached, budget)
            need = self._new_blocks(cached + n, len(hit))
            if need + self.allocator.num_reclaimed(hit) > self.allocator.num_free:
                break
            self.waiting.popleft()
            self.allocator.acquire(hit)
            req.blocks = hit + self.allocator.allocate(need)
            req.num_computed, req.num_registered = cached, len(hit)
            req.cache_parent = self.allocator.key_id(hit[-1]) if hit else 0
            if hit:
                req.extra["draft_computed"] = 0  # a draft model's K/V there may not be its own: recomputed
            if self.allocator.caching and not req.num_preemptions:  # new requests (not their recomputes)
                self.prefix_query_tokens += req.num_tokens
                self.prefix_hit_tokens += cached
            req.status = Status.RUNNING
            self.running.append(req)
            items.append((req, n))
            budget -= n
        items.sort(key=lambda it: it[1] != 1)  # single-token (decode) rows first, order kept otherwise
        return ScheduledBatch(items, preempted)
