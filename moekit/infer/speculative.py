"""Speculative decoding (Leviathan et al., 2023) inside continuous batching.

A small draft model proposes k tokens per request; the target scores all of them in one forward;
each proposal is accepted with probability min(1, p/q), the first rejection is replaced by a
sample from norm(max(0, p - q)), and a fully accepted run earns a bonus token from p. The output
distribution is exactly the target's (greedy: the target's argmax tokens).

The draft keeps its own paged KV cache with the same block ids as the target, so one allocator
serves both; blocks taken for rejected positions are given back at the end of the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moekit.infer.kv_cache import PagedKVCache
from moekit.infer.runner import FUSED_MAX_VERIFY, ModelRunner
from moekit.infer.sampling import SamplingParams, top_k_top_p_mask
from moekit.infer.scheduler import Request
from moekit.model.transformer import Transformer


@dataclass
class SpecStats:
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # proposals accepted at each position
    lookup_steps: int = 0  # steps whose proposals came from prompt lookup next to a draft model
    request_steps: int = 0  # requests verified, summed over steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per request-step (accepted proposals + the target's own token)."""
        return (self.accepted + self.request_steps) / self.request_steps if self.request_steps else 0.0


def _draw(probs: torch.Tensor, gen) -> int:
    return int(torch.multinomial(probs, 1, generator=gen).item())


def accept(proposals: list[int], q: torch.Tensor, p: torch.Tensor, gen) -> list[int]:
    """Leviathan et al.'s rule, one request and one token at a time (the reference for
    accept_batched). proposals: k draft tokens drawn from q [k, V]; p: target distributions
    [k + 1, V]. Returns the emitted tokens (accepted prefix + one more): their distribution is
    exactly the target's."""
    emitted = []
    for j, x in enumerate(proposals):
        u = torch.rand((), generator=gen, device=p.device).item()
        if q[j, x] > 0 and u * q[j, x] < p[j, x]:  # accept with probability min(1, p(x) / q(x)); never p(x) = 0
            emitted.append(x)
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        emitted.append(_draw(residual / residual.sum() if residual.sum() > 0 else p[j], gen))
        return emitted
    emitted.append(_draw(p[len(proposals)], gen))  # every proposal accepted: a bonus token
    return emitted


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's sampling distribution, rows with their own parameters: logits [n, V] -> probs
    [n, V] (greedy rows one-hot at the argmax)."""
    logits = logits.float()
    dev = logits.device
    greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if bool(greedy.all()):
        return one_hot
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
    masked = top_k_top_p_mask(logits / temps[:, None], torch.tensor([p.top_k for p in params], device=dev),
                              torch.tensor([p.top_p for p in params], device=dev))
    return torch.where(greedy[:, None], one_hot, masked.softmax(-1))


def exponentials(shape: tuple, gens: list, device) -> torch.Tensor:
    """Exp(1) draws [len(gens), *shape], row i from generator gens[i]."""
    out = torch.empty(len(gens), *shape, device=device)
    for i, g in enumerate(gens):
        out[i].exponential_(generator=g)
    return out


def accept_batched(proposals: torch.Tensor, q: torch.Tensor, p: torch.Tensor, u: torch.Tensor,
                   e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan et al.'s rule for a batch on the device, without reading anything: proposals
    [B, k] drawn from q [B, k, V]; target distributions p [B, k + 1, V]; u [B, k] ~ U(0, 1) and
    e [B, V] ~ Exp(1) the randomness. Proposal j is accepted with probability min(1, p(x) / q(x));
    the first rejected one is replaced by a draw from norm(max(0, p - q)) (from p when that is
    empty), and a fully accepted run earns a draw from p[k]; draws are exponential races, argmax
    d / e, which pick each token with probability proportional to d. Returns the emitted tokens
    [B, k + 1] (valid up to n) and their number n [B]."""
    B, k = proposals.shape
    px = p[:, :k].gather(2, proposals[..., None])[..., 0]
    qx = q.gather(2, proposals[..., None])[..., 0]
    accepted = ((qx > 0) & (u * qx < px)).int().cumprod(1).sum(1)  # [B]; u in [0, 1): never p(x) = 0
    rows = torch.arange(B, device=p.device)
    p_a = p[rows, accepted]  # [B, V]: the target's distribution where the run stops
    q_a = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, accepted]  # zero after a full run: p itself
    residual = (p_a - q_a).clamp(min=0)
    d = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
    out = torch.cat([proposals, proposals[:, :1]], 1)
    out[rows, accepted] = (d / e).argmax(-1)
    return out, accepted + 1


def eligible(req: Request) -> bool:
    p = req.params
    return not (p.presence_penalty or p.frequency_penalty or p.logprobs is not None)


class SpeculativeDecoder:
    def __init__(self, draft: Transformer, target_kv: PagedKVCache, max_model_len: int, max_num_seqs: int,
                 k: int, shared_generator: torch.Generator, cuda_graphs: bool = True, fused: bool = True,
                 rows_per_request: int = 2):
        dtype = next(draft.parameters()).dtype
        device = next(draft.parameters()).device
        self.kv = PagedKVCache(draft.cfg, target_kv.allocator.num_blocks, target_kv.block_size, device, dtype)
        # the draft's steps are one token per row: CUDA graphs (and the fused step) on GPU, up to
        # rows_per_request rows per request (its catch-up)
        self.runner = ModelRunner(draft.eval(), self.kv, max_model_len, max_num_seqs, cuda_graphs=cuda_graphs,
                                  fused=fused, max_rows=rows_per_request * max_num_seqs)
        self._setup(target_kv, max_model_len, k, shared_generator)

    def _setup(self, target_kv: PagedKVCache, max_model_len: int, k: int, shared_generator: torch.Generator) -> None:
        """What any proposer shares: the target's allocator, k, the statistics, the step graphs."""
        self.allocator = target_kv.allocator
        self.block_size, self.k, self.max_model_len = target_kv.block_size, k, max_model_len
        self.shared = shared_generator
        self.stats = SpecStats(accepted_at=[0] * k)
        # requests -> (graph, device stage, {"best": graph output}, pinned stage, pinned result); the
        # step graphs share one memory pool (they never run at the same time)
        self.step_graphs: dict[int, tuple] = {}
        self._pool = None

    # -- keeping the draft's cache in step with the target ---------------------------------
    def _draft_start(self, req: Request) -> int:
        return min(req.extra.get("draft_computed", 0), req.num_computed)

    def sync(self, items: list[tuple[Request, int]]) -> None:
        """After a normal target step: the draft computes the same tokens (and any it lags by)."""
        chunks = []
        for req, n in items:
            dc = self._draft_start(req)
            chunks.append((req, dc, req.all_ids[dc:req.num_computed + n]))
            req.extra["draft_computed"] = req.num_computed + n
        if chunks:
            self.runner.forward_chunks(chunks, last_of=[False] * len(chunks))

    # -- one speculative step ----------------------------------------------------------------
    def _reserve(self, reqs: list[Request], k: int | None = None) -> bool:
        """Blocks for k (default self.k) + 1 more positions of every request (False when they are short)."""
        k, bs = k or self.k, self.block_size
        if any(r.num_tokens + k + 1 > self.max_model_len for r in reqs):
            return False
        need = [max(0, math.ceil((r.num_computed + k + 1) / bs) - len(r.blocks)) for r in reqs]
        if sum(need) > self.allocator.num_free:
            return False
        for r, n in zip(reqs, need):
            r.blocks += self.allocator.allocate(n)
        return True

    def _catch_up_rows(self, reqs: list[Request]) -> tuple[list, list[int]]:
        """The draft's rows up to each request's last token, and the index of each last row."""
        rows, last = [], []
        for r in reqs:
            rows += [(r, p, r.all_ids[p]) for p in range(self._draft_start(r), r.num_tokens)]
            last.append(len(rows) - 1)
        return rows, last

    def _catch_up(self, reqs: list[Request]) -> torch.Tensor:
        """The draft computes up to each request's last token: its logits there, [B, V]."""
        rows, last = self._catch_up_rows(reqs)
        logits = self.runner.decode_rows(rows)
        if len(rows) > len(reqs):  # some request caught up more than one position
            logits = logits[self.runner.to_device(last)]
        return logits

    def _verify(self, target: ModelRunner, reqs: list[Request], props: torch.Tensor) -> torch.Tensor:
        """The target scores each request's last token and its k proposals (props [B, k], on the
        device) in one forward: logits [B * (k + 1), V]."""
        k = props.shape[1]
        last_tok = target.to_device([r.all_ids[-1] for r in reqs])
        tokens = torch.cat([last_tok[:, None], props], 1).view(-1)
        rows = [(r, r.num_computed + j, None) for r in reqs for j in range(k + 1)]
        return target.decode_rows(rows, tokens=tokens, verify=True)

    def _commit(self, reqs: list[Request], emitted: list[list[int]], counted: list[bool] | None = None,
                k: int | None = None) -> dict[str, list[int]]:
        """Count acceptance of the step's k proposals per request (default self.k; of the requests
        counted: all by default), advance the requests past the accepted proposals and roll back
        the K/V blocks of rejected positions."""
        k, bs = k or self.k, self.block_size
        if len(self.stats.accepted_at) < k:
            self.stats.accepted_at += [0] * (k - len(self.stats.accepted_at))
        out = {}
        for i, (r, em) in enumerate(zip(reqs, emitted)):
            a = len(em) - 1
            if counted is None or counted[i]:
                for j in range(a):
                    self.stats.accepted_at[j] += 1
                self.stats.proposed += k
                self.stats.accepted += a
                self.stats.request_steps += 1
            # K/V are valid for the last token and the accepted proposals; the rest is rolled back
            old = r.num_computed
            r.num_computed += 1 + a
            # the draft holds the last token and proposals up to the (k-1)-th, valid while they match
            r.extra["draft_computed"] = min(r.num_computed, old + k)
            keep = math.ceil((r.num_computed + 1) / bs)
            if len(r.blocks) > keep:
                self.allocator.free(r.blocks[keep:])
                r.blocks = r.blocks[:keep]
            out[r.id] = em
        self.stats.steps += 1
        return out

    def step(self, target: ModelRunner, reqs: list[Request]) -> dict[str, list[int]] | None:
        """Tokens to emit per request id, or None when blocks for the lookahead are short (the
        caller runs a normal step instead)."""
        if not self._reserve(reqs):
            return None
        if all(r.params.temperature == 0 for r in reqs):
            return self._commit(reqs, self._greedy(target, reqs))
        return self._commit(reqs, self._sampled(target, reqs))

    def _sampled(self, target: ModelRunner, reqs: list[Request]) -> list[list[int]]:
        """Any sampling parameters: proposals drawn on the device (exponential races, each request
        with its own generator), accepted or rejected there (accept_batched), read once."""
        k = self.k
        gens = [r.extra.get("generator") or self.shared for r in reqs]
        params = [r.params for r in reqs]
        dev = target.device
        logits = self._catch_up(reqs)
        qs, proposals = [], []
        for j in range(k):
            q = distributions(logits, params)  # [B, V]
            tok = (q / exponentials(q.shape[1:], gens, dev)).argmax(-1)
            qs.append(q)
            proposals.append(tok)
            if j < k - 1:
                logits = self.runner.decode_rows([(r, r.num_tokens + j, None) for r in reqs], tokens=tok)
        return self._sampled_accept(target, reqs, torch.stack(proposals, 1), torch.stack(qs, 1))

    def _sampled_accept(self, target: ModelRunner, reqs: list[Request], props: torch.Tensor,
                        q: torch.Tensor) -> list[list[int]]:
        """The target verifies proposals props [B, k] drawn from q [B, k, V]; accepted or rejected
        on the device (accept_batched), read once."""
        B, k = props.shape
        gens = [r.extra.get("generator") or self.shared for r in reqs]
        dev = props.device
        p = distributions(self._verify(target, reqs, props), [r.params for r in reqs for _ in range(k + 1)])
        p = p.view(B, k + 1, -1)
        u = torch.stack([torch.rand(k, generator=g, device=dev) for g in gens])
        out, n = accept_batched(props, q, p, u, exponentials(p.shape[2:], gens, dev))
        host = torch.cat([out, n[:, None]], 1).tolist()
        return [row[:row[-1]] for row in host]

    def _greedy(self, target: ModelRunner, reqs: list[Request]) -> list[list[int]]:
        """All requests greedy: proposals are the draft's argmax tokens and stay on the device
        (each draft step feeds the last one's tokens back without reading them); the target's
        argmax decides, and the host reads once per step. Emitted: the target's tokens up to and
        including its first disagreement with the draft (all k + 1 when none)."""
        k = self.k
        if self._step_graph_fits(target, reqs):
            return self._greedy_graph(target, reqs)
        tok = self._catch_up(reqs).argmax(-1)  # [B]
        proposals = [tok]
        for j in range(1, k):
            rows = [(r, r.num_tokens + j - 1, None) for r in reqs]
            tok = self.runner.decode_rows(rows, tokens=tok).argmax(-1)
            proposals.append(tok)
        return self._greedy_accept(target, reqs, torch.stack(proposals, 1))

    def _greedy_accept(self, target: ModelRunner, reqs: list[Request], props: torch.Tensor) -> list[list[int]]:
        """The target verifies proposals props [B, k]: its argmax tokens up to and including the
        first disagreement (all k + 1 when none), read once."""
        B, k = props.shape
        best = self._verify(target, reqs, props).view(B, k + 1, -1).argmax(-1)  # [B, k + 1]
        agree = (best[:, :k] == props).int().cumprod(1).sum(1)  # accepted proposals per request
        host = torch.cat([best, agree[:, None]], 1).tolist()
        return [row[:row[-1] + 1] for row in host]

    # -- the whole greedy step in one CUDA graph -------------------------------------------------
    # Graph inputs, one staged row per token as in ModelRunner (token, position, slot, context
    # length, block table), in three parts: the draft's catch-up (two rows per request: the
    # position it lags by, or padding, and the last token), its k - 1 further steps (tokens fed
    # back inside the graph), and the target's k + 1 rows per request.
    # Output: per request the target's k + 1 argmax tokens and the number of accepted proposals.
    def _step_graph_fits(self, target: ModelRunner, reqs: list[Request]) -> bool:
        B = len(reqs)
        if not (target.graph_sizes and self.runner.graph_sizes) or target.max_blocks != self.runner.max_blocks:
            return False
        if any(r.num_tokens - self._draft_start(r) > 2 or r.num_computed != r.num_tokens - 1 for r in reqs):
            return False  # the draft lags by more than one position: the general path catches it up
        return self._sizes_capturable(target, B)

    def _sizes_capturable(self, target: ModelRunner, B: int) -> bool:
        return (self.runner.capturable(2 * B) and self.runner.capturable(B)
                and target.capturable((self.k + 1) * B, FUSED_MAX_VERIFY))

    def warmup(self, target: ModelRunner, max_batch: int) -> None:
        """Capture the step graphs of 1 ... max_batch requests now, and the target's verification
        graphs for the steps that verify outside them."""
        if target.graph_sizes and self.runner.graph_sizes:
            for B in range(1, max_batch + 1):
                if self._sizes_capturable(target, B):
                    self._step_graph(target, B)
        self._verify_warmup(target, max_batch)

    def _verify_warmup(self, target: ModelRunner, max_batch: int, k: int | None = None) -> None:
        for B in range(1, max_batch + 1):
            n = B * ((k or self.k) + 1)
            if target.verify_graph_fits(n) and n not in target.verify_graphs:
                target.capture_graph(n, FUSED_MAX_VERIFY)

    def _static_step(self, target: ModelRunner, stage: torch.Tensor, B: int) -> torch.Tensor:
        k, draft = self.k, self.runner
        logits = draft._run_static({"stage": stage[:2 * B]})
        tok = logits.view(B, 2, -1)[:, 1].argmax(-1)
        proposals = [tok]
        for j in range(1, k):
            rows = stage[(j + 1) * B:(j + 2) * B]
            rows[:, 0] = tok
            tok = draft._run_static({"stage": rows}).argmax(-1)
            proposals.append(tok)
        props = torch.stack(proposals, 1)  # [B, k]
        verify = stage[(k + 1) * B:]
        verify.view(B, k + 1, -1)[:, 1:, 0] = props
        # verification rows through the same fused kernels as decoding: the same logits, bit for bit
        best = target._run_static({"stage": verify}, FUSED_MAX_VERIFY).view(B, k + 1, -1).argmax(-1)  # [B, k + 1]
        agree = (best[:, :k] == props).int().cumprod(1).sum(1)
        return torch.cat([best, agree[:, None]], 1).int()

    def _step_graph(self, target: ModelRunner, B: int) -> tuple:
        if B not in self.step_graphs:
            rows = 2 * (self.k + 1) * B
            width = target._META + target.max_blocks
            stage = torch.zeros(rows, width, dtype=torch.int32, device=target.device)
            stage[:, 3] = 1  # position 0 of the scratch block until staged
            out = {}
            graph = target.capture(lambda: out.__setitem__("best", self._static_step(target, stage, B)), self._pool)
            self._pool = getattr(graph, "pool", lambda: None)()
            pin = target.device.type == "cuda"
            self.step_graphs[B] = (graph, stage, out, torch.zeros(rows, width, dtype=torch.int32, pin_memory=pin),
                                   torch.zeros(B, self.k + 2, dtype=torch.int32, pin_memory=pin))
        return self.step_graphs[B]

    @torch.inference_mode()
    def _greedy_graph(self, target: ModelRunner, reqs: list[Request]) -> list[list[int]]:
        k, B = self.k, len(reqs)
        graph, stage, out, host, result = self._step_graph(target, B)
        # the draft's catch-up: the position it lags by, or a padding row, then the last token
        rows = [row for r in reqs for row in (
            (r, r.num_tokens - 2, r.all_ids[-2]) if self._draft_start(r) < r.num_tokens - 1 else None,
            (r, r.num_tokens - 1, r.all_ids[-1]))]
        rows += [(r, r.num_tokens - 1 + j, None) for j in range(1, k) for r in reqs]
        rows += [(r, r.num_computed + j, r.all_ids[-1] if j == 0 else None) for r in reqs for j in range(k + 1)]
        target.stage_rows(host.numpy(), rows)
        stage.copy_(host, non_blocking=True)
        graph.replay()
        result.copy_(out["best"], non_blocking=True)
        if target.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return [row[:row[-1] + 1] for row in result.tolist()]
