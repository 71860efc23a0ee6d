"""The reducer's state, without sockets: leftover packets (each (flow, psn)
once), the sums drained from the switch and the mappers' dictionaries, put
together into {word: count}."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from bpf import kv_wire, wire

from .kv_messages import KVError


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

    def __init__(self, job: int, gen: int, mappers: int):
        self.job, self.gen, self.mappers = job, gen, mappers
        self.seen: set[tuple[int, int]] = set()
        self._keys: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self.words: dict[int, str] = {}
        self.dict_from: set[int] = set()
        self._drained: list[tuple[np.ndarray, np.ndarray]] = []  # (keys, values) of each drain
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
              & (h["job"] == self.job) & (h["gen"] == self.gen) & (h["rank"] < self.mappers)
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
            self._drained.append((k, v))

    def dictionary(self, flow: int, words: dict, collisions=()) -> None:
        """A mapper's key -> word dictionary (keys as ints or decimal strings), and
        the collisions it found among its own words."""
        if not 0 <= flow < self.mappers:
            raise KVError(f"dictionary from flow {flow}, not a mapper of this job (0..{self.mappers - 1})")
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
        return len(self.dict_from) == self.mappers

    def drained_counts(self) -> dict[str, int]:
        """{word: sum drained from the switch} over every key a dictionary
        names (the summary gives only the total)."""
        out: dict[str, int] = {}
        if self._drained:
            uk, sums = _sum_by_key([k for k, _ in self._drained], [v for _, v in self._drained])
            for k, v in zip(uk.tolist(), sums.tolist()):
                w = self.words.get(k)
                if w is not None and v:
                    out[w] = v
        return out

    def counts(self) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
        """{word: count} over everything added; raises KVError for a key that no
        dictionary names. Colliding keys are left out and returned."""
        if self._keys:
            uk, sums = _sum_by_key(self._keys, self._vals)
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


def _sum_by_key(keys: list[np.ndarray], vals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys and each one's sum."""
    uk, inv = np.unique(np.concatenate(keys), return_inverse=True)
    sums = np.zeros(uk.size, np.int64)
    np.add.at(sums, inv, np.concatenate(vals))
    return uk, sums


def summary_dict(s: ReduceSummary) -> dict:
    d = asdict(s)
    d["collisions"] = [[hex(k), a, b] for k, a, b in s.collisions]
    return d
