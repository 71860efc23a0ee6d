"""Word count through the switch (key-value mode): the mapper and the reducer.

Mapper (`inc-agent kv-map`): registers, then reads its text a chunk at a time,
counts the words of each chunk (count_words: the mapper's combiner), keys them
(WordSource) and sends the chunk's (key, int32 value) tuples while it maps the
next: INC_T_KV packets, psn 0, 1, 2, ... with at most W psns unacknowledged
(W <= INC_KV_WINDOW, the switch's seen ring per flow, so a resend always finds
its psn's seen state). Which tuples go through the switch (_Router): each key
has a fixed place in the packet (kv_row: RowPacker), so it always meets the
same aggregator; when the mapper has a part of the switch array of its own it
knows which keys hold an aggregator there (PartOwners, the hottest first) and
only those go through the switch, the rest straight to the reducer in dense
packets (--all-via-switch: everything through the switch; --direct: nothing,
switch aggregation off, a baseline for benchmarks). A psn is acknowledged by
the switch (INC_T_KV_ACK: all tuples absorbed) or by the reducer (an
INC_T_KV_ACK from the reducer's address: it got the leftovers). A psn not
acknowledged within the retransmission timeout is resent with INC_F_RETRANS;
the switch re-ACKs it or replays the same leftovers, never adds it twice. When
every psn is acknowledged, the mapper sends the reducer its dictionary (key ->
word for every key it sent; dictionary_line) over TCP at the reducer's address
and UDP port number, reads {"ok": true}, says "done" to incd and only then
closes that TCP connection (so the reducer knows it has left the job).

Reducer (`inc-agent kv-reduce`, registered as the job's PS): adds the leftover
tuples the switch forwards, each (flow, psn) once (a replayed or duplicated
leftover packet is acknowledged again but not added), and acknowledges each
straight to its mapper; takes the mappers' dictionaries on TCP. When all of
them are in (every psn of every mapper acknowledged, so every leftover is
here), it drains the switch's aggregators twice ("kv_drain": the epoch flips
each time, so both copies are read), waits for the mappers to have left, says
"done" and writes {word: count}. A key claimed by two words (a 64-bit hash
collision, between mappers or within one) is never merged silently: the
colliding keys are left out of the counts and reported, exit status 3. A key
with no word in any dictionary is an error (exit status 1).

The pure parts (tokenize, count_words, WordSource, split_counts, AckWindow,
parse_acks, dictionary_line, ReducerState; RowPacker and PartOwners in
kv_wire) are unit-tested in tests/test_kv_agents.py.
"""
from __future__ import annotations

import base64
import binascii
import json
import queue
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from bpf import control, kv_wire, wire

from . import batchio
from .incd_link import Control, TransportError, connect_incd
from .transport import data_socket

INT32_MAX = 2**31 - 1
CHUNK_BYTES = 4 << 20          # the mapper's combiner counts this much text at a time
MIN_RTO, MAX_RTO = 0.02, 1.0
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode); everything else separates


class KVError(TransportError):
    pass


class CollisionError(KVError):
    """Two words share a key: their counts cannot be told apart."""


# --- tokenizing and combining (pure) ---------------------------------------------

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


# --- the mapper's window (pure) ------------------------------------------------------

class AckWindow:
    """Which psns of 0..n-1 may be sent, which are acknowledged, which are due
    for a resend. psn p is sent only while p < base + window, base = lowest psn
    not acknowledged."""

    def __init__(self, n: int, window: int):
        if not 1 <= window <= wire.KV_WINDOW:
            raise ValueError(f"window must be in 1..{wire.KV_WINDOW}")
        self.n, self.window = n, window
        self.acked = np.zeros(n, dtype=bool)
        self.sent_at = np.zeros(n)
        self.sends = np.zeros(n, dtype=np.int32)
        self.base = self.next = self.nacked = 0

    def extend(self, k: int) -> None:
        """k more psns (n, n+1, ...) to send: the mapper builds packets as it maps."""
        self.acked = np.concatenate([self.acked, np.zeros(k, dtype=bool)])
        self.sent_at = np.concatenate([self.sent_at, np.zeros(k)])
        self.sends = np.concatenate([self.sends, np.zeros(k, dtype=np.int32)])
        self.n += k

    @property
    def idle(self) -> bool:
        """Nothing sent is waiting for an acknowledgement."""
        return self.base == self.next

    @property
    def finished(self) -> bool:
        return self.nacked == self.n

    def to_send(self) -> tuple[int, int]:
        """[start, stop) of the new psns the window allows now."""
        stop = min(self.n, self.base + self.window)
        return self.next, max(self.next, stop)

    def mark_sent(self, start: int, stop: int, now: float) -> None:
        self.sent_at[start:stop] = now
        self.sends[start:stop] += 1
        self.next = max(self.next, stop)

    def ack(self, idx: np.ndarray) -> np.ndarray:
        """Marks psns acknowledged; returns those that were not before (each once)."""
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        idx = idx[(idx >= 0) & (idx < self.next)]
        new = idx[~self.acked[idx]]
        self.acked[new] = True
        self.nacked += new.size
        if self.base < self.n and self.acked[self.base]:
            rest = self.acked[self.base:]
            self.base = self.n if rest.all() else self.base + int(rest.argmin())
        return new

    def due(self, now: float, rto: float) -> np.ndarray:
        """Sent, not acknowledged, and older than rto."""
        span = np.arange(self.base, self.next)
        return span[~self.acked[span] & (now - self.sent_at[span] > rto)]


def parse_acks(rows: np.ndarray, lens: np.ndarray, *, job: int, gen: int, flow: int, n: int) -> np.ndarray:
    """psn indices (0..n-1) acknowledged by a batch of received datagrams: intact
    INC_T_KV_ACKs of this job, generation and flow."""
    k = rows.shape[0]
    if not k:
        return np.zeros(0, np.int64)
    h = np.frombuffer(rows[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
    ok = ((lens >= wire.HDR_LEN) & (h["version"] == wire.VERSION) & (h["type"] == wire.T_KV_ACK)
          & (h["job"] == job) & (h["gen"] == gen) & (h["rank"] == flow) & wire.csum_ok(rows, lens))
    idx = h["psn"].astype(np.int64)
    return idx[ok & (idx < n)]


def build_acks(*, job: int, gen: int, flows, psns, tuples) -> np.ndarray:
    """The reducer's acknowledgements of leftover packets: header-only
    INC_T_KV_ACKs (slot = tuples it took), sealed, one uint8 row each."""
    flows = np.asarray(flows, np.int64)
    h = np.zeros(flows.size, wire.HDR_DTYPE)
    h["version"], h["type"], h["op"] = wire.VERSION, wire.T_KV_ACK, wire.OP_SUM
    h["job"], h["gen"], h["rank"] = job, gen, flows
    h["psn"] = np.asarray(psns, np.int64) & 0xFFFFFFFF
    h["slot"] = tuples
    rows = h.view(np.uint8).reshape(flows.size, wire.HDR_LEN).copy()
    wire.seal_rows(rows, np.zeros(flows.size, np.int64))
    return rows


def build_ack(*, job: int, gen: int, flow: int, psn: int, tuples: int = 0) -> bytes:
    """One of build_acks() as bytes."""
    return build_acks(job=job, gen=gen, flows=[flow], psns=[psn], tuples=[tuples])[0].tobytes()


def dictionary_line(job: int, flow: int, dictionary: dict[int, str], collisions=()) -> bytes:
    """A mapper's dictionary for the reducer, one JSON line: the keys as one
    base64 string of little-endian u64s and the words joined by newlines (a
    word never holds one), in the same order: a fraction of the size and
    parse time of a JSON object with a member per word."""
    keys = np.fromiter(dictionary.keys(), np.uint64, len(dictionary))
    msg = {"job": job, "flow": flow, "keys": base64.b64encode(keys.astype("<u8").tobytes()).decode(),
           "words": "\n".join(dictionary.values()),
           "collisions": [[str(k), a, b] for k, a, b in collisions]}
    return (json.dumps(msg, ensure_ascii=False) + "\n").encode("utf-8")


def parse_dictionary(line: bytes, job: int) -> tuple[int, list[int], list[str], list]:
    """dictionary_line() back: (flow, keys, words, collisions); ValueError if it
    is not a dictionary of this job."""
    msg = json.loads(line)
    if not isinstance(msg, dict) or msg.get("job") != job or not isinstance(msg.get("flow"), int) \
            or isinstance(msg.get("flow"), bool) or not isinstance(msg.get("keys"), str) \
            or not isinstance(msg.get("words"), str) or not isinstance(msg.get("collisions", []), list):
        raise ValueError("not a dictionary of this job")
    try:
        raw = base64.b64decode(msg["keys"], validate=True)
    except binascii.Error as e:
        raise ValueError(f"keys: {e}") from None
    if len(raw) % 8:
        raise ValueError("keys: not a whole number of u64s")
    keys = np.frombuffer(raw, "<u8").tolist()
    words = msg["words"].split("\n") if keys else []
    if len(words) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(words)} words")
    col = msg.get("collisions") or []
    if not all(isinstance(c, list) and len(c) == 3 and all(isinstance(x, str) for x in c) for c in col):
        raise ValueError("collisions: not [key, word, word] triples")
    try:
        col = [(int(k), a, b) for k, a, b in col]
    except ValueError:
        raise ValueError("collisions: a key that is not a number") from None
    return msg["flow"], keys, words, col


# --- the reducer's state (pure) -----------------------------------------------------

@dataclass
class ReduceSummary:
    leftover_packets: int = 0      # distinct (flow, psn) leftover packets added
    leftover_tuples: int = 0
    partial_packets: int = 0       # of those, ones the switch absorbed part of
    dup_packets: int = 0           # replays/duplicates acknowledged again, not added
    bad_packets: int = 0           # wrong job/gen/flow/type or bad csum
    drain_keys: int = 0            # distinct keys (per drain) read from the switch
    drain_total: int = 0           # sum of the values drained from the switch
    leftover_total: int = 0        # sum of the leftover values
    drains: int = 0
    words: int = 0
    dictionaries: int = 0
    collisions: list = field(default_factory=list)


class ReducerState:
    """Leftovers (each (flow, psn) once), drained sums and dictionaries -> counts."""

    def __init__(self, job: int, gen: int, world: int):
        self.job, self.gen, self.world = job, gen, world
        self.seen: set[tuple[int, int]] = set()
        self._keys: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self.words: dict[int, str] = {}
        self.dict_from: set[int] = set()
        self.s = ReduceSummary()

    def packet(self, data: bytes) -> tuple[int, int, int] | None:
        """One datagram from the switch: see packets()."""
        row = np.zeros((1, (max(len(data), wire.HDR_LEN) + 7) // 4 * 4), np.uint8)
        row[0, :len(data)] = np.frombuffer(data, np.uint8)
        r = self.packets(row, np.array([len(data)]))
        return r[0] if r else None

    def packets(self, rows: np.ndarray, lens: np.ndarray) -> list[tuple[int, int, int]]:
        """A batch of datagrams from the switch (uint8 rows, lens[i] bytes of
        row i). Returns (flow, psn, tuples) to acknowledge for every leftover
        packet of this job among them; adds each one's tuples only the first
        time its (flow, psn) comes."""
        k = rows.shape[0]
        if not k:
            return []
        if rows.shape[1] < wire.HDR_LEN:
            raise ValueError("rows narrower than an INC header")
        lens = np.asarray(lens, np.int64)
        h = np.frombuffer(rows[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
        nt = h["numel"].astype(np.int64) // wire.KV_TUPLE_WORDS
        ok = ((lens >= wire.HDR_LEN) & (h["version"] == wire.VERSION) & (h["type"] == wire.T_KV)
              & (h["job"] == self.job) & (h["gen"] == self.gen) & (h["rank"] < self.world)
              & (h["numel"] % wire.KV_TUPLE_WORDS == 0) & wire.csum_ok(rows, lens))
        self.s.bad_packets += int(k - ok.sum())
        out, ks, vs = [], [], []
        for i, flow, psn, n, fl in zip(np.nonzero(ok)[0].tolist(), h["rank"][ok].tolist(), h["psn"][ok].tolist(),
                                       nt[ok].tolist(), h["flags"][ok].tolist()):
            out.append((flow, psn, n))
            if (flow, psn) in self.seen:
                self.s.dup_packets += 1
                continue
            self.seen.add((flow, psn))
            self.s.leftover_packets += 1
            self.s.partial_packets += bool(fl & wire.F_KV_PARTIAL)
            if n:
                t = np.frombuffer(rows[i], kv_wire.TUPLE_DTYPE, n, wire.HDR_LEN)
                ks.append(t["key"])
                vs.append(t["value"])
        if ks:
            keys, vals = np.concatenate(ks), np.concatenate(vs).astype(np.int64)
            real = keys != 0
            keys, vals = keys[real], vals[real]
            self.s.leftover_tuples += int(keys.size)
            self.s.leftover_total += int(vals.sum())
            self._keys.append(keys)
            self._vals.append(vals)
        return out

    def drained(self, keys, values) -> None:
        k = np.asarray(keys, dtype=np.uint64)
        v = np.asarray(values, dtype=np.int64)
        if k.size != v.size:
            raise KVError("kv_drain reply: keys and values differ in length")
        self.s.drains += 1
        self.s.drain_keys += int(k.size)
        self.s.drain_total += int(v.sum())
        if k.size:
            self._keys.append(k)
            self._vals.append(v)

    def dictionary(self, flow: int, words: dict, collisions=()) -> None:
        """A mapper's key -> word dictionary (keys as ints or decimal strings), and
        the collisions it found among its own words."""
        if not 0 <= flow < self.world:
            raise KVError(f"dictionary from flow {flow}, not a mapper of this job (0..{self.world - 1})")
        if flow in self.dict_from:
            return  # the same mapper again (a retry): already merged
        self.dict_from.add(flow)
        self.s.dictionaries += 1
        new = words if all(type(k) is int for k in words) else {int(k): str(w) for k, w in words.items()}
        bad = kv_wire.merge_dictionary(self.words, new)
        for c in [*bad, *((int(k), str(a), str(b)) for k, a, b in collisions)]:
            if all(c[0] != x[0] or {c[1], c[2]} - {x[1], x[2]} for x in self.s.collisions):
                self.s.collisions.append(c)

    @property
    def complete(self) -> bool:
        return len(self.dict_from) == self.world

    def counts(self) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
        """{word: count} over everything added; raises KVError for a key that no
        dictionary names. Colliding keys are left out and returned."""
        if self._keys:
            keys = np.concatenate(self._keys)
            vals = np.concatenate(self._vals)
            uk, inv = np.unique(keys, return_inverse=True)
            sums = np.zeros(uk.size, np.int64)
            np.add.at(sums, inv, vals)
        else:
            uk, sums = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        bad = {c[0] for c in self.s.collisions}
        out: dict[str, int] = {}
        missing = []
        for k, v in zip(uk.tolist(), sums.tolist()):
            if k in bad:
                continue
            w = self.words.get(k)
            if w is None:
                missing.append(k)
                continue
            if v:
                out[w] = v
        if missing:
            raise KVError(f"{len(missing)} key(s) summed with no word in any mapper's dictionary "
                          f"(e.g. {missing[:3]}): a mapper sent tuples it did not name")
        self.s.words = len(out)
        return out, list(self.s.collisions)


# --- I/O: the mapper --------------------------------------------------------------

@dataclass
class MapStats:
    job: int
    flow: int
    words: int = 0
    distinct: int = 0
    tuples: int = 0
    packets: int = 0
    route: str = ""
    tuples_to_switch: int = 0      # sent through the switch (the rest straight to the reducer)
    packets_to_switch: int = 0
    padding: int = 0               # key-0 places in those packets (a row with no tuple waiting)
    aggregators: int = 0           # of the mapper's part of the switch (0: shared with other mappers)
    claimed: int = 0               # of those, held by one of its keys
    tuples_per_packet: int = 0
    window: int = 0
    retransmits: int = 0
    acks_switch: int = 0
    acks_reducer: int = 0
    collisions: int = 0
    map_s: float = 0.0
    send_s: float = 0.0
    total_s: float = 0.0
    cpu_s: float = 0.0             # the mapper process's CPU time (user + system)


class _Failure:
    def __init__(self):
        self.failure: str | None = None

    def on_event(self, ev: dict) -> None:
        if ev.get("event") == "job_failed" and self.failure is None:
            self.failure = f"job {ev.get('job')} failed: {ev.get('error') or 'no reason given'}"


def _leave(ctl: Control) -> None:
    """Says "done" to incd and waits for its reply."""
    if ctl.lost_at is not None:
        return
    ctl.send({"op": "done"})
    try:
        ctl.replies.get(timeout=5)
    except queue.Empty:
        pass


def run_mapper(job: int, flow: int, world: int, inputs: list[str], *, window: int = wire.KV_WINDOW,
               switch: str | None = None, ctrl_port: int = wire.CTRL_PORT, register_timeout: float = 30.0,
               progress_timeout: float = 10.0, fail_timeout: float = 2.0, cols: int | None = None,
               chunk_bytes: int = CHUNK_BYTES, route: str = "owned", split: str = "words",
               say=lambda m: None) -> MapStats:
    """One mapper of a kv job: registers, then maps its input chunk by chunk,
    sending each chunk's packets while it maps the next. cols: switch columns
    to ask for (incd's default if None). route (see _Router): "owned" (keys
    holding an aggregator through the switch, the rest straight to the
    reducer), "switch" (everything through the switch) or "direct" (switch
    aggregation off, a baseline: all tuples to the reducer's address; the
    switch forwards them like any other traffic and absorbs nothing; the job,
    the window, the reducer's acknowledgements and the dictionary are as
    usual). split: what a word is (see count_words)."""
    if route not in ("owned", "switch", "direct"):
        raise KVError(f"route must be owned, switch or direct, not {route!r}")
    if not 1 <= window <= wire.KV_WINDOW:
        raise KVError(f"window must be in 1..{wire.KV_WINDOW} (the switch remembers {wire.KV_WINDOW} psns per flow)")
    try:
        control.check_fail_timeout(fail_timeout, 'fail_timeout')
    except control.LimitError as e:
        raise KVError(str(e)) from None
    for path in inputs:  # before registering: a bad input must not start the job
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise KVError(f"cannot read input: {e}") from e
    t0 = time.perf_counter()
    st = MapStats(job, flow)
    src = WordSource(inputs, chunk_bytes, split=split)
    sock = data_socket()
    ctl = None
    try:
        ctl = Control(connect_incd(switch, ctrl_port))
        ctl.sock.settimeout(register_timeout + 10)
        say(f"mapper {flow}/{world}: registering job {job} ...")
        req = {"op": "register", "version": control.CONTROL_VERSION, "job": job, "rank": flow, "world": world, "mode": "kv",
               "port": sock.getsockname()[1], "window": window, "timeout": register_timeout}
        if cols is not None:
            req["cols"] = cols
        reply = ctl.call(req)
        fail = _Failure()
        ctl.start(fail.on_event, fail_timeout)
        gen = int(reply["gen"])
        W = max(1, min(window, int(reply.get("window") or window), wire.KV_WINDOW))
        per = int(reply.get("tuples") or kv_wire.tuples_for_mtu(1500))
        if per < 1:
            raise KVError("the switch ports' MTU is too small for a key-value packet")
        red = reply.get("ps") or {}
        if not red.get("addr"):
            raise KVError(f"job {job}: incd named no reducer")
        st.tuples_per_packet, st.window, st.route = per, W, route
        owners = None
        kcols, parts = int(reply.get("cols") or 0), int(reply.get("parts") or 0)
        if parts == world and kcols >= parts:  # a part of its own: it knows who holds what
            owners = kv_wire.PartOwners(per, kcols // parts)
        router = _Router(route, per, owners)
        try:
            _stream(sock, src, router, job=job, gen=gen, flow=flow, window=W,
                    switch_dest=(reply["data_addr"], int(reply["data_port"])),
                    reducer_dest=(red["addr"], int(red["port"])), fail=fail, ctl=ctl,
                    progress_timeout=progress_timeout, fail_timeout=fail_timeout, st=st)
        except (OSError, UnicodeError) as e:
            if isinstance(e, OSError) and e.filename is None:
                raise
            raise KVError(f"job {job} mapper {flow}: cannot read input: {e}") from e
        st.words, st.map_s = src.words, src.map_s
        st.distinct, st.collisions = len(src.dictionary), len(src.collisions)
        st.tuples_to_switch, st.packets_to_switch = router.tuples_to_switch, router.packets_to_switch
        st.padding = router.padding
        if owners is not None:
            st.aggregators, st.claimed = owners.owner.size, owners.claimed
        st.send_s = time.perf_counter() - t0 - st.map_s
        say(f"mapper {flow}: {st.words} words, {st.tuples} tuples in {st.packets} packets acknowledged; "
            "sending the dictionary to the reducer")
        with socket.create_connection((red["addr"], int(red["port"])), timeout=30) as tcp:
            tcp.sendall(dictionary_line(job, flow, src.dictionary, src.collisions))
            f = tcp.makefile("rb")
            line = f.readline()
            try:
                ans = json.loads(line)
            except ValueError:
                ans = None
            if not isinstance(ans, dict) or not ans.get("ok"):
                raise KVError(f"the reducer did not take the dictionary: {line[:200]!r}")
            if fail.failure:
                raise KVError(fail.failure)
            _leave(ctl)  # before closing the TCP connection: the reducer waits for that close
        st.total_s = time.perf_counter() - t0
        st.cpu_s = time.process_time()
        return st
    except (OSError, ValueError) as e:  # the reducer unreachable, a garbled reply
        raise KVError(f"job {job} mapper {flow}: {e}") from e
    finally:
        if ctl is not None:
            ctl.close()
        sock.close()


class _PacketLog:
    """Every packet of the flow so far (psn = row), kept until the end for
    resends, with one sendmmsg header each pointing at its row and its
    destination (the switch or the reducer)."""

    def __init__(self, per: int, dests: list[tuple[str, int]]):
        self.width = wire.HDR_LEN + per * kv_wire.TUPLE_BYTES
        self.names = [batchio.sockaddr_in(*d) for d in dests]
        self.n = 0
        self._grow(256)

    def _grow(self, cap: int) -> None:
        rows = np.zeros((cap, self.width), np.uint8)
        sizes = np.zeros(cap, np.int64)
        dest = np.zeros(cap, np.int64)
        if self.n:
            rows[: self.n], sizes[: self.n], dest[: self.n] = self.rows[: self.n], self.sizes[: self.n], self.dest[: self.n]
        self.rows, self.sizes, self.dest = rows, sizes, dest
        self.msgs = batchio.Messages(rows, sizes.astype(np.uint64))
        self.msgs.msgs["name"] = np.array([n.ctypes.data for n in self.names], np.uint64)[dest]
        self.msgs.msgs["namelen"] = 16

    def add(self, rows: np.ndarray, sizes: np.ndarray, dest: int) -> None:
        k = rows.shape[0]
        if self.n + k > self.rows.shape[0]:
            self._grow(max(2 * self.rows.shape[0], self.n + k))
        sl = slice(self.n, self.n + k)
        self.rows[sl, : rows.shape[1]] = rows
        self.sizes[sl], self.dest[sl] = sizes, dest
        self.msgs.iov["len"][sl] = sizes
        self.msgs.msgs["name"][sl] = self.names[dest].ctypes.data
        self.n += k

    def send(self, fd: int, start: int, stop: int) -> None:
        batchio.send_msgs(fd, self.msgs.msgs, start, stop - start)

    def resend(self, fd: int, idx: np.ndarray) -> None:
        sub = self.rows[idx]
        sub[:, 2] |= wire.F_RETRANS
        wire.seal_rows(sub, (self.sizes[idx] - wire.HDR_LEN) // 4)
        self.rows[idx] = sub
        batchio.send_msgs(fd, self.msgs.subset(idx))


TO_SWITCH, TO_REDUCER = 0, 1


class _Router:
    """Which tuples go through the switch (each at its key's row, RowPacker)
    and which straight to the reducer (dense packets), by route:
    "owned": through the switch only the keys that hold an aggregator of the
    mapper's own part (PartOwners), the rest to the reducer; "switch":
    everything through the switch; "direct": everything to the reducer
    (switch aggregation off)."""

    def __init__(self, route: str, per: int, owners: kv_wire.PartOwners | None):
        self.route, self.per, self.owners = route, per, owners
        self.packer = kv_wire.RowPacker(per)
        self.cold_k: list[np.ndarray] = []
        self.cold_v: list[np.ndarray] = []
        self.cold_n = 0
        self.tuples_to_switch = self.packets_to_switch = self.padding = 0

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if self.route == "direct":
            hot = np.zeros(keys.size, bool)
        elif self.route == "owned" and self.owners is not None:
            hot = self.owners.claim(keys, values)
        else:
            hot = np.ones(keys.size, bool)
        self.packer.add(keys[hot], values[hot])
        if not hot.all():
            self.cold_k.append(keys[~hot])
            self.cold_v.append(values[~hot])
            self.cold_n += int((~hot).sum())

    def packets(self, final: bool, **hdr) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """[(rows, sizes, destination)] of the packets that are full now (or all
        with final). hdr: job, gen, flow, psn0 of the first."""
        out = []
        gk, gv = self.packer.take(final)
        self.tuples_to_switch += int(np.count_nonzero(gk))
        self.packets_to_switch += gk.shape[0]
        if gk.shape[0]:
            rows, sizes = kv_wire.build_kv_grid(gk, gv, **hdr)
            self.padding += int((sizes - wire.HDR_LEN).sum()) // kv_wire.TUPLE_BYTES - int(np.count_nonzero(gk))
            out.append((rows, sizes, TO_SWITCH))
            hdr = {**hdr, "psn0": hdr["psn0"] + gk.shape[0]}
        full = self.cold_n if final else self.cold_n - self.cold_n % self.per
        if full:
            k, v = np.concatenate(self.cold_k), np.concatenate(self.cold_v)
            out.append((*kv_wire.build_kv_packets(k[:full], v[:full], self.per, **hdr), TO_REDUCER))
            self.cold_k, self.cold_v, self.cold_n = [k[full:]], [v[full:]], self.cold_n - full
        return out


def _stream(sock, src: WordSource, router: _Router, *, job, gen, flow, window, switch_dest, reducer_dest,
            fail, ctl, progress_timeout, fail_timeout, st: MapStats) -> None:
    """Maps the input a chunk at a time and sends the packets through the
    window meanwhile; returns when every packet is acknowledged."""
    log = _PacketLog(router.per, [switch_dest, reducer_dest])
    fd = sock.fileno()
    rx = batchio.Receiver(fd, 256, wire.HDR_LEN + 64, addrs=True)
    red_ip = int(np.frombuffer(socket.inet_aton(reducer_dest[0]), "<u4")[0])
    win = AckWindow(0, window)
    # Until the first RTT sample: long enough for a reducer that shares its CPU
    # with busy mappers (a whole window resent for nothing otherwise).
    srtt, rto = None, 0.2
    mapping = True
    mapped_at = last_progress = rto_fired = time.monotonic()
    while mapping or not win.finished:
        now = time.monotonic()
        a, b = win.to_send()
        if b > a:
            if win.idle:
                last_progress = now  # the clock for an acknowledgement starts now
            log.send(fd, a, b)
            win.mark_sent(a, b, now)
        if mapping:
            # Map while the window is full (or everything built is out): the
            # acknowledgements wait in the socket meanwhile.
            t = src.next()
            if t is None:
                mapping = False
            else:
                router.add(*t)
                st.tuples += int(t[0].size)
            for rows, sizes, dest in router.packets(not mapping, job=job, gen=gen, flow=flow, psn0=log.n):
                log.add(rows, sizes, dest)
                win.extend(rows.shape[0])
            mapped_at = time.monotonic()
            wait = 0.0
        else:
            wait = min(rto, 0.05)
        while True:
            k = rx.recv(wait)
            now = time.monotonic()
            if not k:
                break
            wait = 0.0
            got = rx.buf[:k]
            lens = rx.m.msgs["len"][:k].astype(np.int64)
            ok_rows = parse_acks(got, lens, job=job, gen=gen, flow=flow, n=win.n)
            if not ok_rows.size:
                continue
            h = np.frombuffer(got[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
            new = win.ack(ok_rows)
            if not new.size:
                continue
            # who acknowledged (first ACK per psn): the reducer's address or the switch
            psn_src = {}
            for p, s_ip in zip(h["psn"].tolist(), rx.src_ip[:k].tolist()):
                psn_src.setdefault(p, s_ip)
            from_red = sum(psn_src.get(int(p)) == red_ip for p in new)
            st.acks_reducer += from_red
            st.acks_switch += new.size - from_red
            # RTT samples only from packets sent since the last mapping step: an
            # acknowledgement that waited in the socket while we mapped says nothing
            clean = new[(win.sends[new] == 1) & (win.sent_at[new] >= mapped_at)]
            if clean.size:
                rtt = now - float(win.sent_at[clean].mean())
                srtt = rtt if srtt is None else 0.875 * srtt + 0.125 * min(rtt, 2 * srtt)
                rto = min(MAX_RTO, max(MIN_RTO, 3 * srtt))
            last_progress = now
            if win.finished:
                break
        due = win.due(now, rto)
        if due.size:
            log.resend(fd, due)
            win.sent_at[due] = now
            win.sends[due] += 1
            st.retransmits += due.size
            if last_progress <= rto_fired:
                rto = min(MAX_RTO, rto * 1.5)  # nothing came back since the last timeout: back off
            rto_fired = now
        if fail.failure:
            raise KVError(fail.failure)
        if ctl.refused is not None or (ctl.lost_at is not None and now - max(ctl.lost_at, last_progress) > fail_timeout):
            raise KVError(f"job {job}: lost the control connection to incd and no acknowledgement came "
                          f"for {now - last_progress:.1f}s")
        if not win.idle and now - last_progress > progress_timeout:
            raise KVError(f"job {job} mapper {flow}: no acknowledgement for psn {win.base} in "
                          f"{progress_timeout:.1f}s ({win.nacked}/{win.n} packets acknowledged); is the reducer running?")
    st.packets = win.n


# --- I/O: the reducer -------------------------------------------------------------

def _listen_tcp(port: int) -> socket.socket:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port))
    t.listen(64)
    return t


def _reducer_sockets() -> tuple[socket.socket, socket.socket]:
    """A UDP data socket and a TCP listener on the same port number."""
    for _ in range(32):
        u = data_socket()
        try:
            return u, _listen_tcp(u.getsockname()[1])
        except OSError:
            u.close()
    raise KVError("no port free for both UDP and TCP")


class _DictServer:
    """Accepts the mappers' dictionary lines; each connection: one JSON line in,
    {"ok": true} out, then it stays open until the mapper has said "done" to incd
    and closes it (closed records that)."""

    def __init__(self, lsock: socket.socket, job: int):
        self.lsock, self.job = lsock, job
        self.inbox: queue.Queue = queue.Queue()
        self.closed: set[int] = set()
        self.cond = threading.Condition()
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        flow = None
        try:
            c.settimeout(60)
            f = c.makefile("rb")
            line = f.readline()
            try:
                msg = parse_dictionary(line, self.job)
            except ValueError as e:
                c.sendall((json.dumps({"ok": False, "error": str(e)}) + "\n").encode())
                return
            flow = msg[0]
            done = threading.Event()
            self.inbox.put((msg, done))
            done.wait(60)  # merged by the main loop (which may refuse it)
            c.sendall((json.dumps(getattr(done, "reply", {"ok": True})) + "\n").encode())
            c.settimeout(None)
            while c.recv(4096):  # until the mapper has left the job and closes
                pass
        except OSError:
            pass
        finally:
            c.close()
            if flow is not None:
                with self.cond:
                    self.closed.add(flow)
                    self.cond.notify_all()

    def wait_closed(self, flows: set[int], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not flows <= self.closed:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


def run_reducer(job: int, world: int, *, switch: str | None = None, ctrl_port: int = wire.CTRL_PORT,
                register_timeout: float = 30.0, fail_timeout: float = 2.0, timeout: float = 600.0,
                say=lambda m: None) -> tuple[dict[str, int], ReduceSummary, dict]:
    """Serves one kv job as its reducer. Returns (counts, summary, info); raises
    CollisionError (with .counts/.summary) if keys collided."""
    try:
        control.check_fail_timeout(fail_timeout, 'fail_timeout')
    except control.LimitError as e:
        raise KVError(str(e)) from None
    t0 = time.perf_counter()
    sock, lsock = _reducer_sockets()
    ctl = None
    try:
        ctl = Control(connect_incd(switch, ctrl_port))
        ctl.sock.settimeout(register_timeout + 10)
        say(f"reducer: registering job {job} ({world} mappers) on port {sock.getsockname()[1]} ...")
        reply = ctl.call({"op": "register", "version": control.CONTROL_VERSION, "role": "ps", "job": job, "world": world, "mode": "kv",
                                "port": sock.getsockname()[1], "timeout": register_timeout})
        fail = _Failure()
        ctl.start(fail.on_event, fail_timeout)
        gen = int(reply["gen"])
        members = {int(m["rank"]): (m["addr"], int(m["port"])) for m in reply.get("members") or []}
        if set(members) != set(range(world)):
            raise KVError(f"job {job}: incd named mappers {sorted(members)}, expected 0..{world - 1}")
        state = ReducerState(job, gen, world)
        server = _DictServer(lsock, job)
        t_reg = time.perf_counter()
        say(f"reducer: job {job} gen {gen} running")
        rx = batchio.Receiver(sock.fileno(), 256, wire.HDR_LEN + 4 * wire.MAX_ELEMS + 64)
        names = np.stack([batchio.sockaddr_in(*members[f]) for f in range(world)])

        def ack(got: list[tuple[int, int, int]]) -> int:
            """Acknowledges leftover packets to their mappers, one sendmmsg."""
            if not got:
                return 0
            flows, psns, tuples = zip(*got)
            rows = build_acks(job=job, gen=gen, flows=flows, psns=psns, tuples=tuples)
            try:
                batchio.send_rows(sock.fileno(), rows, names[list(flows)])
            except OSError:
                return 0  # the mappers resend; so do we then
            return len(got)

        acks = 0
        start = time.monotonic()
        while not state.complete:
            k = rx.recv(0.02)
            if k:
                acks += ack(state.packets(rx.buf[:k], rx.m.msgs["len"][:k]))
            while True:
                try:
                    msg, ev = server.inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    flow, keys, words, col = msg
                    state.dictionary(flow, dict(zip(keys, words)), col)
                except KVError as e:
                    ev.reply = {"ok": False, "error": str(e)}
                ev.set()
            if fail.failure:
                raise KVError(fail.failure)
            now = time.monotonic()
            if ctl.refused is not None or ctl.lost_at is not None and now - ctl.lost_at > fail_timeout:
                raise KVError(f"job {job}: lost the control connection to incd")
            if now - start > timeout:
                raise KVError(f"job {job}: the mappers' dictionaries did not all come within {timeout:.0f}s "
                              f"(from flows {sorted(state.dict_from)})")
        t_data = time.perf_counter()
        for _ in range(2):  # each flips the epoch: both copies are read
            ctl.send({"op": "kv_drain", "job": job})
            try:
                d = ctl.replies.get(timeout=60)
            except queue.Empty:
                raise KVError(f"job {job}: incd did not answer kv_drain in 60 s") from None
            if d is None:
                raise KVError(f"job {job}: lost the control connection to incd during kv_drain")
            if not d.get("ok"):
                raise KVError(f"job {job}: incd refused kv_drain: {d.get('error')}")
            state.drained(d.get("keys") or [], d.get("values") or [])
        t_drain = time.perf_counter()
        # A mapper closes its dictionary connection after incd took its "done": the
        # reducer leaving before that would fail the job.
        if not server.wait_closed(set(range(world)), 10.0):
            say("reducer: warning: not every mapper closed its connection within 10 s")
        # a late replay may still be in the socket: acknowledge it (nothing to add)
        while True:
            k = rx.recv(0.0)
            if not k:
                break
            acks += ack(state.packets(rx.buf[:k], rx.m.msgs["len"][:k]))
        if fail.failure:
            raise KVError(fail.failure)
        _leave(ctl)
        counts, collisions = state.counts()
        info = {"job": job, "gen": gen, "mappers": world, "acks_sent": acks,
                "wait_s": t_reg - t0, "data_s": t_data - t_reg, "drain_s": t_drain - t_data,
                "total_s": time.perf_counter() - t0, "cpu_s": time.process_time()}
        if collisions:
            e = CollisionError(f"{len(collisions)} key(s) claimed by two words, left out of the counts: "
                               + ", ".join(f"{k:#x} ({a!r} / {b!r})" for k, a, b in collisions[:5]))
            e.counts, e.summary, e.info = counts, state.s, info
            raise e
        return counts, state.s, info
    finally:
        if ctl is not None:
            ctl.close()
        sock.close()
        lsock.close()


def summary_dict(s: ReduceSummary) -> dict:
    d = asdict(s)
    d["collisions"] = [[hex(k), a, b] for k, a, b in s.collisions]
    return d
