"""What a word count's mapper and reducer exchange besides the switch's
packets: the reducer's acknowledgements of leftover packets, and a mapper's
key -> word dictionary (one JSON line over TCP). The header's "rank" field
carries the mapper's flow id in key-value mode."""
from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from bpf import wire

from .incd_link import TransportError


class KVError(TransportError):
    pass


class CollisionError(KVError):
    """Two words share a key: their counts cannot be told apart."""


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
