"""Broadcast through the switch (modulo mode, bpf/mode_bcast.h): the root
sends its vector once, the switch replicates it, and the other ranks send
back only header-only ACKs.

The root runs the usual windowed sender (reduction.WindowedReduce) on packets
flagged INC_F_BCAST; its "results" are the switch's header-only completions,
which come once every rank has ACKed, so its window only moves past psns
everyone holds. The other ranks are passive (BcastReceive): they take the
data as it comes, ACK every copy (a copy seen again means the root resent it:
an ACK or the completion may be lost), and wait for each psn's completion,
ACKing again after the RTO when it does not come. On the XDP receive path
host_rx lands the lanes and marks the completion (HOST_RX_BARE).
"""
from __future__ import annotations

import time

import numpy as np

from bpf import wire

from . import batchio
from .incd_link import TransportError
from .reduce_io import SocketIO, XdpIO
from .reduction import first_psn
from .xdp_path import RX_BARE, RX_GOT

_ACK_FLAGS = wire.F_BCAST | wire.F_NO_LANES


def mark_bcast(io):
    """The root's packets of a reduce I/O object become broadcast data."""
    io.buf["hdr"]["flags"] |= wire.F_BCAST
    return io


class BcastRootIO(SocketIO):
    def __init__(self, s, values, op, psn0, select=None):
        super().__init__(s, values, op, psn0, None)
        mark_bcast(self)


class BcastRootXdpIO(XdpIO):
    def __init__(self, s, values, op, psn0, select=None):
        super().__init__(s, values, op, psn0, None)
        mark_bcast(self)


def ack_rows(job: int, rank: int, psn0: int, npk: int) -> np.ndarray:
    """Header-only ACKs for psns psn0.. (uint8 rows; gen and csum set when sent)."""
    h = np.zeros(npk, wire.HDR_DTYPE)
    h["version"], h["type"], h["flags"], h["op"] = wire.VERSION, wire.T_DATA, _ACK_FLAGS, wire.OP_SUM
    h["job"], h["rank"] = job, rank
    h["psn"] = (psn0 + np.arange(npk, dtype=np.int64)) & 0xFFFFFFFF
    return h.view(np.uint8).reshape(npk, wire.HDR_LEN).copy()


class BcastReceive:
    """A non-root rank's side of one broadcast of numel int32 values (at most
    xdp_path.MAX_PKTS packets: Session.broadcast goes in pieces)."""

    def __init__(self, session, numel: int, root: int):
        self.s = s = session
        p = s.params
        self.root, self.E = root, p.elems
        self.npk = npk = max(1, -(-numel // p.elems))
        self.psn0_abs = first_psn(s.next_psn, npk, p)  # as the root's WindowedReduce computes it
        s.next_psn = self.psn0_abs + npk
        self.psn0 = self.psn0_abs & 0xFFFFFFFF
        self.want = np.full(npk, p.elems, dtype=np.int64)
        self.want[-1] = numel - (npk - 1) * p.elems
        self.have = np.zeros(npk, dtype=bool)
        self.done = np.zeros(npk, dtype=bool)
        self.acked_at = np.zeros(npk)
        self.acks = ack_rows(p.job, s.rank, self.psn0, npk)
        self.msgs = batchio.Messages(self.acks, np.full(npk, wire.HDR_LEN, dtype=np.uint64))
        self.reacks = 0
        self.path = s.xdp
        if self.path is None:
            self.out = np.zeros((npk, p.elems), dtype=np.int32)
        else:
            self.path.begin(npk=npk, elems=p.elems, last_numel=int(self.want[-1]), job=p.job, psn0=self.psn0)
            self.seen = 0
            self.corrupt0 = 0
        self.early_ids = None
        self.kick = False  # early data landed by hand: look before waiting
        self._take_early()

    def _ack(self, idx: np.ndarray, now: float, again: bool) -> None:
        rows = self.acks[idx]
        h = rows.view(wire.HDR_DTYPE).reshape(-1)
        h["gen"] = self.s.params.gen
        h["flags"] = _ACK_FLAGS | (wire.F_RETRANS if again else 0)
        wire.seal_rows(rows, np.zeros(idx.size, dtype=np.int64))
        self.acks[idx] = rows
        with self.s._lock:  # what a live resize's report calls this rank's next psn
            self.s.sent_upto = max(self.s.sent_upto, self.psn0_abs + int(idx.max()) + 1)
        batchio.send_msgs(self.s.udp.fileno(), self.msgs.subset(idx))
        self.acked_at[idx] = now
        self.reacks += int(again) * idx.size

    def run(self) -> np.ndarray:
        """The root's values as (packets, elems) rows (with the XDP path: a view
        of its array, valid until the next reduce)."""
        s = self.s
        last_progress = time.monotonic()
        while not self.done.all():
            now = time.monotonic()
            if s.failure is not None or s.ctl.lost_at is not None:
                s._check_failed(now, last_progress, f"broadcast from rank {self.root}, "
                                f"{int(self.done.sum())}/{self.npk} packets done")
            if s.resize is not None:
                with s._lock:
                    s._maybe_passed(self.psn0_abs + int(np.argmin(self.done)))
            data, again, fin = self._poll_socket() if self.path is None else self._poll_xdp()
            now = time.monotonic()
            if data.size:
                self.have[data] = True
                self._ack(data, now, again=False)
            if again.size:  # a copy seen again: the root resent it, our ACK may be lost
                self._ack(again, now, again=True)
            if fin.size:
                self.done[fin] = True
            if data.size or fin.size:
                last_progress = now
            late = np.flatnonzero(self.have & ~self.done & (now - self.acked_at > s.rto))
            if late.size:
                self._ack(late, now, again=True)
            if now - last_progress > s.progress_timeout:
                msg = (f"job {s.params.job}: no broadcast data from rank {self.root} for psn "
                       f"{self.psn0 + int(np.argmin(self.done))} in {s.progress_timeout:.1f}s "
                       f"({int(self.done.sum())}/{self.npk} packets done)")
                s.give_up(msg)
                raise TransportError(msg)
        s.stats.packets += self.npk
        s.stats.retransmits += self.reacks
        return self.out if self.path is None else self.path.rx_vec[:self.npk, :self.E]

    def _poll_xdp(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What host_rx landed since the last look: new lanes, and completions."""
        path = self.path
        if not self.kick and path.landed() <= self.seen:
            path.wait(self.s.rto, self.seen + 1)
        self.kick = False
        self.seen = path.landed()
        if self.s.early:  # passed up while this broadcast was being opened, kept by the drain
            self._take_early()
        corrupt = int(path.rx_ctl["corrupt"])
        self.s.stats.corrupt += corrupt - self.corrupt0
        self.corrupt0 = corrupt
        st = path.state()
        got = (st & np.uint64(RX_GOT)).astype(bool)
        bare = (st & np.uint64(RX_BARE)).astype(bool)
        return np.flatnonzero(got & ~bare & ~self.have), _NONE, np.flatnonzero(bare & ~self.done)

    def _classify(self, rows: np.ndarray, lens: np.ndarray):
        """Per received datagram: its index in this broadcast, whether it is
        this broadcast's data (whole and intact), whether its completion."""
        s = self.s
        h = np.frombuffer(rows[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
        idx = (h["psn"].astype(np.int64) - self.psn0) & 0xFFFFFFFF
        ok = ((h["version"] == wire.VERSION) & (h["type"] == wire.T_RESULT) & (h["job"] == s.params.job)
              & ((h["flags"] & wire.F_BCAST) != 0) & (lens >= wire.HDR_LEN) & (idx < self.npk))
        intact = wire.csum_ok(rows, lens)
        s.stats.corrupt += int((ok & ~intact).sum())
        ok &= intact
        idx = np.where(ok, idx, 0)
        numel = h["numel"].astype(np.int64)
        bare = (h["flags"] & wire.F_NO_LANES) != 0
        data = ok & ~bare & (numel == self.want[idx]) & (lens >= wire.HDR_LEN + 4 * numel)
        return idx, data, ok & bare & (numel == 0), h

    def _lanes_into(self, dest: np.ndarray, rows: np.ndarray, ids: np.ndarray, sel: np.ndarray) -> None:
        for j, row in zip(ids, sel):
            m = int(self.want[j])
            dest[j, :m] = rows[row, wire.HDR_LEN:wire.HDR_LEN + 4 * m].view("<i4")

    def _take_early(self) -> None:
        """This broadcast's data that came before it was opened (Session.early):
        landed as if it came now; data of later broadcasts stays kept."""
        early = self.s.early
        frames = [early.popleft() for _ in range(len(early))]
        if not frames:
            return
        rows = np.zeros((len(frames), max(len(f) for f in frames)), dtype=np.uint8)
        for i, f in enumerate(frames):
            rows[i, :len(f)] = np.frombuffer(f, np.uint8)
        lens = np.array([len(f) for f in frames], dtype=np.int64)
        idx, data, _, h = self._classify(rows, lens)
        ahead = ((h["psn"].astype(np.int64) - self.psn0) & 0xFFFFFFFF) - self.npk
        for i in np.flatnonzero(~data & (ahead >= 0) & (ahead < 1 << 30)):
            early.append(frames[i])  # a later broadcast's
        sel = np.flatnonzero(data)
        ids, first = np.unique(idx[sel], return_index=True)
        sel = sel[first]
        if self.path is None:
            self._lanes_into(self.out, rows, ids, sel)
            self.have[ids] = True
            self.early_ids = ids
        else:
            empty = self.path.rx_state[ids] == 0  # host_rx may have landed a copy since
            ids, sel = ids[empty], sel[empty]
            self._lanes_into(self.path.rx_vec, rows, ids, sel)
            gen = h["gen"][sel].astype(np.uint64)
            self.path.rx_state[ids] = np.uint64(RX_GOT) | (gen << np.uint64(16))
            self.kick = bool(ids.size)

    def _poll_socket(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A received batch: new data (its lanes copied), data seen before, and
        completions; first what came before the broadcast was opened."""
        if self.early_ids is not None:
            ids, self.early_ids = self.early_ids, None
            return ids, _NONE, _NONE
        s, rx = self.s, self.s._rx
        k = rx.recv(s.rto)
        if not k:
            return _NONE, _NONE, _NONE
        rows, lens = rx.buf[:k], rx.m.msgs["len"][:k].astype(np.int64)
        idx, data, fin, _ = self._classify(rows, lens)
        sel = np.flatnonzero(data)
        ids, first = np.unique(idx[sel], return_index=True)
        fresh = ~self.have[ids]
        self._lanes_into(self.out, rows, ids[fresh], sel[first][fresh])
        fin = np.unique(idx[fin])
        return ids[fresh], ids[~fresh], fin[~self.done[fin]]


_NONE = np.zeros(0, dtype=np.int64)
