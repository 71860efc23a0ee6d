"""How one reduce's packets leave and its results come back. Packets leave by
the data socket: a run of new packets as UDP GSO datagrams (one pass through
the UDP stack for up to 20 packets), resends one by one with sendmmsg.
Results come back through the socket stack (SocketIO: recvmmsg, the portable
path) or through the host's XDP program straight into an mmapped array
(XdpIO, see xdp_path.py); or, with jumbo frames, 64 KB datagrams of
JUMBO_SUBS psns each out and the results into the XDP path's jumbo rows
(JumboIO, bpf/mode_jumbo.h). WindowedReduce drives any of them through the
same four calls: send, resend, receive, rows; `step` is how many psns one of
their packets covers."""
from __future__ import annotations

import numpy as np

from bpf import wire

from . import batchio
from .xdp_path import RX_GOT, RX_OVERFLOW


class SocketIO:
    """Every packet built up front in one numpy buffer; results copied into
    `out` as they come."""

    step = 1  # psns per packet

    @classmethod
    def packets(cls, params, n: int) -> int:
        """Packets a vector of n values takes."""
        return max(1, -(-n // params.elems))

    def __init__(self, s, values: np.ndarray, op: int, psn0: int, select: np.ndarray | None = None):
        p = s.params
        self.s, self.psn0, self.E = s, psn0, p.elems
        self.npk = npk = max(1, -(-values.size // p.elems))
        self.buf, raw = s.packet_buffer(npk)
        sizes, self.lsum = wire.fill_packets(self.buf, values, job=p.job, gen=p.gen, rank=s.rank, psn0=psn0, op=op,
                                             hash_region=(p.offset, p.slots) if p.mode == "hash" else None,
                                             select=select)
        self.msgs = batchio.Messages(raw, sizes.astype(np.uint64))
        self.hdr_gen = self.buf["hdr"]["gen"]
        self.want_numel = (sizes - wire.HDR_LEN) // 4
        self.fd = s.udp.fileno()
        self.gso = batchio.GsoOutbox(raw, sizes) if s.gso else None
        self.out = self._results()

    def _results(self) -> np.ndarray:
        return np.empty((self.npk, self.E), dtype=np.int32)  # every row is written before it is read

    def send(self, start: int, stop: int, gen: int) -> None:
        self.hdr_gen[start:stop] = gen
        wire.seal(self.buf, slice(start, stop), self.lsum)
        if self.gso is not None:
            self.gso.send(self.fd, start, stop)
        else:
            batchio.send_msgs(self.fd, self.msgs.msgs, start, stop - start)

    def resend(self, idx: np.ndarray, gens: np.ndarray) -> None:
        self.buf["hdr"]["flags"][idx] |= wire.F_RETRANS
        wire.seal(self.buf, idx, self.lsum)
        batchio.send_msgs(self.fd, self.msgs.subset(idx))

    def receive(self, timeout: float, r) -> tuple[np.ndarray, bool]:
        """Waits up to timeout for results; returns the indices of the new,
        valid ones (each once) and whether any flagged an overflow."""
        s, E = self.s, self.E
        rx = s._rx
        k = rx.recv(timeout)
        if not k:
            return _NONE, False
        rows = rx.buf[:k]
        lens = rx.m.msgs["len"][:k].astype(np.int64)
        h = np.frombuffer(rows[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
        idx = (h["psn"].astype(np.int64) - self.psn0) & 0xFFFFFFFF
        ok = ((h["version"] == wire.VERSION) & (h["type"] == wire.T_RESULT) & (h["job"] == s.params.job)
              & (lens >= wire.HDR_LEN) & (idx < self.npk))
        early = ~ok & ((h["flags"] & (wire.F_BCAST | wire.F_NO_LANES)) == wire.F_BCAST) & (h["type"] == wire.T_RESULT)
        for i in np.flatnonzero(early):  # a broadcast this rank has not opened yet (bcast.py)
            s.early.append(rows[i, :lens[i]].tobytes())
        intact = wire.csum_ok(rows, lens)  # changed on the way: as if lost
        s.stats.corrupt += int((ok & ~intact).sum())
        ok &= intact
        idx = np.where(ok, idx, 0)
        numel = h["numel"].astype(np.int64)
        bare = (h["flags"] & wire.F_NO_LANES).astype(bool) & (numel == 0)  # complete, lanes for other ranks
        ok &= ((h["gen"] == r.sent_gen[idx]) & ~r.got[idx] & ((numel == self.want_numel[idx]) | bare)
               & (lens >= wire.HDR_LEN + 4 * numel))
        sel = np.nonzero(ok)[0]
        if not sel.size:
            return _NONE, False
        if sel.size == 1:
            ids = idx[sel]
        else:  # a duplicate in one batch counts once
            ids, first = np.unique(idx[sel], return_index=True)
            sel = sel[first]
        lanes = ~bare[sel]  # the rest only say the psn is complete
        ids_all, ids, sel = ids, ids[lanes], sel[lanes]
        full = self.want_numel[ids] == E
        if full.any():
            self.out[ids[full]] = rows[sel[full], wire.HDR_LEN:wire.HDR_LEN + 4 * E].view("<i4")
        for j, row in zip(ids[~full], sel[~full]):  # the short last packet, at most one
            m = int(self.want_numel[j])
            self.out[j, :m] = rows[row, wire.HDR_LEN:wire.HDR_LEN + 4 * m].view("<i4")
        return ids_all, bool(np.any(h["flags"][sel] & wire.F_OVERFLOW))

    def rows(self) -> np.ndarray:
        return self.out


_NONE = np.zeros(0, dtype=np.int64)


class XdpIO(SocketIO):
    """Sends as SocketIO does; results land through the session's XdpPath (at
    most path.max_pkts packets per reduce)."""

    def __init__(self, s, values: np.ndarray, op: int, psn0: int, select: np.ndarray | None = None):
        super().__init__(s, values, op, psn0, select)
        self.path = s.xdp
        self.path.begin(npk=self.npk, elems=self.E, last_numel=int(self.want_numel[-1]), job=s.params.job,
                        psn0=psn0)
        self.corrupt0 = 0
        self.seen = 0  # results landed when the state was last scanned

    def _results(self) -> None:
        return None  # they land in the path's array

    def receive(self, timeout: float, r) -> tuple[np.ndarray, bool]:
        path = self.path
        # Wake on the first result not scanned yet. A higher mark stalls while
        # another rank's window is smaller than ours (after its RTO halved
        # it), since our results then come only as fast as its packets.
        if path.landed() <= self.seen:
            path.wait(timeout, self.seen + 1)
        self.seen = path.landed()  # before the scan: what lands during it is seen next time
        corrupt = int(path.rx_ctl["corrupt"])
        self.s.stats.corrupt += corrupt - self.corrupt0
        self.corrupt0 = corrupt
        lo, hi = r.base, r.nxt
        st = path.state()[lo:hi]
        gen_ok = (st >> np.uint64(16)) == r.sent_gen[lo:hi].astype(np.uint64)
        new = np.flatnonzero((st & np.uint64(RX_GOT)).astype(bool) & gen_ok & ~r.got[lo:hi]) + lo
        if not new.size:
            return _NONE, False
        return new, bool(np.any(path.state()[new] & np.uint64(RX_OVERFLOW)))

    def rows(self) -> np.ndarray:
        return self.path.rx_vec[:self.npk, :self.E]  # a view: valid until the next reduce


class JumboIO(XdpIO):
    """Jumbo frames: one 64 KB datagram per JUMBO_SUBS psns (sendmmsg; UDP GSO
    cannot cut them, nor need it), results in the path's rx_jumbo rows. The
    job's ranks all send them (incd checks that they agreed)."""

    step = wire.JUMBO_SUBS

    @classmethod
    def packets(cls, params, n: int) -> int:
        return max(1, -(-n // wire.JUMBO_ELEMS))

    def __init__(self, s, values: np.ndarray, op: int, psn0: int, select: np.ndarray | None = None):
        p = s.params
        if select is not None or op != wire.OP_SUM or p.elems != wire.MAX_ELEMS:
            raise ValueError("jumbo frames carry sums of full slots for every rank only")
        E = wire.JUMBO_ELEMS
        self.s, self.psn0, self.E, self.n = s, psn0, E, values.size
        self.npk = npk = self.packets(p, values.size)
        # Headers apart, lanes sent from the vector itself (HeaderAndLanes): no copy.
        self.values = values
        self.hdr = np.zeros(npk, dtype=wire.HDR_DTYPE)
        numel = wire.fill_headers(self.hdr, values.size, E, job=p.job, gen=p.gen, rank=s.rank, psn0=psn0,
                                  op=op, jumbo=True)
        self.lsum = wire.vector_lane_sums(values, E)
        wire.seal_headers(self.hdr, slice(None), self.lsum)
        self.msgs = batchio.HeaderAndLanes(self.hdr, values, E, numel)
        self.hdr_gen = self.hdr["gen"]
        self.want_numel = numel.astype(np.int64)
        self.fd = s.udp.fileno()
        self.gso = None
        self.out = None
        self.path = s.xdp
        self.path.begin(npk=npk, elems=E, last_numel=int(numel[-1]), job=p.job, psn0=psn0,
                        jumbo=True, chain_end=s.rank == p.world - 1)
        self.corrupt0 = 0
        self.seen = 0

    def send(self, start: int, stop: int, gen: int) -> None:
        self.hdr_gen[start:stop] = gen
        wire.seal_headers(self.hdr, slice(start, stop), self.lsum)
        batchio.send_msgs(self.fd, self.msgs.msgs, start, stop - start)

    def resend(self, idx: np.ndarray, gens: np.ndarray) -> None:
        self.hdr["flags"][idx] |= wire.F_RETRANS
        wire.seal_headers(self.hdr, idx, self.lsum)
        batchio.send_msgs(self.fd, self.msgs.subset(idx))

    def rows(self) -> np.ndarray:
        """One row per slot (MAX_ELEMS lanes: a jumbo job's packet size), as
        the other paths give them: fp32 scales are per slot's lanes."""
        blocks = max(1, -(-self.n // wire.MAX_ELEMS))
        return self.path.rx_jumbo[:self.npk].reshape(-1, wire.MAX_ELEMS)[:blocks]
