"""The INC wire format, derived from bpf/inc_proto.h.

Constants (#define INC_* and enum entries) are parsed out of the C header at
import time, so there is no second hand-kept list. The header layout is written
out here as a numpy dtype because Python cannot take it from C without a
compiler; tests/test_layout.py checks it against offsetof() from gcc.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

HEADER_PATH = Path(__file__).resolve().parent.parent / "bpf" / "inc_proto.h"


def _parse_header(text: str) -> dict[str, int]:
    consts: dict[str, int] = {}
    for name, value in re.findall(r"^#define\s+(INC_\w+)\s+(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", text, re.M):
        consts[name] = int(value, 0)
    for name, value in re.findall(r"^\s*(INC_\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)\s*,", text, re.M):
        consts[name] = int(value, 0)
    return consts


C = _parse_header(HEADER_PATH.read_text())

VERSION = C["INC_VERSION"]
PORT = C["INC_PORT"]
PORT_MIN = C["INC_PORT_MIN"]
PORT_MAX = C["INC_PORT_MAX"]
CTRL_PORT = C["INC_CTRL_PORT"]
MAX_ELEMS = C["INC_MAX_ELEMS"]
MAX_WORKERS = C["INC_MAX_WORKERS"]
MAX_JOBS = C["INC_MAX_JOBS"]
T_DATA = C["INC_T_DATA"]
T_RESULT = C["INC_T_RESULT"]
F_RETRANS = C["INC_F_RETRANS"]
F_OVERFLOW = C["INC_F_OVERFLOW"]
OP_SUM = C["INC_OP_SUM"]
OP_MAX = C["INC_OP_MAX"]
MODE_MODULO = C["INC_MODE_MODULO"]
MODE_HASH = C["INC_MODE_HASH"]
F_COLLISION = C["INC_F_COLLISION"]
F_AGGREGATE = C["INC_F_AGGREGATE"]

# Drop reasons in index order, named without the prefix: ["bad_hdr", ...].
DROP_REASONS = [
    name[len("INC_DROP_"):].lower()
    for name, _ in sorted(
        ((k, v) for k, v in C.items() if k.startswith("INC_DROP_") and not k.startswith("INC_DROP__")),
        key=lambda kv: kv[1],
    )
]
assert len(DROP_REASONS) == C["INC_DROP__COUNT"], "drop enum in inc_proto.h is not dense"

HDR_DTYPE = np.dtype(
    [
        ("version", "u1"),
        ("type", "u1"),
        ("flags", "u1"),
        ("op", "u1"),
        ("job", "<u2"),
        ("gen", "<u2"),
        ("psn", "<u4"),
        ("slot", "<u4"),
        ("rank", "<u2"),
        ("numel", "<u2"),
        ("csum", "<u4"),
        ("bitmap", "<u8"),
    ]
)
HDR_LEN = HDR_DTYPE.itemsize
_NUMEL_AT = HDR_DTYPE.fields["numel"][1]
_CSUM_AT = HDR_DTYPE.fields["csum"][1]
IP_UDP_OVERHEAD = 20 + 8


def hash_slots(job: int, psns: np.ndarray, offset: int, size: int) -> np.ndarray:
    """inc_hash_slot() of bpf/inc_proto.h for many psns at once."""
    with np.errstate(over="ignore"):
        h = (np.asarray(psns, dtype=np.uint32) * np.uint32(C["INC_HASH_MUL_PSN"])
             + np.uint32((job * C["INC_HASH_MUL_JOB"]) & 0xFFFFFFFF))
    h ^= h >> np.uint32(15)
    return (offset + h % np.uint32(size)).astype(np.uint32)


def elems_for_mtu(mtu: int) -> int:
    """Lanes that fit in one packet on a link of this MTU."""
    return max(0, min(MAX_ELEMS, (mtu - IP_UDP_OVERHEAD - HDR_LEN) // 4))


def build_packets(values: np.ndarray, elems: int, *, job: int, gen: int, rank: int,
                  psn0: int, op: int = OP_SUM,
                  hash_region: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All data packets of one reduction, built in one numpy buffer.

    Returns (buf, sizes): row i of buf is packet i (header + `elems` lanes, the
    last one zero-padded) and sizes[i] is how many of its bytes to send.
    """
    values = np.ascontiguousarray(values, dtype="<i4").ravel()
    n = values.size
    npk = max(1, -(-n // elems))
    pkt = np.dtype([("hdr", HDR_DTYPE), ("data", "<i4", (elems,))])
    buf = np.zeros(npk, dtype=pkt)
    hdr = buf["hdr"]
    hdr["version"] = VERSION
    hdr["type"] = T_DATA
    hdr["op"] = op
    hdr["job"] = job
    hdr["gen"] = gen
    hdr["rank"] = rank
    hdr["psn"] = (psn0 + np.arange(npk, dtype=np.uint64)) & 0xFFFFFFFF
    if hash_region is not None:
        hdr["slot"] = hash_slots(job, hdr["psn"], *hash_region)
    numel = np.full(npk, elems, dtype=np.uint16)
    numel[-1] = n - elems * (npk - 1) if n else 1
    hdr["numel"] = numel
    # buf["data"] is strided (one row per packet), so fill it row-wise: a flat
    # reshape of it would be a copy.
    padded = np.zeros(npk * elems, dtype="<i4")
    padded[:n] = values
    buf["data"] = padded.reshape(npk, elems)
    seal(buf, slice(None), lane_sums(buf))
    sizes = HDR_LEN + numel.astype(np.int64) * 4
    return buf, sizes


def lane_sums(buf: np.ndarray) -> np.ndarray:
    """Per packet of build_packets' buffer: its lanes as uint32 words, summed
    mod 2^32 (the padding past numel is zero)."""
    return buf["data"].view("<u4").sum(axis=1, dtype=np.uint64) & 0xFFFFFFFF


def seal(buf: np.ndarray, idx, lanes: np.ndarray) -> None:
    """Sets inc_hdr.csum of packets buf[idx] (after any header change): header
    and lane words then sum to 0 mod 2^32, as the switch checks."""
    hdr = buf["hdr"]
    hdr["csum"][idx] = 0
    words = np.ascontiguousarray(hdr[idx]).view("<u4").reshape(-1, HDR_LEN // 4).sum(axis=1, dtype=np.uint64)
    hdr["csum"][idx] = (-(words + lanes[idx]).astype(np.int64)) & 0xFFFFFFFF


def _word_sums(words: np.ndarray, nwords: np.ndarray) -> np.ndarray:
    """Per row, its first nwords 32-bit words summed mod 2^32 (rows may hold
    stale bytes past their packet)."""
    live = np.arange(words.shape[1])[None, :] < nwords[:, None]
    return np.where(live, words, 0).sum(axis=1, dtype=np.uint64) & 0xFFFFFFFF


def csum_ok(rows: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """For received datagrams (uint8 rows, stale bytes past each length):
    which carry an INC header and numel lanes whose words sum to 0 mod 2^32.
    Rows too short for what their header claims are not ok."""
    width = (rows.shape[1] // 4) * 4
    numel = rows[:, _NUMEL_AT:_NUMEL_AT + 2].copy().view("<u2").ravel().astype(np.int64)
    nwords = HDR_LEN // 4 + numel
    ok = (lens >= HDR_LEN) & (lens >= 4 * nwords) & (4 * nwords <= width)
    return ok & (_word_sums(rows[:, :width].view("<u4"), nwords) == 0)


def seal_rows(rows: np.ndarray, numel: np.ndarray) -> None:
    """Sets the csum of packets laid out one per uint8 row (header, then numel
    lanes, maybe stale bytes after), in place."""
    words = rows.view("<u4")
    words[:, _CSUM_AT // 4] = 0
    s = _word_sums(words, HDR_LEN // 4 + numel)
    words[:, _CSUM_AT // 4] = (-s.astype(np.int64)) & 0xFFFFFFFF


def seal_bytes(pkt: bytes) -> bytes:
    """One INC packet (header + lanes) with its csum set."""
    a = np.frombuffer(pkt, np.uint8).copy()
    a[_CSUM_AT:_CSUM_AT + 4] = 0
    s = int(a.view("<u4").sum(dtype=np.uint64)) & 0xFFFFFFFF
    a[_CSUM_AT:_CSUM_AT + 4] = np.frombuffer(((-s) & 0xFFFFFFFF).to_bytes(4, "little"), np.uint8)
    return a.tobytes()


def parse_header(data: bytes | memoryview) -> np.void:
    return np.frombuffer(data, dtype=HDR_DTYPE, count=1)[0]

# The same layout as a struct for parsing one received header without numpy overhead.
_STRUCT_CODES = {"u1": "B", "<u2": "H", "<u4": "I", "<u8": "Q"}
HDR_STRUCT = __import__("struct").Struct(
    "<" + "".join(_STRUCT_CODES[HDR_DTYPE.fields[f][0].str.replace("|", "")] for f in HDR_DTYPE.names)
)
assert HDR_STRUCT.size == HDR_LEN
