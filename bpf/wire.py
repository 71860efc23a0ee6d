"""The INC wire format, derived from the C headers of this package.

Constants (#define INC_* and enum entries) are parsed out of the C headers at
import time, so there is no second hand-kept list; each is an attribute of this
module without its INC_ prefix. The header layout is written
out here as a numpy dtype because Python cannot take it from C without a
compiler; tests/unit/test_layout.py checks it against offsetof() from gcc,
and every constant against the compiler's value.
"""
from __future__ import annotations

import re

import numpy as np

from . import source

# Files whose #defines and enums make the constants below, in include order:
# the wire format, then the switch's state (its sizes refer to wire constants).
# tests/unit/test_layout.py checks that no other header defines an INC_ constant.
HEADERS = ("inc_proto.h", "inc_state.h")


def _value(expr: str, known: dict[str, int]) -> int | None:
    """A constant expression of numbers, known INC_ names and + - * / ( ) << >>."""
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr.strip())
    expr = re.sub(r"\bINC_\w+\b", lambda m: str(known[m.group()]) if m.group() in known else "?", expr)
    if not re.fullmatch(r"[0-9a-fA-Fx\s+\-*/()<>]+", expr) or "?" in expr:
        return None
    return int(eval(expr.replace("/", "//"), {"__builtins__": {}}))  # digits and operators only


def parse_c_header(text: str, known: dict[str, int] | None = None) -> dict[str, int]:
    """INC_* #defines and enum entries of a C header, with defines that name
    other constants or are expressions of them resolved. Raises ValueError for
    an INC_* define it cannot evaluate (it would silently miss Python)."""
    consts = dict(known or {})
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    for name, expr in re.findall(r"^#define\s+(INC_\w+)[ \t]+(.+?)\s*$", text, re.M):
        if name in ("INC_PROTO_H",) or name.endswith("_H"):
            continue
        v = _value(expr, consts)
        if v is None:
            raise ValueError(f"cannot evaluate #define {name} {expr}")
        consts[name] = v
    for body in re.findall(r"\benum\s+\w*\s*\{(.*?)\}", text, re.S):
        nxt = 0
        for entry in body.split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, _, expr = (x.strip() for x in entry.partition("="))
            v = _value(expr, consts) if expr else nxt
            if v is None:
                raise ValueError(f"cannot evaluate enum entry {entry}")
            consts[name] = v
            nxt = v + 1
    return consts


def _load() -> dict[str, int]:
    consts: dict[str, int] = {}
    for h in HEADERS:
        consts = parse_c_header(source(h).read_text(), consts)
    return consts


C = _load()
HEADER_PATH = source(HEADERS[0])
# Every constant without its INC_ prefix is an attribute of this module:
# wire.MODE_KV, wire.KV_WINDOW, wire.DROP_BAD_CSUM ... (one namespace).
globals().update({k[len("INC_"):]: v for k, v in C.items()})

# Drop reasons in index order, named without the prefix: ["bad_hdr", ...].
DROP_REASONS = [
    name[len("INC_DROP_"):].lower()
    for name, _ in sorted(
        ((k, v) for k, v in C.items() if k.startswith("INC_DROP_") and not k.startswith("INC_DROP__")),
        key=lambda kv: kv[1],
    )
]
assert len(DROP_REASONS) == DROP__COUNT, "drop enum in inc_proto.h is not dense"

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
JUMBO_IP_BYTES = IP_UDP_OVERHEAD + HDR_LEN + 4 * JUMBO_ELEMS  # the MTU a jumbo frame needs


def hash_slots(job: int, psns: np.ndarray, offset: int, size: int) -> np.ndarray:
    """inc_hash_slot() of bpf/inc_proto.h for many psns at once."""
    psns = np.asarray(psns, dtype=np.uint32)
    with np.errstate(over="ignore"):
        h = ((psns // np.uint32(HASH_RUN)) * np.uint32(HASH_MUL_PSN)
             + np.uint32((job * HASH_MUL_JOB) & 0xFFFFFFFF))
    h ^= h >> np.uint32(15)
    size = np.uint32(size)
    return (offset + (h % size + psns % np.uint32(HASH_RUN)) % size).astype(np.uint32)


def elems_for_mtu(mtu: int) -> int:
    """Lanes that fit in one packet on a link of this MTU."""
    return max(0, min(MAX_ELEMS, (mtu - IP_UDP_OVERHEAD - HDR_LEN) // 4))


def packet_dtype(elems: int) -> np.dtype:
    return np.dtype([("hdr", HDR_DTYPE), ("data", "<i4", (elems,))])


def build_packets(values: np.ndarray, elems: int, *, job: int, gen: int, rank: int,
                  psn0: int, op: int = OP_SUM,
                  hash_region: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All data packets of one reduction, built in one numpy buffer.

    Returns (buf, sizes): row i of buf is packet i (header + `elems` lanes, the
    last one zero-padded) and sizes[i] is how many of its bytes to send.
    """
    values = np.ascontiguousarray(values, dtype="<i4").ravel()
    buf = np.empty(max(1, -(-values.size // elems)), dtype=packet_dtype(elems))
    sizes, _ = fill_packets(buf, values, job=job, gen=gen, rank=rank, psn0=psn0, op=op, hash_region=hash_region)
    return buf, sizes


def fill_packets(buf: np.ndarray, values: np.ndarray, *, job: int, gen: int, rank: int, psn0: int,
                 op: int = OP_SUM, hash_region: tuple[int, int] | None = None,
                 select: np.ndarray | None = None, jumbo: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """build_packets into a buffer of packet_dtype(elems) with exactly as many
    rows as the values need, every byte rewritten (a buffer can be reused).
    select (modulo mode): per packet, the bitmap of ranks that want its result's
    lanes (INC_F_SELECT); the others get the result without them. jumbo:
    T_JUMBO frames, each covering JUMBO_SUBS psns (the buffer's elems is
    JUMBO_ELEMS). Returns (sizes, lane sums)."""
    npk = len(buf)
    elems = buf.dtype["data"].shape[0]
    n = values.size
    numel = fill_headers(buf["hdr"], n, elems, job=job, gen=gen, rank=rank, psn0=psn0, op=op,
                         hash_region=hash_region, select=select, jumbo=jumbo)
    data = buf["data"]  # strided: one row per packet
    full = (npk - 1) * elems
    data[:npk - 1] = values[:full].reshape(npk - 1, elems)
    data[npk - 1, :n - full] = values[full:]
    data[npk - 1, max(0, n - full):] = 0
    lsum = lane_sums(buf)
    seal(buf, slice(None), lsum)
    return HDR_LEN + numel.astype(np.int64) * 4, lsum


def fill_headers(hdr: np.ndarray, n: int, elems: int, *, job: int, gen: int, rank: int, psn0: int,
                 op: int = OP_SUM, hash_region: tuple[int, int] | None = None,
                 select: np.ndarray | None = None, jumbo: bool = False) -> np.ndarray:
    """The headers (HDR_DTYPE rows, csum not set) of the packets of n values,
    elems a packet (fill_packets says what the rest means). Returns each
    packet's numel."""
    npk = len(hdr)
    if npk != max(1, -(-n // elems)):
        raise ValueError(f"{n} values need {max(1, -(-n // elems))} packets of {elems}, the buffer has {npk}")
    hdr["version"] = VERSION
    hdr["type"] = T_JUMBO if jumbo else T_DATA
    hdr["flags"] = 0
    hdr["op"] = op
    hdr["job"] = job
    hdr["gen"] = gen
    hdr["rank"] = rank
    hdr["psn"] = (psn0 + np.arange(npk, dtype=np.uint64) * (JUMBO_SUBS if jumbo else 1)) & 0xFFFFFFFF
    hdr["slot"] = hash_slots(job, hdr["psn"], *hash_region) if hash_region is not None else 0
    hdr["bitmap"] = 0
    if select is not None:
        hdr["bitmap"] = select
        hdr["flags"] = F_SELECT
    numel = np.full(npk, elems, dtype=np.uint16)
    numel[-1] = n - elems * (npk - 1) if n else 1
    hdr["numel"] = numel
    return numel


# The csum (bpf/csum_helpers.h): word j of a packet (header, then lanes) weighs
# 2j + 1 and the weighted words sum to 0 mod 2^32. uint32 arithmetic wraps mod
# 2^32, which is the csum's: no widening pass.
_WEIGHTS = 2 * np.arange(1 << 14, dtype=np.uint32) + 1  # words of any UDP datagram
_HDR_WEIGHTS = _WEIGHTS[:HDR_LEN // 4]


def _solve_csum(rest: np.ndarray) -> np.ndarray:
    """The csum field (word CSUM_WORD, weight 11) that brings a weighted sum
    `rest` (of everything else) to 0."""
    with np.errstate(over="ignore"):
        return (np.uint32(0) - rest.astype(np.uint32)) * np.uint32(CSUM_INV11)


def lane_sums(buf: np.ndarray) -> np.ndarray:
    """Per packet of build_packets' buffer: its lanes' part of the weighted
    csum sum, mod 2^32 (the padding past numel is zero)."""
    data = buf["data"].view("<u4")
    return np.einsum("ij,j->i", data, _WEIGHTS[HDR_LEN // 4:HDR_LEN // 4 + data.shape[1]]).astype(np.uint64)


def vector_lane_sums(values: np.ndarray, elems: int, chunk: int = 16) -> np.ndarray:
    """lane_sums() of the packets of a contiguous int32 vector, elems lanes a
    packet (the last may be short), without building the packets: a multiply
    and a sum over a few packets at a time, which stay in cache."""
    v = values.view("<u4")
    npk = max(1, -(-v.size // elems))
    out = np.zeros(npk, dtype=np.uint64)
    w = _WEIGHTS[HDR_LEN // 4:HDR_LEN // 4 + elems]
    full = v.size // elems
    rows = v[:full * elems].reshape(full, elems)
    tmp = np.empty((min(chunk, max(full, 1)), elems), dtype=np.uint32)
    for at in range(0, full, chunk):
        part = rows[at:at + chunk]
        t = tmp[:len(part)]
        np.multiply(part, w, out=t)
        out[at:at + len(part)] = t.sum(axis=1, dtype=np.uint32)
    rest = v[full * elems:]
    if rest.size:
        out[full] = int(np.dot(rest, w[:rest.size]).astype(np.uint32))
    return out


def _hdr_sums(hdr_words: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j->i", hdr_words, _HDR_WEIGHTS)


def seal(buf: np.ndarray, idx, lanes: np.ndarray) -> None:
    """Sets inc_hdr.csum of packets buf[idx] (after any header change) from
    their lanes' sums (lane_sums), as the switch checks it."""
    seal_headers(buf["hdr"], idx, lanes)


def seal_headers(hdr: np.ndarray, idx, lanes: np.ndarray) -> None:
    """seal() for headers kept apart from their lanes (HDR_DTYPE rows)."""
    hdr["csum"][idx] = 0
    words = np.ascontiguousarray(hdr[idx]).view("<u4").reshape(-1, HDR_LEN // 4)
    with np.errstate(over="ignore"):
        rest = _hdr_sums(words) + lanes[idx].astype(np.uint32)
    hdr["csum"][idx] = _solve_csum(rest)


def _word_sums(words: np.ndarray, nwords: np.ndarray) -> np.ndarray:
    """Per row, the weighted sum of its first nwords 32-bit words mod 2^32
    (rows may hold stale bytes past their packet)."""
    live = np.arange(words.shape[1])[None, :] < nwords[:, None]
    return np.einsum("ij,j->i", np.where(live, words, np.uint32(0)), _WEIGHTS[:words.shape[1]])


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
    words[:, _CSUM_AT // 4] = _solve_csum(_word_sums(words, HDR_LEN // 4 + numel))


def seal_bytes(pkt: bytes) -> bytes:
    """One INC packet (header + lanes) with its csum set."""
    a = np.frombuffer(pkt, np.uint8).copy()
    a[_CSUM_AT:_CSUM_AT + 4] = 0
    w = a[:len(a) // 4 * 4].view("<u4")
    a[_CSUM_AT:_CSUM_AT + 4] = _solve_csum(_word_sums(w[None, :], np.array([w.size])))[0:1].view(np.uint8)
    return a.tobytes()


def parse_header(data: bytes | memoryview) -> np.void:
    return np.frombuffer(data, dtype=HDR_DTYPE, count=1)[0]

# The same layout as a struct for parsing one received header without numpy overhead.
_STRUCT_CODES = {"u1": "B", "<u2": "H", "<u4": "I", "<u8": "Q"}
HDR_STRUCT = __import__("struct").Struct(
    "<" + "".join(_STRUCT_CODES[HDR_DTYPE.fields[f][0].str.replace("|", "")] for f in HDR_DTYPE.names)
)
assert HDR_STRUCT.size == HDR_LEN
