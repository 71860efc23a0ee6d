"""Key-value (word count) packets: keys, tuples, build and parse, derived from
bpf/inc_proto.h (constants through hostagent.proto's parser).

A KV packet is an inc_hdr (type INC_T_KV; rank = the mapper's flow id; psn = its
sequence number in the flow; numel = 32-bit words that follow) and numel / 3
tuples of (u64 key, i32 value), little-endian, 12 bytes each. The csum rule is
the one of every INC packet: header and payload words sum to 0 mod 2^32, so
proto.csum_ok() checks KV packets too.

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

from hostagent import proto

C = proto.C
T_KV = C["INC_T_KV"]
T_KV_ACK = C["INC_T_KV_ACK"]
MODE_KV = C["INC_MODE_KV"]
F_KV_PARTIAL = C["INC_F_KV_PARTIAL"]
TUPLE_WORDS = C["INC_KV_TUPLE_WORDS"]
MAX_TUPLES = C["INC_KV_MAX_TUPLES"]
WINDOW = C["INC_KV_WINDOW"]

TUPLE_DTYPE = np.dtype([("key", "<u8"), ("value", "<i4")])  # struct inc_kv_tuple, packed
assert TUPLE_DTYPE.itemsize == 4 * TUPLE_WORDS
assert MAX_TUPLES * TUPLE_WORDS <= proto.MAX_ELEMS
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
    return max(0, min(MAX_TUPLES, (mtu - proto.IP_UDP_OVERHEAD - proto.HDR_LEN) // TUPLE_BYTES))


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
    if values.size and (values.min() < -2**31 or values.max() >= 2**31):
        raise ValueError("values must fit int32 (split larger counts into several tuples)")
    n = keys.size
    npk = max(1, -(-n // per_packet))
    pkt = np.dtype([("hdr", proto.HDR_DTYPE), ("t", TUPLE_DTYPE, (per_packet,))])
    buf = np.zeros(npk, dtype=pkt)
    hdr = buf["hdr"]
    hdr["version"] = proto.VERSION
    hdr["type"] = T_KV
    hdr["flags"] = flags
    hdr["op"] = proto.OP_SUM
    hdr["job"] = job
    hdr["gen"] = gen
    hdr["rank"] = flow
    hdr["psn"] = (psn0 + np.arange(npk, dtype=np.uint64)) & 0xFFFFFFFF
    counts = np.full(npk, per_packet, dtype=np.int64)
    counts[-1] = n - per_packet * (npk - 1)
    hdr["numel"] = counts * TUPLE_WORDS
    flat = np.zeros(npk * per_packet, TUPLE_DTYPE)
    flat["key"][:n] = keys
    flat["value"][:n] = values
    buf["t"] = flat.reshape(npk, per_packet)
    rows = buf.view(np.uint8).reshape(npk, pkt.itemsize)
    proto.seal_rows(rows, hdr["numel"].astype(np.int64))
    sizes = proto.HDR_LEN + counts * TUPLE_BYTES
    return rows, sizes


def build_kv_packet(keys, values, *, job: int, gen: int, flow: int, psn: int, flags: int = 0) -> bytes:
    """One sealed KV packet (header + tuples) as bytes."""
    rows, sizes = build_kv_packets(keys, values, max(1, len(keys)), job=job, gen=gen, flow=flow, psn0=psn,
                                   flags=flags)
    return rows[0, : sizes[0]].tobytes()


def parse_kv(data: bytes | memoryview) -> tuple[np.void, np.ndarray]:
    """A KV packet (or ACK) as (header, tuples). Tuples with key 0 (none) are
    left out. Raises ValueError on a bad packet."""
    data = bytes(data)
    if len(data) < proto.HDR_LEN:
        raise ValueError("shorter than the INC header")
    h = proto.parse_header(data[: proto.HDR_LEN])
    if h["version"] != proto.VERSION or h["type"] not in (T_KV, T_KV_ACK):
        raise ValueError("not a KV packet")
    n = int(h["numel"])
    if n % TUPLE_WORDS or proto.HDR_LEN + 4 * n > len(data):
        raise ValueError("tuple count beyond the packet")
    row = np.frombuffer(data, np.uint8)
    pad = (-len(data)) % 4
    if pad:
        row = np.concatenate([row, np.zeros(pad, np.uint8)])
    if not proto.csum_ok(row[None, :], np.array([len(data)]))[0]:
        raise ValueError("bad csum")
    t = np.frombuffer(data, TUPLE_DTYPE, n // TUPLE_WORDS, proto.HDR_LEN)
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
