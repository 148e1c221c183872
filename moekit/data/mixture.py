"""Text + code mixture with per-source epochs and sampling weights, packed into fixed-length
sequences. Deterministic for a seed; the cursor is a small dict saved in checkpoints.

One *pass* holds every training document of source s exactly epochs[s] times (GPT-4's data per
as reported for GPT-4: text 2 epochs, code 4). Within a pass each source's occurrences are shuffled epoch by
epoch, and sources are interleaved document by document, picking among the sources that still
have documents with probability proportional to their weights. Documents are joined by the
end-of-text token and cut into sequences of seq_len + 1 tokens (inputs and shifted targets);
consecutive sequences overlap by one token so no target is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SourceTokens:
    name: str
    docs: list[np.ndarray]  # each document's token ids, end-of-text appended


def occurrences(epochs: float, n_docs: int) -> int:
    """Documents of a source per pass: epochs x n, rounded half up."""
    return math.floor(epochs * n_docs + 0.5)


class Mixture:
    def __init__(self, sources: list[SourceTokens], weights: list[float], epochs: list[float], seed: int):
        if any(w <= 0 for w in weights) or any(e <= 0 for e in epochs):
            raise ValueError("mixture weights and epochs must be > 0")
        for src, e in zip(sources, epochs):
            if occurrences(e, len(src.docs)) == 0:
                raise ValueError(f"epochs {e} of source {src.name!r} ({len(src.docs)} documents) "
                                 "gives no document per pass")
        self.sources, self.weights, self.epochs, self.seed = sources, weights, epochs, seed
        self.state = {"pass": 0, "doc": 0, "offset": 0}
        self._order_pass, self._order = -1, []

    def pass_order(self, pass_idx: int) -> list[tuple[int, int]]:
        """The (source index, document index) sequence of one pass."""
        rng = np.random.default_rng([self.seed, pass_idx])
        queues = []
        for src, epochs in zip(self.sources, self.epochs):
            n = len(src.docs)
            occ = [rng.permutation(n) for _ in range(math.floor(epochs))]
            frac = occurrences(epochs, n) - math.floor(epochs) * n
            if frac:
                occ.append(rng.permutation(n)[:frac])
            queues.append(list(np.concatenate(occ)) if occ else [])
        order, heads = [], [0] * len(queues)
        w = np.asarray(self.weights, dtype=np.float64)
        while True:
            live = [i for i, q in enumerate(queues) if heads[i] < len(q)]
            if not live:
                return order
            p = w[live] / w[live].sum()
            s = live[rng.choice(len(live), p=p)] if len(live) > 1 else live[0]
            order.append((s, int(queues[s][heads[s]])))
            heads[s] += 1

    def _doc(self, pos: int) -> np.ndarray:
        if self._order_pass != self.state["pass"]:
            self._order, self._order_pass = self.pass_order(self.state["pass"]), self.state["pass"]
        s, d = self._order[pos]
        return self.sources[s].docs[d]

    def _take(self, n: int, advance: bool) -> np.ndarray:
        """Read n tokens from the cursor; move the cursor only if advance."""
        saved = dict(self.state)
        out, need = [], n
        while need:
            doc = self._doc(self.state["doc"])
            chunk = doc[self.state["offset"]:self.state["offset"] + need]
            out.append(chunk)
            need -= len(chunk)
            self.state["offset"] += len(chunk)
            if self.state["offset"] >= len(doc):
                self.state["doc"] += 1
                self.state["offset"] = 0
                if self.state["doc"] >= len(self._order):
                    self.state = {"pass": self.state["pass"] + 1, "doc": 0, "offset": 0}
        if not advance:
            self.state = saved
        return np.concatenate(out)

    def next_batch(self, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: [batch, seq_len] int64, y = x shifted by one."""
        rows = []
        for _ in range(batch):
            head = self._take(seq_len, advance=True)
            rows.append(np.concatenate([head, self._take(1, advance=False)]))
        seqs = torch.from_numpy(np.stack(rows).astype(np.int64))  # [batch, seq_len + 1]
        return seqs[:, :-1], seqs[:, 1:]

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: int(state[k]) for k in ("pass", "doc", "offset")}


def pack_validation(docs: list[np.ndarray], seq_len: int, max_seqs: int) -> torch.Tensor:
    """Held-out documents joined and cut into [n, seq_len + 1] sequences (no overlap)."""
    flat = np.concatenate(docs)
    n = min(max_seqs, (len(flat) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"validation set has {len(flat)} tokens, fewer than one sequence of {seq_len}")
    return torch.stack([torch.from_numpy(flat[i * seq_len:i * seq_len + seq_len + 1].astype(np.int64))
                        for i in range(n)])
