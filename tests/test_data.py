"""Data pipeline: byte-level tokenizer, tokenizer cache, the text+code corpus and its fixed split,
and the epoch/weight mixture that packs documents into training sequences.

References are independent of the code under test: GPT-2's byte->unicode table rebuilt here, a
token stream concatenated by hand from `pass_order`, closed-form occurrence counts, a second
mixture with the same seed, and the raw files the corpus is read from.
"""

from __future__ import annotations

import collections
import math
import random
import unicodedata

import numpy as np
import pytest
import torch

from moekit.config import DataConfig
from moekit.data import tokenizer as tok_mod
from moekit.data.corpus import Document, _split_long, code_files, load_corpus, split_source
from moekit.data.mixture import Mixture, SourceTokens, pack_validation
from moekit.data.tokenizer import EOT, Tokenizer, cached_tokenizer, train_tokenizer
from moekit.errors import ConfigError


# ------------------------------------------------------------------------------------------------
# Tokenizer

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n\treturn a + b\n\nimport os\nprint(add(1, 2))\n" * 10,
    "日本語のテキストと中文文本 😀🚀 café naïve Ελληνικά русский текст",
]


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return train_tokenizer(TRAIN_TEXTS, 320)


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode(): printable bytes map to themselves, the other 68 bytes to
    U+0100 onwards, in byte order (written out here, not taken from the tokenizers library)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def _random_text(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:  # anywhere in Unicode except surrogates (not encodable in UTF-8)
            while True:
                c = rng.randint(0, 0x10FFFF)
                if not 0xD800 <= c <= 0xDFFF:
                    break
            chars.append(chr(c))
        elif kind < 0.55:  # C0/C1 controls incl. NUL, DEL
            chars.append(chr(rng.choice(list(range(0, 32)) + list(range(127, 160)))))
        elif kind < 0.65:  # combining marks
            chars.append(chr(rng.randint(0x300, 0x36F)))
        elif kind < 0.75:  # emoji (incl. ZWJ and variation selector pieces)
            chars.append(rng.choice(["😀", "🚀", "👩\u200d💻", "🇺🇸", "\ufe0f", "\u200d", "🏳️‍🌈"]))
        elif kind < 0.85:  # CJK
            chars.append(chr(rng.randint(0x4E00, 0x9FFF)))
        else:
            chars.append(rng.choice([" ", "  ", "\t", "\n", "\r\n", "\r", "a", "Z", "\u00a0", "\u2028", "\ufeff"]))
    return "".join(chars)


def test_tokenizer_round_trips_arbitrary_unicode(small_tok):
    rng = random.Random(1234)
    samples = [_random_text(rng, rng.randint(0, 60)) for _ in range(300)]
    samples += ["", "\x00", "a\x00b\x00", "\t\n\r\n\x0b\x0c", "e\u0301\u0302", "한국어", "ｆｕｌｌｗｉｄｔｈ",
                "\U0010FFFF\U000E0001", " leading and trailing  ", "\n\n\n", "mixed 😀 text\twith\x07bell"]
    for s in samples:
        ids = small_tok.encode(s)
        assert all(0 <= i < small_tok.vocab_size for i in ids)
        assert small_tok.decode(ids) == s, repr(s)
        # no normalisation: NFC/NFD variants stay distinct strings after the round trip
        nfd = unicodedata.normalize("NFD", s)
        assert small_tok.decode(small_tok.encode(nfd)) == nfd


def test_every_byte_value_has_a_token(small_tok):
    vocab = small_tok.hf.get_vocab()
    alphabet = _gpt2_byte_alphabet()
    assert len(set(alphabet)) == 256
    missing = [b for b, ch in enumerate(alphabet) if ch not in vocab]
    assert missing == []
    # strings made of chr(0..255), i.e. every byte decoded as latin-1, round-trip
    latin1 = bytes(range(256)).decode("latin-1")
    assert small_tok.decode(small_tok.encode(latin1)) == latin1
    for b in range(256):
        s = bytes([b]).decode("latin-1")
        assert small_tok.decode(small_tok.encode(s)) == s
    rng = random.Random(7)
    for _ in range(50):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        s = raw.decode("latin-1")
        assert small_tok.decode(small_tok.encode(s)).encode("latin-1") == raw


def test_tokenizer_has_eot_and_vocab_size(small_tok):
    assert small_tok.vocab_size == 320
    assert small_tok.hf.token_to_id(EOT) == small_tok.eot_id
    assert small_tok.decode([small_tok.eot_id]) == EOT


def test_tokenizer_save_load_identical(small_tok, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    small_tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == small_tok.vocab_size
    assert loaded.eot_id == small_tok.eot_id
    rng = random.Random(5)
    texts = TRAIN_TEXTS + [_random_text(rng, 40) for _ in range(50)]
    assert loaded.encode_batch(texts) == small_tok.encode_batch(texts)
    for t in texts:
        assert loaded.encode(t) == small_tok.encode(t)
    # no leftover temp files from the atomic write
    assert sorted(p.name for p in path.parent.iterdir()) == ["tok.json"]


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="cannot read tokenizer"):
        Tokenizer.load(bad)


def test_cached_tokenizer_reuses_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tok1 = cached_tokenizer(TRAIN_TEXTS, 300, cache)
    files = list(cache.iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    content = files[0].read_bytes()

    def no_training(*a, **k):
        raise AssertionError("cached tokenizer was retrained")

    monkeypatch.setattr(tok_mod, "train_tokenizer", no_training)
    tok2 = cached_tokenizer(TRAIN_TEXTS, 300, cache)
    assert list(cache.iterdir()) == files
    assert files[0].stat().st_mtime_ns == mtime
    assert files[0].read_bytes() == content
    assert tok2.encode_batch(TRAIN_TEXTS) == tok1.encode_batch(TRAIN_TEXTS)
    monkeypatch.undo()

    # another corpus or another vocab size is another cache entry
    cached_tokenizer(TRAIN_TEXTS[:2], 300, cache)
    cached_tokenizer(TRAIN_TEXTS, 290, cache)
    assert len(list(cache.iterdir())) == 3


# ------------------------------------------------------------------------------------------------
# Mixture

def synthetic_sources(n_text: int = 6, n_code: int = 5, seed: int = 0) -> list[SourceTokens]:
    """Documents of distinct token ids: source s, doc d holds ids 1000*(s+1) + 10*d + j, so every
    token tells which document (and where in it) it came from."""
    rng = np.random.default_rng(seed)
    out = []
    for s, (name, n) in enumerate([("text", n_text), ("code", n_code)]):
        docs = [np.arange(int(rng.integers(3, 10)), dtype=np.int32) + 1000 * (s + 1) + 10 * d for d in range(n)]
        out.append(SourceTokens(name, docs))
    return out


def doc_of(token: int) -> tuple[int, int]:
    return token // 1000 - 1, (token % 1000) // 10


def stream_of(mix: Mixture, pass_idx: int) -> np.ndarray:
    return np.concatenate([mix.sources[s].docs[d] for s, d in mix.pass_order(pass_idx)])


@pytest.mark.parametrize("epochs", [[2.0, 4.0], [1.5, 2.3], [0.5, 1.0], [3.0, 0.4]])
def test_pass_holds_each_doc_epochs_times(epochs):
    sources = synthetic_sources(6, 7)
    mix = Mixture(sources, [1.0, 1.0], epochs, seed=3)
    order = mix.pass_order(0)
    counts = collections.Counter(order)
    for s, (src, e) in enumerate(zip(sources, epochs)):
        n = len(src.docs)
        per_doc = [counts[(s, d)] for d in range(n)]
        assert sum(per_doc) == round(e * n)
        # whole epochs: every doc exactly e times; fractional: floor or ceil
        assert all(math.floor(e) <= c <= math.ceil(e) for c in per_doc), per_doc
        if e == int(e):
            assert per_doc == [int(e)] * n
    assert len(order) == sum(round(e * len(src.docs)) for src, e in zip(sources, epochs))
    # no foreign (source, doc) pairs
    assert all(0 <= d < len(sources[s].docs) for s, d in counts)


def test_stream_of_one_pass_is_the_docs_in_pass_order():
    sources = synthetic_sources(4, 3)
    mix = Mixture(sources, [1.0, 1.0], [2.0, 4.0], seed=11)
    stream0, stream1 = stream_of(mix, 0), stream_of(mix, 1)
    full = np.concatenate([stream0, stream1])
    L, B = 5, 2
    xs, ys = [], []
    while mix.state["pass"] == 0:
        x, y = mix.next_batch(B, L)
        assert x.shape == y.shape == (B, L) and x.dtype == y.dtype == torch.int64
        xs += list(x.numpy())
        ys += list(y.numpy())
    assert mix.state["pass"] == 1
    flat_x = np.concatenate(xs)
    assert len(flat_x) >= len(stream0) > len(flat_x) - B * L  # stopped within the pass' last batch
    assert np.array_equal(flat_x, full[:len(flat_x)])
    for r, y in enumerate(ys):
        # targets: the next token of the stream; row r+1 starts where row r's inputs end
        assert np.array_equal(y, full[r * L + 1:r * L + L + 1])
    # the cursor now points into pass 1 exactly past the tokens consumed from it
    consumed_in_pass1 = len(flat_x) - len(stream0)
    x, _ = mix.next_batch(1, L)
    assert np.array_equal(x[0].numpy(), stream1[consumed_in_pass1:consumed_in_pass1 + L])


def test_y_is_x_shifted_by_one():
    mix = Mixture(synthetic_sources(), [2.0, 1.0], [2.0, 4.0], seed=0)
    prev_last = None
    for _ in range(30):
        x, y = mix.next_batch(3, 7)
        assert torch.equal(y[:, :-1], x[:, 1:])
        # consecutive sequences overlap by one token: next row's first input is this row's last target
        assert torch.equal(x[1:, 0], y[:-1, -1])
        if prev_last is not None:
            assert x[0, 0].item() == prev_last
        prev_last = y[-1, -1].item()


def test_weights_set_the_draw_ratio():
    n = 400
    sources = [SourceTokens("text", [np.array([i], dtype=np.int32) for i in range(n)]),
               SourceTokens("code", [np.array([i], dtype=np.int32) for i in range(n)])]
    mix = Mixture(sources, [3.0, 1.0], [1.0, 1.0], seed=42)
    order = mix.pass_order(0)
    head = [s for s, _ in order[:200]]  # both sources still have docs left throughout
    frac_text = head.count(0) / len(head)
    assert 0.65 < frac_text < 0.85, frac_text  # expected 0.75, sd ~0.03
    # once the heavier source runs dry, the rest of the pass is the other source
    last_text = max(i for i, (s, _) in enumerate(order) if s == 0)
    assert all(s == 1 for s, _ in order[last_text + 1:])
    assert last_text < len(order) - 1
    # equal weights -> about even
    even = Mixture(sources, [1.0, 1.0], [1.0, 1.0], seed=42).pass_order(0)[:200]
    assert 0.4 < sum(s == 0 for s, _ in even) / 200 < 0.6


def test_within_a_pass_each_epoch_is_a_permutation():
    sources = synthetic_sources(6, 5)
    mix = Mixture(sources, [1.0, 1.0], [2.0, 4.0], seed=9)
    order = mix.pass_order(0)
    for s, e in [(0, 2), (1, 4)]:
        docs = [d for src, d in order if src == s]
        n = len(sources[s].docs)
        for k in range(e):
            assert sorted(docs[k * n:(k + 1) * n]) == list(range(n))


def test_same_seed_same_batches_different_seed_different_order():
    def batches(seed, n=25):
        mix = Mixture(synthetic_sources(), [1.0, 1.0], [2.0, 4.0], seed=seed)
        return [mix.next_batch(2, 6) for _ in range(n)]

    a, b, c = batches(5), batches(5), batches(6)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    m5 = Mixture(synthetic_sources(), [1.0, 1.0], [2.0, 4.0], seed=5)
    m6 = Mixture(synthetic_sources(), [1.0, 1.0], [2.0, 4.0], seed=6)
    assert m5.pass_order(0) != m6.pass_order(0)
    # successive passes are reshuffled, but each is reproducible
    assert m5.pass_order(0) != m5.pass_order(1)
    assert m5.pass_order(1) == Mixture(synthetic_sources(), [1.0, 1.0], [2.0, 4.0], seed=5).pass_order(1)


@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_state_dict_restores_exact_position(k):
    sources = synthetic_sources(4, 3)
    mix = Mixture(sources, [1.0, 2.0], [2.0, 4.0], seed=21)
    for _ in range(k):
        mix.next_batch(2, 5)
    state = mix.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = [mix.next_batch(2, 5) for _ in range(30)]  # crosses into later passes
    assert mix.state["pass"] >= 1
    fresh = Mixture(synthetic_sources(4, 3), [1.0, 2.0], [2.0, 4.0], seed=21)
    fresh.load_state_dict(dict(state))
    for xe, ye in expected:
        x, y = fresh.next_batch(2, 5)
        assert torch.equal(x, xe) and torch.equal(y, ye)
    # and the state itself is a value copy: mutating the mixture did not alter it
    assert state == {k2: state[k2] for k2 in ("pass", "doc", "offset")}


def test_mixture_rejects_nonpositive_weights_or_epochs():
    with pytest.raises(ValueError):
        Mixture(synthetic_sources(), [1.0, 0.0], [1.0, 1.0], seed=0)
    with pytest.raises(ValueError):
        Mixture(synthetic_sources(), [1.0, 1.0], [1.0, -1.0], seed=0)


def test_pack_validation_cuts_the_joined_docs():
    docs = [np.arange(i * 100, i * 100 + 7 + i, dtype=np.int32) for i in range(5)]
    flat = np.concatenate(docs)
    L = 6
    seqs = pack_validation(docs, L, max_seqs=100)
    n = (len(flat) - 1) // L
    assert seqs.shape == (n, L + 1) and seqs.dtype == torch.int64
    for i in range(n):
        assert np.array_equal(seqs[i].numpy(), flat[i * L:i * L + L + 1])
    assert pack_validation(docs, L, max_seqs=2).shape == (2, L + 1)
    with pytest.raises(ValueError):
        pack_validation([np.arange(3)], 8, 4)


# ------------------------------------------------------------------------------------------------
# Corpus

@pytest.fixture(scope="module")
def corpus():
    cfg = DataConfig(max_docs=12, max_doc_chars=3000, val_docs=3)
    return cfg, load_corpus(cfg)


def test_corpus_has_both_sources(corpus):
    cfg, c = corpus
    assert set(c) == {"text", "code"}
    for name, (train, val) in c.items():
        assert len(train) == 12 and len(val) == 3
        assert all(isinstance(d, Document) and d.name.startswith(name + ":") for d in train + val)
        assert all(d.text.strip() for d in train + val)
        names = [d.name for d in train + val]
        assert len(set(names)) == len(names)


def test_code_docs_are_python(corpus):
    _, c = corpus
    train, val = c["code"]
    docs = train + val
    pythonic = [d for d in docs if any(kw in d.text for kw in ("def ", "import ", "class ", "return", "self"))]
    assert len(pythonic) >= 0.8 * len(docs)
    prose = c["text"][0]
    assert sum(("the" in d.text.lower()) for d in prose) == len(prose)


def test_split_long_pieces_rejoin_to_the_file():
    rel, path = next((r, p) for r, p in code_files() if r == "json/decoder.py")
    text = path.read_text(encoding="utf-8")
    pieces = _split_long("code:" + rel, text, 1000)
    assert len(pieces) > 1
    assert "".join(p.text for p in pieces) == text
    assert all(len(p.text) <= 1000 for p in pieces)
    assert [p.name for p in pieces] == [f"code:{rel}#{i}" for i in range(len(pieces))]
    assert _split_long("x", text, 0)[0].text == text


def test_validation_split_is_fixed_and_disjoint(corpus):
    from moekit.data.corpus import load_source

    cfg, c = corpus
    for name, (train, val) in c.items():
        assert not {d.name for d in train} & {d.name for d in val}
    docs = load_source("text", cfg.max_doc_chars)
    vals, trains = [], []
    for max_docs in (0, 5, 12, 50):
        tr, va = split_source(docs, 3, max_docs)
        vals.append([d.name for d in va])
        trains.append([d.name for d in tr])
        assert not set(vals[-1]) & set(trains[-1])
    assert all(v == vals[0] for v in vals)
    assert vals[0] == [d.name for d in c["text"][1]]
    # smaller runs use a prefix of the larger runs' training documents
    assert trains[1] == trains[0][:5] and trains[2] == trains[0][:12] and trains[3] == trains[0][:50]
    # and the split does not depend on the order the documents were listed in
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert [d.name for d in split_source(shuffled, 3, 5)[1]] == vals[0]
    with pytest.raises(ConfigError):
        split_source(docs[:3], 3)


def test_split_long_respects_max_chars_for_long_lines():
    text = ("word " * 1000).strip() + "\n" + "short line\n"  # one 4999-character paragraph
    pieces = _split_long("text:x", text, 1000)
    assert "".join(p.text for p in pieces) == text
    assert all(len(p.text) <= 1000 for p in pieces), [len(p.text) for p in pieces]


# ------------------------------------------------------------------------------------------------
# Mixture settings a user can get wrong

def test_pass_without_documents_is_a_clear_error():
    with pytest.raises(ValueError, match="epochs"):  # at construction or at the first batch
        mix = Mixture(synthetic_sources(6, 5), [1.0, 1.0], [0.01, 0.01], seed=0)
        mix.next_batch(1, 4)


def test_cli_rejects_nonpositive_epochs_with_one_line(tmp_path, tmp_path_factory, capsys):
    from moekit.cli import main as cli_main

    cfg = tmp_path / "run.toml"
    cache = tmp_path_factory.getbasetemp() / "moekit-cache"
    cfg.write_text(f"""
[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 2
ffn_dim = 64
n_experts = 4
max_seq_len = 64
[train]
out_dir = "{tmp_path / 'run'}"
seq_len = 32
micro_batch = 2
steps = 2
sample_tokens = 0
[data]
max_docs = 12
max_doc_chars = 3000
val_docs = 3
epochs = [0.0, 4.0]
cache_dir = "{cache}"
""")
    rc = cli_main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "epochs" in err
    assert not (tmp_path / "run").exists()
