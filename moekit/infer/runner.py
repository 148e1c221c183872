"""Model runner: turns a scheduled batch into packed tensors, runs the model over the paged KV
cache, returns the logits of the rows that sample. Pure-decode batches on GPU replay CUDA graphs
captured at bucketed batch sizes."""

from __future__ import annotations

import math

import torch

from moekit.infer.kv_cache import PagedKVCache
from moekit.infer.paged_attention import AttentionMetadata, PagedAttentionLayer
from moekit.infer.scheduler import Request, ScheduledBatch
from moekit.model.transformer import Transformer
from moekit.ops.experts import grouped_path_taken

GRAPH_BATCH_SIZES = (1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 128, 256)  # small sizes: speculative verify rows
FUSED_MAX_BATCH = 8  # decode rows through the fused step; above, the grouped-GEMM model path
FUSED_MAX_VERIFY = 40  # speculative verification stays fused up to here: the same numbers as decoding
MAX_DECODE_STEPS = 16  # greedy decode steps one graph may chain (decode_steps)


class ModelRunner:
    def __init__(self, model: Transformer, kv: PagedKVCache, max_model_len: int, max_num_seqs: int,
                 cuda_graphs: bool = True, compile: bool = False, fused: bool = True, max_rows: int = 0,
                 decode_steps: int = 1):
        self.model, self.kv = model, kv
        self.device = next(model.parameters()).device
        self.block_size = kv.block_size
        self.max_blocks = math.ceil(max_model_len / self.block_size)
        # graphs for up to max_rows one-token rows (speculative verification: (k + 1) per request)
        self.graph_sizes = [b for b in GRAPH_BATCH_SIZES if b < 2 * max(max_num_seqs, max_rows)] if (
            cuda_graphs and self.device.type == "cuda") else []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        # speculative verification: exactly n rows on the fused step (up to FUSED_MAX_VERIFY)
        self.verify_graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict]] = {}
        # greedy decoding, several steps chained in one graph (batch size, steps): decode_steps_ahead()
        self.multi_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        if not 1 <= decode_steps <= MAX_DECODE_STEPS:
            raise ValueError(f"decode_steps must be within 1 ... {MAX_DECODE_STEPS}, got {decode_steps}")
        self.decode_steps = decode_steps
        self._stages: list[torch.Tensor] | None = None  # pinned host buffers of the graph inputs
        self._stage_events: list = [None] * _STAGES
        self._stage_i = 0
        self.pool = None
        # the decode graphs' greedy tokens (each row's argmax, int32) [MAX_DECODE_STEPS, rows],
        # written inside the graph: row 0 holds the last step's (the next graph's first step takes
        # its tokens from there: decode_rows(prev_rows=...)), row j + 1 step j's of a graph that
        # chains several; a greedy caller copies them to the host with no kernel between two graphs
        self.greedy_tokens: torch.Tensor | None = None
        # the decode graphs replay a compiled forward: fusing the many small elementwise kernels of
        # a decode step (norms, rotary, routing) is what brings it near the bandwidth limit
        # (static shapes: one compilation per captured batch size, captured on first use)
        self.decode_forward = torch.compile(model, dynamic=False) if compile and self.graph_sizes else model
        # small decode batches run the fused Triton step (moekit.infer.fused_decode) in the graphs
        self.fused = None
        if fused and self.graph_sizes:
            from moekit.infer.fused_decode import FusedDecoder, unsupported_reason

            if unsupported_reason(model) is None:
                self.fused = FusedDecoder(model, kv.k, kv.v)
        # the MoE model path reads group sizes on the host unless it takes the grouped path (bf16 on
        # Hopper): then only the fused step's sizes can be captured
        c, dtype = model.cfg, next(model.parameters()).dtype
        self.model_path_capturable = (self.device.type != "cuda" or not any(b.is_moe for b in model.blocks)
                                      or grouped_path_taken("cuda", dtype, c.d_model, c.ffn_dim, c.expert_impl))
        if compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        2 * len(GRAPH_BATCH_SIZES))

    # -- packing -----------------------------------------------------------------------------
    def _layers(self, meta: AttentionMetadata) -> list[PagedAttentionLayer]:
        return [PagedAttentionLayer(self.kv.k[i], self.kv.v[i], meta) for i in range(self.kv.k.shape[0])]

    def _slots(self, req: Request, start: int, n: int) -> list[int]:
        bs = self.block_size
        return [req.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request]]:
        """Returns logits [n, vocab] for the requests whose computed tokens reach their end."""
        items = batch.items
        if all(n == 1 for _, n in items) and self.graph_fits(len(items)):
            return self._execute_graph(items)
        chunks = [(req, req.num_computed, req.all_ids[req.num_computed:req.num_computed + n]) for req, n in items]
        sample = [req for req, n in items if req.num_computed + n == req.num_tokens]
        ends = [req.num_computed + n == req.num_tokens for req, n in items]
        return self.forward_chunks(chunks, last_of=ends), sample

    @torch.inference_mode()
    def forward_chunks(self, chunks: list[tuple[Request, int, list[int]]], last_of: list[bool] | None = None
                       ) -> torch.Tensor:
        """Run each request's tokens at positions start, start + 1, ... (their K/V land in the
        request's blocks). Returns logits at the last token of the chunks flagged in last_of, or at
        every token when last_of is None: [n, vocab]."""
        num_decode = sum(1 for _, _, toks in chunks if len(toks) == 1)
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][2]) != 1)  # decode rows first
        ids, pos, slots, logit_rows = [], [], [], []
        tables, lens, prefills = [], [], []
        rows_of = {}
        for i in order:
            req, start, toks = chunks[i]
            n = len(toks)
            if n == 1:
                tables.append(req.blocks + [0] * (self.max_blocks - len(req.blocks)))
                lens.append(start + 1)
            else:
                prefills.append((len(ids), n, start, torch.tensor(req.blocks, device=self.device)))
            rows_of[i] = list(range(len(ids), len(ids) + n))
            ids += toks
            pos += range(start, start + n)
            slots += self._slots(req, start, n)
        for i in range(len(chunks)):  # logits come back in the callers' chunk order
            if last_of is None:
                logit_rows += rows_of[i]
            elif last_of[i]:
                logit_rows.append(rows_of[i][-1])
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev), num_decode=num_decode,
            block_tables=torch.tensor(tables or [[0]], device=dev, dtype=torch.int32)[:num_decode],
            context_lens=torch.tensor(lens or [1], device=dev, dtype=torch.int32)[:num_decode],
            prefills=prefills, max_context=max(lens or [1]))
        out = self.model(torch.tensor([ids], device=dev), caches=self._layers(meta),
                         positions=torch.tensor([pos], device=dev),
                         logits_at=torch.tensor(logit_rows, device=dev, dtype=torch.long))
        return out.logits[0]

    # -- CUDA graphs for pure-decode steps ---------------------------------------------------
    # A graph's inputs travel in one int32 row per request, [token, position, slot, context
    # length, block table...], copied to the GPU in one transfer from a pinned buffer; the graph
    # itself unpacks them.
    _META = 4

    def _graph_inputs(self, b: int) -> dict:
        stage = torch.zeros(b, self._META + self.max_blocks, dtype=torch.int32, device=self.device)
        stage[:, 3] = 1  # padding rows: token 0 at position 0 into the scratch block 0, one position
        return {"stage": stage}

    def _run_static(self, buf: dict, fused_max: int = FUSED_MAX_BATCH, greedy: bool = False,
                    steps: int = 1) -> torch.Tensor:
        """The step of the staged rows in buf["stage"]: logits [b, vocab]. greedy (the decode
        graphs): a staged token -1 - j is row j's greedy token of the step before, and the rows'
        greedy tokens are written to self.greedy_tokens. steps: that many greedy steps, one after
        another, on the stage's consecutive blocks of b rows (the logits: the last step's); step j
        reads its tokens from greedy_tokens[j] and writes them to greedy_tokens[(j + 1) % steps]."""
        b = buf["stage"].shape[0] // steps
        for j in range(steps):
            logits = self._static_step(buf["stage"][j * b:(j + 1) * b], fused_max,
                                       self.greedy_tokens[j] if greedy else None)
            if greedy:
                from moekit.infer.triton_argmax import argmax_into  # here: Triton kernels are defined on first use

                argmax_into(logits, self.greedy_tokens[(j + 1) % steps])
        return logits

    def _static_step(self, stage: torch.Tensor, fused_max: int, prev: torch.Tensor | None) -> torch.Tensor:
        b = stage.shape[0]
        tables = stage[:, self._META:]  # rows strided
        if self.fused is not None and b <= fused_max:  # int32 token, position, slot, length: one copy
            logits = self.fused.from_stage(stage, self._META, prev=prev)
        else:
            ids, pos, slots = stage[:, :3].t().long().contiguous()
            if prev is not None:
                ids = torch.where(ids < 0, prev.long()[(-1 - ids).clamp(min=0)], ids)
            lens = stage[:, 3].contiguous()
            meta = AttentionMetadata(slot_mapping=slots, num_decode=b, block_tables=tables, context_lens=lens,
                                     prefills=[], max_context=self.max_blocks * self.block_size)
            logits = self.decode_forward(ids[None], caches=self._layers(meta), positions=pos[None]).logits[0]
        return logits

    @torch.inference_mode()
    def capture_graph(self, b: int, fused_max: int = FUSED_MAX_BATCH, steps: int = 1) -> None:
        """Capture the decode step for batch size b (on first use; all sizes share one memory
        pool); with fused_max = FUSED_MAX_VERIFY a verification graph (self.verify_graphs); with
        steps > 1 that many greedy steps chained (self.multi_graphs)."""
        buf = self._graph_inputs(b * steps)
        greedy = fused_max == FUSED_MAX_BATCH
        if greedy and self.greedy_tokens is None:  # outside the graph's pool: every decode graph shares it
            self.greedy_tokens = torch.zeros(MAX_DECODE_STEPS, self.graph_sizes[-1], dtype=torch.int32,
                                             device=self.device)
        # the warm-up runs write greedy tokens: those of a step launched but not yet read stay
        kept = self.greedy_tokens.clone() if greedy else None
        g = self.capture(lambda: buf.__setitem__("logits", self._run_static(buf, fused_max, greedy, steps)),
                         self.pool)
        if kept is not None:
            self.greedy_tokens.copy_(kept)
        self.pool = getattr(g, "pool", lambda: None)()
        if steps > 1:
            self.multi_graphs[b, steps] = (g, buf)
        else:
            (self.graphs if greedy else self.verify_graphs)[b] = (g, buf)

    def verify_graph_fits(self, n: int) -> bool:
        """Whether n verification rows replay an exact-size graph of the fused step: the same
        numbers as decoding each row alone, and no padding rows (a bucketed decode graph's padding
        rows would route to experts of their own and read their weights)."""
        return (bool(self.graph_sizes) and self.fused is not None and 1 < n <= FUSED_MAX_VERIFY
                and n <= self.graph_sizes[-1])

    @torch.inference_mode()
    def capture(self, fn, pool=None):
        """A CUDA graph of fn() after two warm-up runs (Triton compilation and tuning, cuBLAS
        handles), in the given memory pool (graphs that never run at the same time may share one)
        or a new one. Off the GPU the 'graph' runs fn eagerly (tests use it)."""
        if self.device.type != "cuda":
            return _EagerGraph(fn)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
        finally:  # a launch that fails part-way (a tile out of resources) leaves nothing running beside
            torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn()
        return g

    def capture_all(self) -> None:
        """Capture every graph size now (compiling and tuning the kernels for each), so that no
        request pays for a capture later."""
        for b in self.graph_sizes:
            if b not in self.graphs and self.graph_fits(b):
                self.capture_graph(b)
            if self.decode_steps > 1 and self.steps_fit(b) and (b, self.decode_steps) not in self.multi_graphs:
                self.capture_graph(b, steps=self.decode_steps)

    def steps_fit(self, n: int) -> bool:
        """Whether n rows may decode several greedy steps in one graph (decode_steps): batches
        the fused step serves, where a step is short enough for the time between graphs to count."""
        return self.fused is not None and n <= FUSED_MAX_BATCH and self.graph_fits(n)

    @torch.inference_mode()
    def decode_steps_ahead(self, reqs: list[Request], prev_rows: list[int], steps: int) -> None:
        """steps greedy decode steps of reqs in one graph, at positions num_computed ...
        num_computed + steps - 1 (their blocks allocated), the first taking row prev_rows[i]'s
        token of the last graph for request i; each step's tokens are the argmax of the step
        before. The tokens: greedy_tokens[(j + 1) % steps, :len(reqs)] for step j. One step: the
        decode graphs (decode_rows)."""
        if steps == 1:
            self.decode_rows([(r, r.num_computed, None) for r in reqs], prev_rows=prev_rows)
            return
        n = len(reqs)
        b = next(s for s in self.graph_sizes if s >= n)
        if (b, steps) not in self.multi_graphs:
            self.capture_graph(b, steps=steps)
        g, buf = self.multi_graphs[b, steps]
        rows = [(r, r.num_computed + j, None) if r is not None else None for j in range(steps)
                for r in reqs + [None] * (b - n)]
        toks = [(-1 - (prev_rows[i] if j == 0 else i)) if i < n else 0 for j in range(steps) for i in range(b)]
        self._replay(g, buf, rows, None, toks)

    def _execute_graph(self, items: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[Request]]:
        rows = [(req, req.num_computed, req.all_ids[req.num_computed]) for req, _ in items]
        logits = self.decode_rows(rows)
        # a one-token chunk in the middle of a chunked prefill computes K/V but samples nothing
        ends = [i for i, (req, _) in enumerate(items) if req.num_computed + 1 == req.num_tokens]
        if len(ends) < len(items):
            logits = logits[ends]
        return logits, [items[i][0] for i in ends]

    def graph_fits(self, n: int) -> bool:
        """Whether n one-token rows replay a CUDA graph."""
        return bool(self.graph_sizes) and n <= self.graph_sizes[-1] and self.capturable(n)

    def capturable(self, n: int, fused_max: int = FUSED_MAX_BATCH) -> bool:
        """Whether a static step of n one-token rows (_run_static) can be captured in a graph."""
        return self.model_path_capturable or (self.fused is not None and n <= fused_max)

    def to_device(self, values: list[int]) -> torch.Tensor:
        """A small int64 tensor on the device without a stream sync (a copy from pageable memory
        would wait for all queued GPU work first): staged in pinned memory, copied asynchronously."""
        pin = self.device.type == "cuda"
        return torch.tensor(values, dtype=torch.long, pin_memory=pin).to(self.device, non_blocking=pin)

    def _host_stage(self, b: int) -> torch.Tensor:
        """A pinned host buffer for the next transfer; the one used _STAGES transfers ago is
        reused once its copy has completed."""
        if self._stages is None:  # sized on first use: for the largest graph
            pin = self.device.type == "cuda"
            rows = max(self.graph_sizes[-1], self.decode_steps * min(self.graph_sizes[-1], FUSED_MAX_BATCH))
            self._stages = [torch.zeros(rows, self._META + self.max_blocks, dtype=torch.int32, pin_memory=pin)
                            for _ in range(_STAGES)]
        i = self._stage_i = (self._stage_i + 1) % _STAGES
        if self._stage_events[i] is not None:
            self._stage_events[i].synchronize()
        return self._stages[i][:b]

    def stage_rows(self, h, rows: list[tuple[Request, int, int | None] | None]) -> None:
        """Write graph-input rows [token, position, slot, context length, block table] into the
        host array h (numpy, int32); a None row is padding (position 0 of the scratch block 0)."""
        bs = self.block_size
        for i, row in enumerate(rows):
            if row is None:
                h[i, :5] = (0, 0, 0, 1, 0)
                continue
            req, p, tok = row
            blocks = req.blocks
            h[i, :4] = (tok or 0, p, blocks[p // bs] * bs + p % bs, p + 1)
            h[i, 4:4 + len(blocks)] = blocks  # entries past the context length are never read

    @torch.inference_mode()
    def decode_rows(self, rows: list[tuple[Request, int, int | None]], tokens: torch.Tensor | None = None,
                    verify: bool = False, prev_rows: list[int] | None = None) -> torch.Tensor:
        """One token per row: (request, position, token id); several rows of one request at
        consecutive positions see each other causally (every row's K/V is stored before any row
        attends). tokens: [len(rows)] token ids on the device, used instead of the rows' ids (they
        are then None), so a caller can feed back tokens it has not read. Returns logits
        [len(rows), vocab]: a replayed CUDA graph where one fits, else the packed forward. verify:
        speculative verification rows, kept on the fused step up to FUSED_MAX_VERIFY rows.
        prev_rows: for each row, the row of the last decode graph whose greedy token it takes
        (self.greedy_tokens; the rows' ids are then None): a decode graph reads it there itself."""
        n = len(rows)
        if prev_rows is not None and (verify or not self.graph_fits(n)):
            tokens, prev_rows = self.greedy_tokens[0][self.to_device(prev_rows)], None
        if verify and self.verify_graph_fits(n):
            if n not in self.verify_graphs:
                self.capture_graph(n, FUSED_MAX_VERIFY)
            g, buf = self.verify_graphs[n]
            return self._replay(g, buf, rows, tokens)
        if not self.graph_fits(n):
            if tokens is not None:
                rows = [(r, p, t) for (r, p, _), t in zip(rows, tokens.tolist())]
            chunks: list[tuple[Request, int, list[int]]] = []
            for req, p, tok in rows:  # consecutive rows of one request form one chunk
                if chunks and chunks[-1][0] is req and chunks[-1][1] + len(chunks[-1][2]) == p:
                    chunks[-1][2].append(tok)
                else:
                    chunks.append((req, p, [tok]))
            return self.forward_chunks(chunks)
        b = next(s for s in self.graph_sizes if s >= n)
        if b not in self.graphs:
            self.capture_graph(b)
        g, buf = self.graphs[b]
        return self._replay(g, buf, rows, tokens, None if prev_rows is None else [-1 - j for j in prev_rows])

    def _replay(self, g, buf: dict, rows: list, tokens: torch.Tensor | None,
                token_col: list[int] | None = None) -> torch.Tensor:
        """Stage rows (and tokens, or token_col: the staged tokens, -1 - j for the last graph's
        greedy token of row j) into the graph's inputs, padding the rest, and replay it."""
        n, b = len(rows), buf["stage"].shape[0]
        host = self._host_stage(b)
        h = host.numpy()
        self.stage_rows(h, rows)
        h[n:, :5] = (0, 0, 0, 1, 0)  # padding rows: position 0 of the scratch block 0
        if token_col is not None:  # the graph looks the negative ones up in self.greedy_tokens
            h[:len(token_col), 0] = token_col
        stage = buf["stage"]
        stage.copy_(host, non_blocking=True)
        if tokens is not None:
            stage[:n, 0].copy_(tokens)
        if self.device.type == "cuda":
            ev = self._stage_events[self._stage_i] = torch.cuda.Event()
            ev.record()
        g.replay()
        return buf["logits"][:n]


_STAGES = 4  # pinned host buffers in flight


class _EagerGraph:
    """Stands in for a CUDA graph off the GPU: replay runs the captured step eagerly."""

    def __init__(self, fn):
        self.replay = fn
