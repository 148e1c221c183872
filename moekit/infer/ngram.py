"""Prompt lookup decoding: speculation without a draft model.

The proposals for a request are the tokens that followed the most recent earlier occurrence of
its last n tokens (n from prompt_lookup_max down to prompt_lookup_min) in its own prompt and
output: text that repeats itself (code being edited, quotes from the prompt, lists, an
undertrained model's loops) is proposed from its own history. The target verifies the k
proposals in one forward as with a draft model. A proposal is certain (q one-hot), so acceptance
reduces to sampling each position from the target and keeping proposals while they agree: greedy
output is the target's argmax tokens, and sampled output is what plain decoding samples (a seeded
request's tokens do not depend on the batch). Proposing costs a dictionary
lookup per request; a step where no request finds a match decodes normally.
"""

from __future__ import annotations

import torch

from moekit.infer.kv_cache import PagedKVCache
from moekit.infer.runner import ModelRunner
from moekit.infer.scheduler import Request
from moekit.infer.speculative import SpeculativeDecoder, distributions


def lookup(ids: list[int], index: dict[int, dict[tuple, int]], k: int, min_n: int, max_n: int) -> list[int] | None:
    """k proposals after ids from the index (n-gram -> the position that followed its latest
    occurrence, for occurrences ending before the last token), or None without a match. A match
    close to the end continues periodically (the proposals extend the repeat)."""
    L = len(ids)
    for n in range(min(max_n, L), min_n - 1, -1):
        j = index[n].get(tuple(ids[L - n:]))
        if j is not None:
            ext = ids[j:j + k]
            for i in range(len(ext), k):  # past the end: the repeat of period L - j goes on
                ext.append(ext[i - (L - j)])
            return ext
    return None


def extend_index(ids: list[int], index: dict[int, dict[tuple, int]], start: int, min_n: int, max_n: int) -> int:
    """Index the n-grams of ids that end before the last token, from continuation position start
    on; returns the position to start from next time."""
    L = len(ids)
    for n in range(min_n, max_n + 1):
        j0 = max(start, n)  # continuation positions j0 ... L - 1, n-gram ids[j - n:j]
        if j0 < L:  # columns of the n-grams, zipped: the later position wins
            index[n].update(zip(zip(*(ids[j0 - n + i:L - n + i] for i in range(n))), range(j0, L)))
    return L


INDEX_WINDOW = 8192  # positions of a prompt indexed at its first decode step, counted from its end


class PromptLookupDecoder(SpeculativeDecoder):
    """The speculative step with proposals from each request's own history (no draft model, no
    draft cache)."""

    def __init__(self, target_kv: PagedKVCache, max_model_len: int, k: int, shared_generator: torch.Generator,
                 min_n: int = 1, max_n: int = 3):
        self.runner = None  # no draft to run
        self._setup(target_kv, max_model_len, k, shared_generator)
        self.min_n, self.max_n, self.lookup_k = min_n, max_n, k

    def sync(self, items: list[tuple[Request, int]]) -> None:  # no draft cache to keep in step
        pass

    def warmup(self, target: ModelRunner, max_batch: int) -> None:
        """Capture the verification graphs of 1 ... max_batch requests now (k + 1 rows each)."""
        self._verify_warmup(target, max_batch)

    def propose(self, req: Request) -> list[int] | None:
        """k proposals for the request's next tokens, or None (its history has no match)."""
        state = req.extra.setdefault("ngram", [0, {n: {} for n in range(self.min_n, self.max_n + 1)}])
        ids = req.all_ids
        # a long prompt is indexed over its last INDEX_WINDOW tokens (bounds the first step's work)
        start = max(state[0], len(ids) - INDEX_WINDOW)
        state[0] = extend_index(ids, state[1], start, self.min_n, self.max_n)
        return lookup(ids, state[1], self.lookup_k, self.min_n, self.max_n)

    def step(self, target: ModelRunner, reqs: list[Request]) -> dict[str, list[int]] | None:
        proposals = [self.propose(r) for r in reqs]
        if all(p is None for p in proposals) or not self._reserve(reqs):
            return None  # a normal step instead
        # a request without a match proposes its last token again (verified like any proposal;
        # left out of the acceptance figures)
        props = target.to_device([p or [r.output_ids[-1] if r.output_ids else r.prompt_ids[-1]] * self.lookup_k
                                  for p, r in zip(proposals, reqs)])
        counted = [p is not None for p in proposals]
        if all(r.params.temperature == 0 for r in reqs):
            return self._commit(reqs, self._greedy_accept(target, reqs, props), counted)
        return self._commit(reqs, self._sampled_lookup(target, reqs, props), counted)

    def _sampled_lookup(self, target: ModelRunner, reqs: list[Request], props: torch.Tensor) -> list[list[int]]:
        """A proposal that is certain (q one-hot) is accepted with probability p(x): equivalently,
        sample each verified position from the target as plain decoding would and accept while the
        sample equals the proposal; the first sample that differs is emitted too. Each position
        draws its noise as the sampler does (one Exp(1) vector per token from the request's
        generator), and a seeded request's generator then advances by exactly the tokens emitted,
        so its output is the same as without speculation, whatever else is in the batch."""
        B, k = props.shape
        p = distributions(self._verify(target, reqs, props), [r.params for r in reqs for _ in range(k + 1)])
        p = p.view(B, k + 1, -1)
        e = torch.empty_like(p)
        states = []
        for i, r in enumerate(reqs):
            g = r.extra.get("generator")
            states.append(g.get_state() if g is not None else None)
            for j in range(k + 1):
                e[i, j].exponential_(generator=g or self.shared)
        y = (p / e).argmax(-1)  # [B, k + 1]: greedy rows (one-hot p) their argmax
        n = (y[:, :k] == props).int().cumprod(1).sum(1)  # accepted proposals
        host = torch.cat([y, n[:, None]], 1).tolist()
        emitted = [row[:row[-1] + 1] for row in host]
        for r, state, em in zip(reqs, states, emitted):
            if state is not None:  # rewind, then advance by the tokens emitted
                g = r.extra["generator"]
                g.set_state(state)
                scratch = torch.empty(p.shape[-1], device=p.device)
                for _ in em:
                    scratch.exponential_(generator=g)
        return emitted


class DraftWithLookup(PromptLookupDecoder):
    """A draft model and prompt lookup together. A step where every request finds a match in its
    own history verifies the lookup's proposals and runs no proposing draft steps: the draft only
    computes the positions the step accepted, one forward of at most lookup_k + 2 rows per request
    (a replayed graph on GPU), so the next drafting step starts in step and fits its step graph.
    Both kinds of step keep the target's distribution; a seeded sampled request's tokens depend on
    which kind each step was, and so on the batch.

    lookup_k: the lookup's proposals per step (default k). They cost no draft steps, and on an MoE
    target a few verified rows already read most experts, so a lookup step may propose more than
    a drafting one."""

    def __init__(self, draft, target_kv: PagedKVCache, max_model_len: int, max_num_seqs: int, k: int,
                 shared_generator: torch.Generator, cuda_graphs: bool = True, fused: bool = True,
                 min_n: int = 1, max_n: int = 3, lookup_k: int | None = None):
        SpeculativeDecoder.__init__(self, draft, target_kv, max_model_len, max_num_seqs, k, shared_generator,
                                    cuda_graphs, fused, rows_per_request=max(k, lookup_k or k) + 2)
        self.min_n, self.max_n, self.lookup_k = min_n, max_n, lookup_k or k

    sync = SpeculativeDecoder.sync

    def warmup(self, target: ModelRunner, max_batch: int) -> None:
        SpeculativeDecoder.warmup(self, target, max_batch)
        if self.lookup_k != self.k:
            self._verify_warmup(target, max_batch, self.lookup_k)

    def step(self, target: ModelRunner, reqs: list[Request]) -> dict[str, list[int]] | None:
        proposals = [self.propose(r) for r in reqs]
        if any(p is None for p in proposals):
            return SpeculativeDecoder.step(self, target, reqs)
        if not self._reserve(reqs, self.lookup_k):
            return None
        drafted = [self._draft_start(r) for r in reqs]
        props = target.to_device(proposals)
        if all(r.params.temperature == 0 for r in reqs):
            emitted = self._greedy_accept(target, reqs, props)
        else:
            emitted = self._sampled_lookup(target, reqs, props)
        out = self._commit(reqs, emitted, k=self.lookup_k)
        # the draft computes what it lags by: its positions before this step's and the accepted
        # proposals (emitted, not yet appended to the request)
        rows = []
        for r, d in zip(reqs, drafted):
            ids = r.all_ids + out[r.id]
            rows += [(r, p, ids[p]) for p in range(d, r.num_computed)]
        if rows:
            self.runner.decode_rows(rows)
        for r in reqs:
            r.extra["draft_computed"] = r.num_computed
        self.stats.lookup_steps += 1
        return out
