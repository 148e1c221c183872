"""Long-context evaluation: loss by position bucket on held-out long documents, and passkey
retrieval at several lengths and depths; a table, JSON and a PNG of loss vs position."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from moekit.config import DataConfig
from moekit.data.corpus import load_corpus
from moekit.data.tokenizer import Tokenizer
from moekit.infer.generate import generate
from moekit.model.transformer import Transformer

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def long_sequences(tokenizer: Tokenizer, data: DataConfig, length: int, max_seqs: int = 16) -> dict[str, torch.Tensor]:
    """Per source, held-out documents of at least length + 1 tokens (code: a module's pieces
    joined in order), cut to [n, length + 1]."""
    out = {}
    for source, (_, val) in load_corpus(data).items():
        by_file: dict[str, list[str]] = {}
        for d in sorted(val, key=lambda d: d.name):
            by_file.setdefault(d.name.split("#")[0], []).append(d.text)
        seqs = []
        for texts in by_file.values():
            ids = tokenizer.encode("".join(texts))
            if len(ids) > length:
                seqs.append(torch.tensor(ids[:length + 1]))
        if seqs:
            out[source] = torch.stack(seqs[:max_seqs])
    return out


@torch.no_grad()
def loss_by_position(model: Transformer, seqs: torch.Tensor, buckets: int, batch: int = 4) -> list[float]:
    """Mean next-token loss in `buckets` equal slices of the positions of seqs [n, L + 1]."""
    model.eval()
    dev = next(model.parameters()).device
    total = torch.zeros(seqs.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(seqs), batch):
        s = seqs[i:i + batch].to(dev)
        logits = model(s[:, :-1]).logits.float()  # [b, L, V]
        ce = F.cross_entropy(logits.transpose(1, 2), s[:, 1:], reduction="none")  # [b, L]
        total += ce.sum(0).double().cpu()
    per_pos = total / len(seqs)
    return [float(c.mean()) for c in per_pos.chunk(buckets)]


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int) -> list[int]:
    """About `length` tokens of filler with the key sentence at `depth` (0 = start, 1 = end)."""
    head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer.encode(head + needle + question))
    unit = tokenizer.encode(FILLER)
    n_fill = max(0, length - fixed) // len(unit)
    before = round(n_fill * depth)
    text = head + FILLER * before + needle + FILLER * (n_fill - before) + question
    return tokenizer.encode(text)


@torch.no_grad()
def passkey_accuracy(model: Transformer, tokenizer: Tokenizer, length: int, depth: float, trials: int,
                     seed: int = 0) -> float:
    rng = random.Random(seed)
    dev = next(model.parameters()).device
    hits = 0
    for _ in range(trials):
        key = rng.randint(10000, 99999)
        ids = passkey_prompt(tokenizer, length, depth, key)
        if len(ids) + 8 > model.cfg.max_seq_len:
            raise ValueError(f"a passkey prompt of {len(ids)} tokens exceeds the context of {model.cfg.max_seq_len}")
        out = generate(model, torch.tensor([ids], device=dev), 8, temperature=0)
        hits += str(key) in tokenizer.decode(out[0, len(ids):].tolist())
    return hits / trials


def plot_loss_by_position(results: dict[str, dict[str, list[float]]], length: int, path, trained_len: dict[str, int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_source in results.items():
        for source, losses in per_source.items():
            x = (np.arange(len(losses)) + 0.5) * length / len(losses)
            ax.plot(x, losses, marker="o", label=f"{name}: {source}")
    for name, n in trained_len.items():
        ax.axvline(n, ls="--", color="gray", lw=1)
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("loss by position (dashed: training context lengths)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
