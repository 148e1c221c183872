"""The inference engine: requests in, tokens out, one scheduler step at a time.

    engine = Engine(model, tokenizer, kv_budget="256MiB")
    rid = engine.add_request("def ", SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...
"""

from __future__ import annotations

import itertools
import operator
import time
from dataclasses import dataclass, field

import torch

from moekit.data.tokenizer import Tokenizer
from moekit.errors import ConfigError
from moekit.infer.kv_cache import PagedKVCache, kv_bytes_per_token, num_blocks_for_budget
from moekit.infer.runner import FUSED_MAX_VERIFY, MAX_DECODE_STEPS, ModelRunner
from moekit.infer.sampling import Sampler, SamplingParams
from moekit.infer.scheduler import Request, Scheduler, Status
from moekit.model.transformer import Transformer


@dataclass
class _Ahead:
    """Decode steps launched but not yet read: their requests (row i of the decode graph) and a
    pinned copy of their tokens on its way to the host ([steps, rows]: the runner's
    greedy_tokens, step j's in row (j + 1) % steps)."""
    reqs: list[Request]
    host: torch.Tensor
    copied: object  # CUDA event after the copy (None off the GPU)


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy without penalties or logprobs: the token is the logits' argmax."""
    return p.temperature == 0 and not (p.presence_penalty or p.frequency_penalty or p.logprobs is not None)


class Detokenizer:
    """The text of a growing list of token ids, decoding only the ids since the last point where
    the text was whole characters: decoding stays O(new tokens) per step, not O(output). Byte-level
    decoding is concatenative at character boundaries, so the result equals decoding every id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.done, self.settled = tokenizer, 0, ""

    def text(self, ids: list[int]) -> str:
        """decode(ids); ids extend (or equal) the ones of the previous call, minus at most the
        ids after the last settled point."""
        tail = self.tokenizer.decode(ids[self.done:])
        if "\ufffd" in tail:  # a character still incomplete (or a literal U+FFFD): decode it again next time
            return self.settled + tail
        self.settled += tail
        self.done = len(ids)
        return self.settled


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    text: str  # all text released so far (stop strings removed)
    delta: str  # text released by this step
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    new_logprobs: list = field(default_factory=list)  # per new token: (logprob, [(id, logprob), ...])
    first_token_time: float | None = None
    arrival_time: float = 0.0


@dataclass
class EngineConfig:
    kv_budget: str = "256MiB"  # bytes ("2GiB") or a fraction of free GPU memory ("0.5")
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # per-step token budget (chunked prefill)
    max_model_len: int = 0  # 0 -> the model's max_seq_len
    cuda_graphs: bool = True
    num_speculative_tokens: int = 4  # with a draft model
    prompt_lookup_max: int = 0  # > 0: speculate from the longest n-gram match up to this n (with a draft
    # model: on steps where every request finds one, the draft on the others)
    prompt_lookup_min: int = 0  # the shortest match (moekit.infer.ngram); 0: 1 alone, 3 next to a draft model
    prompt_lookup_tokens: int = 0  # proposals per prompt lookup step (0: num_speculative_tokens)
    speculative_max_batch: int = 8  # above this many running requests, decode without speculation (GPU: also
    # above FUSED_MAX_VERIFY // (k + 1), where verification would leave the fused step and greedy output could differ)
    fused_decode: bool = True  # small decode batches through the fused Triton step (GPU, CUDA graphs)
    compile: bool = False  # torch.compile the decode step in the CUDA graphs (GPU; measured slower on H100 so far)
    lookahead: bool = True  # greedy graph decoding launches each step before reading the last one's tokens
    decode_steps: int = 4  # ... and chains this many steps in one graph where the fused step serves the batch
    # (GPU: the time between two graphs is paid once for them; tokens then come this many at a time)
    prefix_caching: bool = False  # keep full blocks' K/V for later requests with the same prefix (kv_cache)
    tune_decode: bool = False  # warmup() first refines the fused decode kernels' tiles inside the batch-1
    # decode graph (Engine.tune_decode: GPU, a minute or so; process-wide, as the autotuner's choice)
    seed: int = 0

    def validate(self) -> "EngineConfig":
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "decode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be >= 0, got {self.max_model_len}")
        if self.decode_steps > MAX_DECODE_STEPS:
            raise ConfigError(f"decode_steps must be <= {MAX_DECODE_STEPS}, got {self.decode_steps}")
        if self.prompt_lookup_tokens < 0:
            raise ConfigError(f"prompt_lookup_tokens must be >= 0 (0: num_speculative_tokens), got "
                              f"{self.prompt_lookup_tokens}")
        if self.prompt_lookup_max and not 0 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16:
            raise ConfigError(f"prompt lookup needs 0 <= prompt_lookup_min <= prompt_lookup_max <= 16 (min 0: "
                              f"automatic), got {self.prompt_lookup_min} and {self.prompt_lookup_max}")
        return self


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, config: EngineConfig | None = None,
                 draft: Transformer | None = None):
        cfg = (config or EngineConfig()).validate()
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, cfg
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.max_model_len = min(cfg.max_model_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        num_blocks = num_blocks_for_budget(model.cfg, cfg.kv_budget, cfg.block_size, self.device, dtype)
        self.kv = PagedKVCache(model.cfg, num_blocks, cfg.block_size, self.device, dtype, cfg.prefix_caching)
        self.kv_bytes_per_token = kv_bytes_per_token(model.cfg, dtype)
        self.scheduler = Scheduler(self.kv.allocator, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        speculating = draft is not None or cfg.prompt_lookup_max > 0
        if speculating and cfg.num_speculative_tokens < 1:
            raise ConfigError("num_speculative_tokens must be >= 1")
        lookup_k = (cfg.prompt_lookup_tokens or cfg.num_speculative_tokens) if cfg.prompt_lookup_max else 0
        # the most proposals a step verifies: a drafting step's or a lookup step's
        most_k = max(cfg.num_speculative_tokens if draft is not None else 0, lookup_k)
        # greedy speculation is lossless while verification runs on the fused step (the same
        # numbers as decoding a row alone): on that path it stops at FUSED_MAX_VERIFY rows
        self.spec_max_batch = cfg.speculative_max_batch
        if cfg.fused_decode and cfg.cuda_graphs and self.device.type == "cuda":
            self.spec_max_batch = min(self.spec_max_batch, FUSED_MAX_VERIFY // (most_k + 1))
            if self.spec_max_batch < 1 and speculating:
                raise ConfigError(f"speculative proposals per step must be below {FUSED_MAX_VERIFY} on GPU "
                                  f"(got {most_k})")
        spec_rows = min(cfg.max_num_seqs, self.spec_max_batch) * (most_k + 1) if speculating else 0
        self._tiles_loaded: set = set()
        if cfg.tune_decode and cfg.fused_decode and cfg.cuda_graphs and self.device.type == "cuda":
            from moekit.infer import graph_tune  # tiles tuned in the graph before on this machine, if any

            widths = graph_tune.model_widths(model)
            self._tiles_loaded = graph_tune.load_tiles(graph_tune.tiles_path(), graph_tune.machine_key(),
                                                       only=lambda name, key: tuple(key[:2]) in widths)
        self.runner = ModelRunner(model, self.kv, self.max_model_len, cfg.max_num_seqs, cfg.cuda_graphs,
                                  cfg.compile, cfg.fused_decode, max_rows=spec_rows,
                                  decode_steps=cfg.decode_steps if cfg.lookahead else 1)
        self.sampler = Sampler(self.device, cfg.seed)
        self.spec = None
        # next to a good draft, only long matches are worth its proposals: n-grams of 3 or more by
        # default (bench/results/draft_with_lookup_cpu.json)
        auto_min = min(3 if draft is not None else 1, cfg.prompt_lookup_max)
        lookup = dict(min_n=cfg.prompt_lookup_min or auto_min, max_n=cfg.prompt_lookup_max)
        if cfg.prompt_lookup_max and draft is None:
            from moekit.infer.ngram import PromptLookupDecoder

            self.spec = PromptLookupDecoder(self.kv, self.max_model_len, lookup_k, self.sampler.shared, **lookup)
        if draft is not None:
            from moekit.infer.ngram import DraftWithLookup
            from moekit.infer.speculative import SpeculativeDecoder

            if draft.cfg.vocab_size != model.cfg.vocab_size:
                raise ConfigError(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                                  f"({model.cfg.vocab_size}); they must share the tokenizer")
            args = (draft, self.kv, self.max_model_len, cfg.max_num_seqs, cfg.num_speculative_tokens,
                    self.sampler.shared, cfg.cuda_graphs, cfg.fused_decode)
            # both: prompt lookup where every request finds a match, the draft otherwise
            self.spec = (DraftWithLookup(*args, **lookup, lookup_k=lookup_k) if cfg.prompt_lookup_max
                         else SpeculativeDecoder(*args))
        self.requests: dict[str, Request] = {}
        self._ahead: _Ahead | None = None
        self.lookahead_steps = 0  # steps launched before the previous step's tokens were read
        self._ids = itertools.count()
        self.eos_id = tokenizer.eot_id if tokenizer is not None else None

    # -- API ---------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = (params or SamplingParams()).validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs a tokenizer")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise ConfigError("prompt token ids must be integers") from None
        if not ids:
            ids = [self.eos_id if self.eos_id is not None else 0]
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ConfigError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ConfigError(f"prompt has {len(ids)} tokens; the context window is {self.max_model_len}")
        # a request must fit the cache on its own, or preemption could never make room for it
        capacity = (self.kv.allocator.num_blocks - 1) * self.config.block_size
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if longest > capacity:
            raise ConfigError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} does not fit "
                              f"the KV cache ({capacity} tokens); lower max_tokens or raise the KV budget")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params, arrival=next(self._ids))
        req.extra.update(arrival_time=time.monotonic(), text="", released=0, first_token_time=None,
                         generator=self._generator(params.seed))
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks at once. False if it is unknown or finished."""
        req = self.requests.pop(request_id, None)
        if req is None or req.status is Status.FINISHED:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def warmup(self) -> None:
        """Capture the decode graphs of every batch size (the target's, the draft's and the
        speculative steps') up front; with config.tune_decode, tune the decode kernels first."""
        if self.config.tune_decode:
            self.tune_decode()
        self.runner.capture_all()
        if self.spec is not None:
            if self.spec.runner is not None:
                self.spec.runner.capture_all()
            self.spec.warmup(self.runner, min(self.config.max_num_seqs, self.spec_max_batch))

    def tune_decode(self, prompt_len: int = 128, log=print, force: bool = False) -> dict | None:
        """Refine the tiles of the fused decode kernels inside the batch-1 decode graph
        (moekit.infer.graph_tune): a throwaway greedy request of prompt_len random tokens decodes a
        few steps, then its last step is replayed with each tile each kernel of this model's widths
        may take, and the fastest stay. The tiles are the tuners' (process-wide) and are kept on
        disk for this GPU and these library versions (graph_tune.tiles_path()): an engine built
        with config.tune_decode takes them from there, and then this does not tune again unless
        forced. The graphs captured before are dropped and captured again with the tiles. None
        where decoding does not run the fused step on CUDA graphs (CPU, no Triton)."""
        r = self.runner
        if r.fused is None or not r.graph_sizes or r.graph_sizes[0] != 1:
            return None
        if self.has_unfinished():
            raise RuntimeError("tune_decode needs an idle engine: requests are running")
        from moekit.infer import graph_tune
        from moekit.infer.graph_tune import replay_ms, tune_in_graph

        widths = graph_tune.model_widths(self.model)

        def mine(name: str, key: tuple) -> bool:  # the keys of this model's kernels
            return tuple(key[:2]) in widths

        c = self.model.cfg
        r.graphs.clear()  # so that the only real row a graph holds is the throwaway request's
        g = torch.Generator().manual_seed(self.config.seed)
        n = max(1, min(prompt_len, self.max_model_len - 8))
        self.generate([torch.randint(0, c.vocab_size, (n,), generator=g).tolist()],
                      SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        # the keys the step's kernels now have (their dtypes and options included): kept tiles for all?
        keys = {(name, key) for name in graph_tune.TUNERS for key in getattr(graph_tune.fd, name).cache if mine(name, key)}
        if keys and keys <= self._tiles_loaded and not force:
            log(f"tune_decode: {len(keys)} tiles from {graph_tune.tiles_path()}")
            r.graphs.clear()
            return {"cached": len(keys)}
        # the request's last decode row (its blocks are free now, and nothing else runs)
        real = r.graphs[1][1]["stage"][0].clone() if 1 in r.graphs else None
        if real is None or int(real[2]) == 0:  # its steps ran elsewhere (speculative step graphs)
            log("tune_decode: no decode graph ran the throwaway request; tiles left as tuned")
            return None
        if int(real[0]) < 0:  # a token the step before chose: the same one on every replay
            real[0] = r.greedy_tokens[0, -1 - int(real[0])]

        @torch.inference_mode()
        def step_ms() -> float:
            r.capture_graph(1)
            graph, buf = r.graphs[1]
            buf["stage"][0] = real
            return replay_ms(graph.replay)

        out = tune_in_graph(step_ms, log=log, only=mine)
        try:
            out["saved"] = graph_tune.save_tiles(graph_tune.tiles_path(), graph_tune.machine_key(), only=mine)
        except (OSError, ValueError) as e:  # a read-only home: the tiles hold for this process
            log(f"tune_decode: tiles not saved ({e})")
        r.graphs.clear()
        r.verify_graphs.clear()
        r.multi_graphs.clear()
        if self.spec is not None:
            self.spec.step_graphs.clear()
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        if self._ahead is not None:
            return self._step_ahead()
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        if self.spec is not None and self._speculate(batch):
            outs = self._speculative_step([req for req, _ in batch.items])
            if outs is not None:
                return outs
        logits, to_sample = self.runner.execute(batch)
        if self._may_speculate(len(batch.items)):
            self.spec.sync(batch.items)  # otherwise the draft catches up when speculation resumes
        for req, n in batch.items:
            req.num_computed += n
        if not to_sample:
            return []
        if len(to_sample) == len(batch.items) and self._lookahead_ok(batch):
            self._ahead = self._read_later(to_sample)  # read by the next step
            return []
        res = self.sampler(logits, [r.params for r in to_sample], [r.extra["generator"] for r in to_sample],
                           [r.output_ids for r in to_sample])
        return [self._append(req, tok, lp) for req, tok, lp in zip(to_sample, res.tokens, res.logprobs)]

    # -- decoding one step ahead ------------------------------------------------------------------
    # In steady greedy decoding on the graph path, the host's work for a step (reading the tokens,
    # stop checks, detokenizing, outputs, staging the next inputs) overlaps the GPU's next step:
    # each step's argmax tokens stay on the device and feed the next step's graph, which is
    # launched before they are read. A request that stops on a token read late has computed one
    # position too many, which is discarded with its blocks. Anything else (a waiting request,
    # blocks running short, sampling, a request at its length limit) reads first and schedules.
    def _lookahead_ok(self, batch) -> bool:
        reqs = [req for req, _ in batch.items]
        return (self.config.lookahead and not self._may_speculate(len(reqs)) and not self.scheduler.waiting
                and all(n == 1 for _, n in batch.items) and self.runner.graph_fits(len(reqs))
                and all(_plain_greedy(r.params) for r in reqs))

    def _read_later(self, reqs: list[Request], steps: int = 1) -> _Ahead:
        """The greedy tokens of the decode graph just launched, on their way to the host."""
        tokens = self.runner.greedy_tokens[:steps]  # whole rows: one contiguous copy
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        return _Ahead(reqs, host, copied)

    def _step_ahead(self) -> list[RequestOutput]:
        ahead, self._ahead = self._ahead, None
        pending = ahead.host.shape[0]  # tokens per request launched and not yet read

        def room(r: Request, n: int) -> bool:  # for n more tokens after the pending ones
            return (len(r.output_ids) + pending + n <= r.params.max_tokens
                    and r.num_tokens + pending + n <= self.max_model_len)

        # requests that go on after their pending tokens (unless one is a stop token)
        go = [i for i, r in enumerate(ahead.reqs) if r.status is Status.RUNNING and room(r, 1)]
        reqs = [ahead.reqs[i] for i in go]
        # several steps in one graph where every request has room for them
        steps = self.config.decode_steps
        if steps > 1 and not (self.runner.steps_fit(len(reqs)) and all(room(r, steps) for r in reqs)):
            steps = 1
        need = [self.scheduler.blocks_needed(r, steps) for r in reqs]
        if steps > 1 and sum(need) > self.kv.allocator.num_free:  # too few blocks for a chain: one step
            steps, need = 1, [self.scheduler.blocks_needed(r, 1) for r in reqs]
        if (reqs and not self.scheduler.waiting and sum(need) <= self.kv.allocator.num_free
                and self.runner.graph_fits(len(reqs)) and not self._may_speculate(len(reqs))):
            for r, n in zip(reqs, need):
                r.blocks += self.kv.allocator.allocate(n)
            self.runner.decode_steps_ahead(reqs, go, steps)
            for r in reqs:
                r.num_computed += steps
            self._ahead = self._read_later(reqs, steps)
            self.lookahead_steps += steps
        if ahead.copied is not None:
            ahead.copied.synchronize()
        toks = ahead.host.tolist()
        outs = []
        for i, r in enumerate(ahead.reqs):
            for j in range(pending):
                if r.status is not Status.RUNNING:  # finished on an earlier token, or aborted meanwhile
                    break
                outs.append(self._append(r, toks[(j + 1) % pending][i], None))
        return outs

    def _may_speculate(self, n: int) -> bool:
        """Whether a batch of n requests can speculate (with speculation configured, no larger
        batch does: those decode one step ahead and skip the draft)."""
        return self.spec is not None and n <= self.spec_max_batch

    def _speculate(self, batch) -> bool:
        from moekit.infer.speculative import eligible

        # decoding only: a one-token chunk of a prefill that has more to go is not a decode step
        return (all(n == 1 and req.num_computed == req.num_tokens - 1 for req, n in batch.items)
                and self._may_speculate(len(batch.items)) and all(eligible(req) for req, _ in batch.items))

    def _speculative_step(self, reqs: list[Request]) -> list[RequestOutput] | None:
        emitted = self.spec.step(self.runner, reqs)
        if emitted is None:
            return None
        outs = []
        for req in reqs:
            for tok in emitted[req.id]:
                out = self._append(req, tok, None)
                outs.append(out)
                if out.finished:
                    break
        return outs

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run a list of prompts to completion; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stats(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.kv.allocator.num_used, "kv_blocks_total": self.kv.allocator.num_blocks - 1,
                "kv_bytes_per_token": self.kv_bytes_per_token, "preemptions": self.scheduler.num_preemptions,
                "prefix_cache_query_tokens": self.scheduler.prefix_query_tokens,
                "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
                **({"spec_acceptance_rate": self.spec.stats.acceptance_rate,
                    "spec_mean_accepted_length": self.spec.stats.mean_accepted_length,
                    "spec_accepted_at": list(self.spec.stats.accepted_at),
                    "spec_lookup_steps": self.spec.stats.lookup_steps} if self.spec else {})}

    # -- internals ---------------------------------------------------------------------------
    def _generator(self, seed: int | None):
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def _append(self, req: Request, token: int, logprob) -> RequestOutput:
        p, ex = req.params, req.extra
        if ex["first_token_time"] is None:
            ex["first_token_time"] = time.monotonic()
        req.output_ids.append(token)
        reason = None
        stop_ids = set(p.stop_token_ids) | ({self.eos_id} if self.eos_id is not None and not p.ignore_eos else set())
        hit_stop_token = token in stop_ids
        if hit_stop_token:
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        delta = ""
        if self.tokenizer is not None:
            ids = req.output_ids[:-1] if hit_stop_token else req.output_ids
            text = ex.setdefault("detok", Detokenizer(self.tokenizer)).text(ids)
            cut = min((i for s in p.stop for i in [text.find(s)] if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            # hold back an incomplete UTF-8 character and a possible stop-string prefix
            stable = len(text) - 1 if not reason and text.endswith("\ufffd") else len(text)
            hold = 0 if reason else max([len(s) - 1 for s in p.stop] + [0])
            release = max(ex["released"], stable - hold)
            delta = text[ex["released"]:release]
            ex["released"] = release
            ex["text"] = text[:release]
        if reason:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.id, None)
        return RequestOutput(req.id, [token], list(req.output_ids), ex["text"], delta, reason is not None, reason,
                             len(req.prompt_ids), [logprob] if logprob is not None else [],
                             ex["first_token_time"], ex["arrival_time"])
