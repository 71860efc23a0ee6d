"""Key-value (word count) packets: keys, tuples, build and parse, derived from
bpf/inc_proto.h (its constants through bpf.wire).

A KV packet is an inc_hdr (type INC_T_KV; rank = the mapper's flow id; psn = its
sequence number in the flow; numel = 32-bit words that follow) and numel / 3
tuples of (u64 key, i32 value), little-endian, 12 bytes each. The csum rule is
the one of every INC packet: header and payload words sum to 0 mod 2^32, so
wire.csum_ok() checks KV packets too.

Keys: the first 8 bytes of blake2b of the word's UTF-8, as a little-endian
u64, with 0 mapped to 1 (key 0 means "no tuple" on the wire and "empty" in the
switch). Two words can share a key; the switch cannot tell, so a mapper also
sends the reducer its dictionary key -> word and the reducer merges them with
merge_dictionary(), which reports every key claimed by two different words.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from bpf import wire

C = wire.C
T_KV = wire.T_KV
T_KV_ACK = wire.T_KV_ACK
MODE_KV = wire.MODE_KV
F_KV_PARTIAL = wire.F_KV_PARTIAL
TUPLE_WORDS = wire.KV_TUPLE_WORDS
MAX_TUPLES = wire.KV_MAX_TUPLES
WINDOW = wire.KV_WINDOW

TUPLE_DTYPE = np.dtype([("key", "<u8"), ("value", "<i4")])  # struct inc_kv_tuple, packed
assert TUPLE_DTYPE.itemsize == 4 * TUPLE_WORDS
assert MAX_TUPLES * TUPLE_WORDS <= wire.MAX_ELEMS
TUPLE_BYTES = TUPLE_DTYPE.itemsize


def word_key(word: str) -> int:
    k = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return k or 1


def word_keys(words: Iterable[str]) -> np.ndarray:
    return np.fromiter((word_key(w) for w in words), dtype=np.uint64)


def merge_dictionary(acc: dict[int, str], new: dict[int, str]) -> list[tuple[int, str, str]]:
    """Adds a mapper's key -> word dictionary to acc; returns the collisions
    found (key, word already known, other word), which acc keeps unchanged."""
    bad = []
    for k, w in new.items():
        old = acc.setdefault(int(k), w)
        if old != w:
            bad.append((int(k), old, w))
    return bad


def tuples_for_mtu(mtu: int) -> int:
    """Tuples that fit in one KV packet on a link of this MTU."""
    return max(0, min(MAX_TUPLES, (mtu - wire.IP_UDP_OVERHEAD - wire.HDR_LEN) // TUPLE_BYTES))


def build_kv_packets(keys: np.ndarray, values: np.ndarray, per_packet: int = MAX_TUPLES, *, job: int,
                     gen: int, flow: int, psn0: int, flags: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The tuples (keys[i], values[i]) cut into packets of per_packet tuples,
    sealed. Returns (buf, sizes): buf[i] is packet i (uint8 row, zero-padded),
    sizes[i] its length. Keys must be nonzero."""
    keys = np.asarray(keys, dtype=np.uint64).ravel()
    values = np.asarray(values, dtype=np.int64).ravel()
    if keys.size != values.size:
        raise ValueError("keys and values differ in length")
    if not 1 <= per_packet <= MAX_TUPLES:
        raise ValueError(f"per_packet must be 1..{MAX_TUPLES}")
    if np.any(keys == 0):
        raise ValueError("key 0 is reserved (no tuple)")
    n = keys.size
    npk = max(1, -(-n // per_packet))
    gk = np.zeros(npk * per_packet, np.uint64)
    gv = np.zeros(npk * per_packet, np.int64)
    gk[:n], gv[:n] = keys, values
    return build_kv_grid(gk.reshape(npk, per_packet), gv.reshape(npk, per_packet), job=job, gen=gen,
                         flow=flow, psn0=psn0, flags=flags)


def build_kv_grid(keys: np.ndarray, values: np.ndarray, *, job: int, gen: int, flow: int, psn0: int,
                  flags: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Packet i carries keys[i, j], values[i, j] as its tuple j (key 0: no tuple
    at that place, skipped by the switch); trailing key-0 tuples are cut off.
    Returns (buf, sizes) as build_kv_packets."""
    keys = np.asarray(keys, dtype=np.uint64)
    values = np.asarray(values, dtype=np.int64)
    if keys.ndim != 2 or keys.shape != values.shape:
        raise ValueError("keys and values must be 2-D arrays of one shape")
    npk, per = keys.shape
    if not 1 <= per <= MAX_TUPLES:
        raise ValueError(f"tuples per packet must be 1..{MAX_TUPLES}")
    if values.size and (values.min() < -2**31 or values.max() >= 2**31):
        raise ValueError("values must fit int32 (split larger counts into several tuples)")
    pkt = np.dtype([("hdr", wire.HDR_DTYPE), ("t", TUPLE_DTYPE, (per,))])
    buf = np.zeros(npk, dtype=pkt)
    hdr = buf["hdr"]
    hdr["version"] = wire.VERSION
    hdr["type"] = T_KV
    hdr["flags"] = flags
    hdr["op"] = wire.OP_SUM
    hdr["job"] = job
    hdr["gen"] = gen
    hdr["rank"] = flow
    hdr["psn"] = (psn0 + np.arange(npk, dtype=np.uint64)) & 0xFFFFFFFF
    used = keys != 0
    # tuples up to the last one with a key
    counts = np.where(used.any(axis=1), per - np.argmax(used[:, ::-1], axis=1), 0).astype(np.int64)
    hdr["numel"] = counts * TUPLE_WORDS
    buf["t"]["key"] = keys
    buf["t"]["value"] = values
    rows = buf.view(np.uint8).reshape(npk, pkt.itemsize)
    wire.seal_rows(rows, hdr["numel"].astype(np.int64))
    sizes = wire.HDR_LEN + counts * TUPLE_BYTES
    return rows, sizes


def kv_row(keys, per: int) -> np.ndarray:
    """The tuple place (packet row) a mapper gives each key in packets of `per`
    tuples: fixed per key, so that a key meets the same aggregator in every
    packet (the switch takes the place as the row and inc_kv_col() of the key
    as the column). From the key's high half, which inc_kv_col() mixes with
    the low half: rows and columns of random keys are independent."""
    k = np.asarray(keys, dtype=np.uint64)
    return ((k >> np.uint64(32)) % np.uint64(per)).astype(np.int64)


def build_kv_packet(keys, values, *, job: int, gen: int, flow: int, psn: int, flags: int = 0) -> bytes:
    """One sealed KV packet (header + tuples) as bytes."""
    rows, sizes = build_kv_packets(keys, values, max(1, len(keys)), job=job, gen=gen, flow=flow, psn0=psn,
                                   flags=flags)
    return rows[0, : sizes[0]].tobytes()


def parse_kv(data: bytes | memoryview) -> tuple[np.void, np.ndarray]:
    """A KV packet (or ACK) as (header, tuples). Tuples with key 0 (none) are
    left out. Raises ValueError on a bad packet."""
    data = bytes(data)
    if len(data) < wire.HDR_LEN:
        raise ValueError("shorter than the INC header")
    h = wire.parse_header(data[: wire.HDR_LEN])
    if h["version"] != wire.VERSION or h["type"] not in (T_KV, T_KV_ACK):
        raise ValueError("not a KV packet")
    n = int(h["numel"])
    if n % TUPLE_WORDS or wire.HDR_LEN + 4 * n > len(data):
        raise ValueError("tuple count beyond the packet")
    row = np.frombuffer(data, np.uint8)
    pad = (-len(data)) % 4
    if pad:
        row = np.concatenate([row, np.zeros(pad, np.uint8)])
    if not wire.csum_ok(row[None, :], np.array([len(data)]))[0]:
        raise ValueError("bad csum")
    t = np.frombuffer(data, TUPLE_DTYPE, n // TUPLE_WORDS, wire.HDR_LEN)
    return h, t[t["key"] != 0].copy()


def kv_col(keys) -> np.ndarray:
    """inc_kv_col() of bpf/inc_proto.h."""
    k = np.asarray(keys, dtype=np.uint64)
    return ((k & np.uint64(0xFFFFFFFF)) ^ (k >> np.uint64(32))).astype(np.uint32)


def column(keys, *, offset: int, cols: int, parts: int, flow: int) -> np.ndarray:
    """The column the switch uses for these keys of this flow in a job of
    columns [offset, offset+cols) cut into `parts` subspaces."""
    cpp = cols // parts
    return (offset + (flow % parts) * cpp + kv_col(keys) % np.uint32(cpp)).astype(np.int64)


class RowPacker:
    """A mapper's tuples waiting for a packet, each at its key's row (kv_row):
    packets are filled place by place from per-row queues, oldest first, so a
    key always lands at the same aggregator; a row that runs dry only pads
    (key 0) in the final packets. Within one add() the larger values go first:
    the hot keys of the first chunk claim their aggregators before the colder
    keys of their row (the switch gives an empty aggregator to whoever comes
    first and never evicts)."""

    def __init__(self, per: int):
        if not 1 <= per <= MAX_TUPLES:
            raise ValueError(f"tuples per packet must be 1..{MAX_TUPLES}")
        self.per = per
        self.keys = np.zeros(0, np.uint64)
        self.values = np.zeros(0, np.int64)
        self.rows = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.keys.size)

    def add(self, keys, values) -> None:
        keys = np.asarray(keys, dtype=np.uint64).ravel()
        values = np.asarray(values, dtype=np.int64).ravel()
        if keys.size != values.size:
            raise ValueError("keys and values differ in length")
        if np.any(keys == 0):
            raise ValueError("key 0 is reserved (no tuple)")
        hot = np.argsort(-values, kind="stable")
        self.keys = np.concatenate([self.keys, keys[hot]])
        self.values = np.concatenate([self.values, values[hot]])
        self.rows = np.concatenate([self.rows, kv_row(keys[hot], self.per)])

    def take(self, final: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) grids of the packets that are full now (every row has a
        tuple waiting), or with final=True of everything, padded with key 0."""
        counts = np.bincount(self.rows, minlength=self.per)
        n = int(counts.max() if final else counts.min()) if self.keys.size else 0
        gk = np.zeros((n, self.per), np.uint64)
        gv = np.zeros((n, self.per), np.int64)
        if not n:
            return gk, gv
        order = np.argsort(self.rows, kind="stable")  # by row, oldest first within a row
        r = self.rows[order]
        starts = np.cumsum(counts) - counts
        depth = np.arange(r.size) - starts[r]  # place in its row's queue = packet number
        sel = depth < n
        gk[depth[sel], r[sel]] = self.keys[order[sel]]
        gv[depth[sel], r[sel]] = self.values[order[sel]]
        keep = np.sort(order[~sel])
        self.keys, self.values, self.rows = self.keys[keep], self.values[keep], self.rows[keep]
        return gk, gv


class PartOwners:
    """The aggregators of a mapper's own part of the switch array, and which
    of its keys holds each, as the switch will have it: the switch gives an
    empty aggregator to the first key that reaches it, and in a job where
    every mapper has a part of its own (parts == mappers) nobody else writes
    there, so the mapper can know it in advance. claim() takes the aggregators
    still free for the largest values first (hot-key priority) and says which
    tuples' keys hold theirs: only those need to go through the switch, which
    then absorbs every one of them. Should the switch see it otherwise (a
    drain in between, a resend out of order), a tuple is only left in the
    packet for the reducer: the counts stay exact."""

    def __init__(self, per: int, cols_per_part: int):
        if not 1 <= per <= MAX_TUPLES or cols_per_part < 1:
            raise ValueError("need 1..MAX_TUPLES rows and at least one column")
        self.per, self.cpp = per, cols_per_part
        self.owner = np.zeros(per * cols_per_part, np.uint64)

    def index(self, keys) -> np.ndarray:
        """Aggregator of each key in the part: row (kv_row) x column (inc_kv_col % cpp)."""
        k = np.asarray(keys, dtype=np.uint64)
        return kv_row(k, self.per) * self.cpp + (kv_col(k) % np.uint32(self.cpp)).astype(np.int64)

    @property
    def claimed(self) -> int:
        return int(np.count_nonzero(self.owner))

    def claim(self, keys, values) -> np.ndarray:
        """True for the tuples whose key holds (now or from before) its aggregator."""
        keys = np.asarray(keys, dtype=np.uint64).ravel()
        values = np.asarray(values, dtype=np.int64).ravel()
        idx = self.index(keys)
        free = np.nonzero(self.owner[idx] == 0)[0]
        if free.size:
            hot = free[np.argsort(-values[free], kind="stable")]
            first_agg, first = np.unique(idx[hot], return_index=True)
            self.owner[first_agg] = keys[hot[first]]
        return self.owner[idx] == keys
