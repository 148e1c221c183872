"""Byte-level BPE (HF `tokenizers`), trained on the corpus, cached on disk, saved as tokenizer.json.

Byte-level means every byte 0..255 has a token, so any string round-trips exactly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moekit.errors import ConfigError

EOT = "<|endoftext|>"
# end-of-text spellings of other tokenizers (Llama, Llama 3, ChatML), tried in order
EOS_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        ids = [hf.token_to_id(t) for t in EOS_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise ConfigError(f"tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
        self.eot_id = found[0]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a piece of a UTF-8 character stays a piece)."""
        piece = self.hf.id_to_token(token_id) or ""
        table = _byte_decoder()
        if piece and all(ch in table for ch in piece) and self.hf.token_to_id(piece) not in self._special_ids():
            return bytes(table[ch] for ch in piece)
        return piece.encode("utf-8")

    def _special_ids(self) -> set[int]:
        return {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.hf.to_str())

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ConfigError(f"cannot read tokenizer {path}: {e}") from None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable characters standing for the bytes 0..255."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        chars, n = {}, 0
        for b in range(256):
            if b in keep:
                chars[b] = chr(b)
            else:
                chars[b] = chr(256 + n)
                n += 1
        _BYTE_DECODER = {c: b for b, c in chars.items()}
    return _BYTE_DECODER


_BYTE_DECODER: dict[str, int] | None = None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def cached_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    """Train once per (corpus, vocab size); later runs load the cached tokenizer.json."""
    h = hashlib.sha1(str(vocab_size).encode())
    for t in texts:
        h.update(hashlib.sha1(t.encode("utf-8", "surrogatepass")).digest())
    path = cache_dir / f"tokenizer-{vocab_size}-{h.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer.load(path)
    tok = train_tokenizer(texts, vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
