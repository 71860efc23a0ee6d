"""A word count's input: text read in chunks that cut no word, tokenized,
counted per chunk (the mapper's combiner) and keyed (kv_wire.word_key)."""
from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from bpf import kv_wire

from .kv_messages import KVError

INT32_MAX = 2**31 - 1
CHUNK_BYTES = 4 << 20          # the mapper's combiner counts this much text at a time
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode); everything else separates


def tokenize(text: str) -> list[str]:
    """Words of a text: lowercased, split on everything that is not a letter or a
    digit (underscore and punctuation separate; Unicode letters count)."""
    return _TOKEN.findall(text.lower())


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES, split: str = "words") -> Iterator[bytes]:
    """The file's bytes in pieces of about chunk_bytes, each cut just after a
    byte where the cut changes no word (split "words": an ASCII separator that
    str.lower() does not look across, so not ' . : ^ `, which can decide a
    final sigma; "whitespace": ASCII whitespace). A UTF-8 sequence never
    contains an ASCII byte, so none is split either. Cutting inside long lines
    keeps the combiner's one C call (which holds the GIL, and with it the
    heartbeat) short; only a run with no such byte grows a piece."""
    cut_after = _CUT_AFTER[split]
    with open(path, "rb") as f:
        held: list[bytes] = []  # read but not yielded: no cut byte in any of it
        while data := f.read(chunk_bytes):
            cut = data.translate(cut_after).rfind(b"\0") + 1
            if not cut:
                held.append(data)
                continue
            yield b"".join([*held, data[:cut]])
            held = [data[cut:]] if cut < len(data) else []
        if held:
            yield b"".join(held)


# The ASCII bytes str.split() splits on (bytes.split() leaves out \x1c-\x1f).
_ASCII_SPACE = bytes(range(9, 14)) + bytes(range(0x1c, 0x21))
# 0 where a chunk may end. words: ASCII bytes that are neither letters, digits
# nor case-ignorable.
_CUT_AFTER = {
    "words": bytes(0 if c < 128 and not chr(c).isalnum() and chr(c) not in "'.:^`" else 1 for c in range(256)),
    "whitespace": bytes(0 if c in _ASCII_SPACE else 1 for c in range(256)),
}
SPLITS = tuple(_CUT_AFTER)


# ASCII: letters lowercased, digits kept, every other byte a separator.
_ASCII_WORDS = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 else 32
                     for c in range(256))
# Per split, ASCII text translated so that bytes.split() gives its words.
_ASCII_TO_SPACES = {"words": _ASCII_WORDS,
                    "whitespace": bytes(32 if c in _ASCII_SPACE else c for c in range(256))}


def count_words(chunk: bytes, split: str = "words") -> Counter:
    """The chunk's words (UTF-8, invalid bytes replaced), counted; the words as
    UTF-8 bytes. split "words": tokenize(); "whitespace": str.split(), case
    kept (Hadoop's and Spark's WordCount examples). ASCII text (the usual
    case) skips decoding and the regular expression: same words, about twice
    as fast."""
    if chunk.isascii():
        return Counter(chunk.translate(_ASCII_TO_SPACES[split]).split())
    text = chunk.decode("utf-8", errors="replace")
    words = text.split() if split == "whitespace" else tokenize(text)
    return Counter({w.encode("utf-8"): n for w, n in Counter(words).items()})


def split_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key, count) pairs as int32 tuples: a count above INT32_MAX becomes several
    tuples of the same key (INT32_MAX each, then the rest)."""
    keys = np.asarray(keys, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 1:
        raise ValueError("counts must be positive")
    if not counts.size or counts.max() <= INT32_MAX:
        return keys, counts.astype(np.int32)
    reps = -(-counts // INT32_MAX)
    k = np.repeat(keys, reps)
    v = np.full(k.size, INT32_MAX, dtype=np.int64)
    last = np.cumsum(reps) - 1
    v[last] = counts - (reps - 1) * INT32_MAX
    return k, v.astype(np.int32)


class WordSource:
    """A mapper's input as tuples, one chunk at a time: the words of each chunk
    counted (the mapper's combiner) and keyed. Keeps the key -> word
    dictionary, the collisions among this mapper's own words (key, word, other
    word), the number of words and the time spent. A word is hashed once
    (a cache of word -> key), not once per chunk."""

    def __init__(self, paths: Iterable[str], chunk_bytes: int = CHUNK_BYTES, key_fn=kv_wire.word_key,
                 split: str = "words"):
        if split not in SPLITS:
            raise KVError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        self.dictionary: dict[int, str] = {}
        self.collisions: list = []
        self.words = 0
        self.map_s = 0.0
        self._key_fn = key_fn
        self._keys: dict[bytes, int] = {}
        self._split = split
        self._chunks = (c for p in paths for c in read_chunks(p, chunk_bytes, split))

    def _key(self, w: bytes) -> int:
        word = w.decode("utf-8")
        k = self._key_fn(word)
        old = self.dictionary.setdefault(k, word)
        if old != word:
            self.collisions.append((k, old, word))
        self._keys[w] = k
        return k

    def add(self, counter: Counter) -> tuple[np.ndarray, np.ndarray]:
        """One chunk's word counts ({UTF-8 word: count}) as tuples."""
        get = self._keys.get
        keys = [get(w) or self._key(w) for w in counter]
        counts = np.fromiter(counter.values(), np.int64, len(counter))
        return split_counts(np.array(keys, dtype=np.uint64), counts)

    def next(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next chunk's tuples, or None at the end of the input."""
        t0 = time.perf_counter()
        try:
            chunk = next(self._chunks)
        except StopIteration:
            return None
        c = count_words(chunk, self._split)
        self.words += sum(c.values())
        out = self.add(c)
        self.map_s += time.perf_counter() - t0
        return out


def map_file(paths: Iterable[str], chunk_bytes: int = CHUNK_BYTES, key_fn=kv_wire.word_key,
             split: str = "words"):
    """All tuples of the input files, combined per chunk. Returns (keys, values,
    dictionary, collisions, words)."""
    src = WordSource(paths, chunk_bytes, key_fn, split)
    ks, vs = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)]
    while (t := src.next()) is not None:
        ks.append(t[0])
        vs.append(t[1])
    return np.concatenate(ks), np.concatenate(vs), src.dictionary, src.collisions, src.words
