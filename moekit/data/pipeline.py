"""Corpus -> tokenizer -> token mixture + held-out validation sequences, for one run config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.config import RunConfig
from moekit.errors import ConfigError
from moekit.data.corpus import load_corpus
from moekit.data.mixture import Mixture, SourceTokens, pack_validation
from moekit.data.tokenizer import Tokenizer, cached_tokenizer


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    mixture: Mixture
    val: dict[str, torch.Tensor]  # source -> [n, seq_len + 1]
    stats: dict[str, dict]  # source -> document and token counts


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> DataBundle:
    corpus = load_corpus(cfg.data)
    if tokenizer is None:
        vocab = cfg.data.tokenizer_vocab or cfg.model.vocab_size
        texts = [d.text for train, _ in corpus.values() for d in train]
        tokenizer = cached_tokenizer(texts, vocab, cache_dir(cfg))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}")
    eot = np.array([tokenizer.eot_id], dtype=np.int32)

    def tokenize(docs):
        return [np.concatenate([np.asarray(ids, dtype=np.int32), eot])
                for ids in tokenizer.encode_batch([d.text for d in docs])]

    sources, val, stats = [], {}, {}
    max_val = cfg.train.eval_batches * cfg.train.micro_batch
    for name, (train_docs, val_docs) in corpus.items():
        toks = tokenize(train_docs)
        sources.append(SourceTokens(name, toks))
        val[name] = pack_validation(tokenize(val_docs), cfg.train.seq_len, max_val)
        stats[name] = {"train_docs": len(train_docs), "val_docs": len(val_docs),
                       "train_tokens": int(sum(len(t) for t in toks)),
                       "train_chars": sum(len(d.text) for d in train_docs)}
    mixture = Mixture(sources, cfg.data.weights, cfg.data.epochs, cfg.train.seed)
    return DataBundle(tokenizer, mixture, val, stats)


def unigram_entropy(sources: list[SourceTokens], vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus' unigram distribution: the loss of the best model that
    ignores context, a baseline the trained model must beat."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for s in sources:
        for d in s.docs:
            counts += np.bincount(d, minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
