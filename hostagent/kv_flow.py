"""A mapper's flow of packets: which tuples go
through the switch and which straight to the reducer (Router), every packet
kept for resends with its destination (PacketLog), and which psns the window
lets out or are due for a resend (AckWindow)."""
from __future__ import annotations

import numpy as np

from bpf import kv_wire, wire

from . import batchio


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


class PacketLog:
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


class Router:
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
