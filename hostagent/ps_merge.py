"""The parameter server's merging logic, without sockets: batches of received
datagrams in, result packets (rows of a result cache) out.

Hash mode (ATP): the switch sends complete aggregates, partial aggregates
evicted by a resend, and single contributions that collided or were resent.
Each aggregate carries the bitmap of ranks it holds; aggregates hold only
first transmissions, so they never overlap each other, and a rank that also
arrived on its own is counted from the aggregate.

ps mode (the baseline): workers send their contributions straight here.

Batches are handled with numpy, no Python per packet, for the two cases that
carry nearly all traffic: complete aggregates from the switch (hash mode: the
result is the aggregate itself) and single contributions (ps mode: summed into
a ring of accumulators indexed by psn). Everything else (partial aggregates,
collisions, a psn whose ring entry is taken by another psn) goes through a
per-packet path that handles every case.

Finished results stay in a ring of rows indexed by psn so a worker that lost
one gets it again. A worker can be at most about two windows ahead of the
slowest one, so a ring far larger than the window never drops a result a
worker can still ask for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bpf import wire

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
RING = 4096          # pending psns (ps mode) and cached results, power of two
# How long the PS waits on a psn it got single packets for before asking the
# switch for that psn's partial (EVICT): other ranks' packets may have claimed
# the slot after the collision and can never complete it there.
EVICT_AFTER_S = 0.0005
EVICT_MAX_GAP_S = 0.05
ROW = wire.HDR_LEN + 4 * wire.MAX_ELEMS


@dataclass
class PSStats:
    packets: int = 0
    aggregates: int = 0
    partials: int = 0       # aggregates of fewer than all ranks
    singles: int = 0
    collisions: int = 0
    overlaps_ignored: int = 0
    results: int = 0
    results_resent: int = 0
    evicts_sent: int = 0
    ignored: int = 0        # other job/generation, malformed, wrong source, or a rank's repeat
    corrupt: int = 0        # csum mismatch: dropped, the sender resends
    slow_path: int = 0      # packets handled one by one
    xdp_results: int = 0    # of results: made by the XDP fast path (ps_xdp.py)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Pending:
    numel: int
    op: int
    slot: int
    agg: np.ndarray | None = None
    agg_bits: int = 0
    singles: dict = field(default_factory=dict)  # rank -> int64 lanes
    overflow: bool = False

    def have(self) -> int:
        bits = self.agg_bits
        for r in self.singles:
            bits |= 1 << r
        return bits

    def combine(self, a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
        if a is None:
            return b.copy()
        return np.maximum(a, b) if self.op == wire.OP_MAX else a + b

    def total(self) -> np.ndarray:
        out = self.agg
        for r, lanes in self.singles.items():
            if not self.agg_bits >> r & 1:
                out = self.combine(out, lanes)
        return out


def _ip_u32(addr: str) -> int:
    a, b, c, d = (int(x) for x in addr.split("."))
    return a | b << 8 | c << 16 | d << 24  # as it sits in a sockaddr_in, read little-endian


class Merger:
    """State of one job at its parameter server.

    feed() takes received datagrams and returns the indices of result rows
    (self.done_rows / self.done_len) to send, in order; a result may be listed
    again when a worker asked for it again."""

    def __init__(self, job: int, gen: int, world: int, mode: str,
                 member_addrs: dict[int, str] | None = None,
                 cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        """cache: (rows, tag, length) of a result cache shared with the XDP
        fast path (ps_xdp.py), RING entries each; else a private one."""
        if mode not in ("hash", "ps"):
            raise ValueError("a parameter server serves hash or ps mode")
        self.job, self.gen, self.world, self.mode = job, gen, world, mode
        self.all_bits = (1 << world) - 1
        self.stats = PSStats()
        # Source check in ps mode: rank r's packets must come from its registered host.
        self.member_ip = np.full(wire.MAX_WORKERS, -1, dtype=np.int64)
        for r, addr in (member_addrs or {}).items():
            self.member_ip[r] = _ip_u32(addr)
        if cache is None:
            cache = (np.zeros((RING, ROW), dtype=np.uint8), np.full(RING, -1, dtype=np.int64),
                     np.zeros(RING, dtype=np.int64))
        self.done_rows, self.done_tag, self.done_len = cache
        if mode == "ps":
            self.acc = np.zeros((RING, wire.MAX_ELEMS), dtype=np.int64)
            self.tag = np.full(RING, -1, dtype=np.int64)
            self.bits = np.zeros(RING, dtype=np.uint64)
            self.numel = np.zeros(RING, dtype=np.int64)
            self.op = np.zeros(RING, dtype=np.int64)
        self.pending: dict[int, _Pending] = {}   # the per-packet path's psns
        self.evict_at: dict[int, float] = {}    # psn -> when to ask the switch for its partial
        self.evict_gap: dict[int, float] = {}   # psn -> wait before asking again (doubles)

    # --- results ------------------------------------------------------------
    def _store(self, psn: np.ndarray, numel: np.ndarray, op: np.ndarray, slot: np.ndarray,
               lanes: np.ndarray, overflow: np.ndarray) -> np.ndarray:
        """Writes result packets for these psns into the cache; returns their rows."""
        d = psn & (RING - 1)
        hdr = np.zeros(psn.size, wire.HDR_DTYPE)
        hdr["version"], hdr["type"] = wire.VERSION, wire.T_RESULT
        hdr["flags"] = np.where(overflow, wire.F_OVERFLOW, 0)
        hdr["op"], hdr["job"], hdr["gen"] = op, self.job, self.gen
        hdr["psn"], hdr["slot"], hdr["numel"], hdr["bitmap"] = psn, slot, numel, self.all_bits
        self.done_rows[d, :wire.HDR_LEN] = hdr.view(np.uint8).reshape(psn.size, -1)
        self.done_rows[d, wire.HDR_LEN:] = lanes.astype("<i4").view(np.uint8)
        self.done_len[d] = wire.HDR_LEN + 4 * numel
        sealed = self.done_rows[d]  # a copy (fancy index): sealed, then written back
        wire.seal_rows(sealed, numel)
        self.done_rows[d] = sealed
        self.done_tag[d] = psn
        self.stats.results += psn.size
        return d

    def _finish_slow(self, psn: int, acc: _Pending) -> int:
        total = acc.total()
        overflow = acc.overflow or (acc.op == wire.OP_SUM and (
            total.max(initial=0) > INT32_MAX or total.min(initial=0) < INT32_MIN))
        lanes = np.zeros((1, wire.MAX_ELEMS), dtype=np.int64)
        lanes[0, :acc.numel] = total
        del self.pending[psn]
        self.evict_at.pop(psn, None)
        self.evict_gap.pop(psn, None)
        return int(self._store(np.array([psn]), np.array([acc.numel]), np.array([acc.op]),
                               np.array([acc.slot]), lanes, np.array([overflow]))[0])

    # --- batches ------------------------------------------------------------
    def feed(self, rows: np.ndarray, lens: np.ndarray, src_ip: np.ndarray | None = None,
             now: float = 0.0) -> np.ndarray:
        """rows: k received datagrams (uint8, one per row, at least HDR_LEN + 4 *
        MAX_ELEMS wide); lens: their lengths; src_ip: their IPv4 source as
        sockaddr_in bytes read little-endian (needed in ps mode)."""
        st = self.stats
        k = rows.shape[0]
        st.packets += k
        lens = lens.astype(np.int64)
        h = np.frombuffer(rows[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
        numel = h["numel"].astype(np.int64)
        rank = h["rank"].astype(np.int64)
        ok = ((lens >= wire.HDR_LEN) & (h["version"] == wire.VERSION) & (h["type"] == wire.T_DATA)
              & (h["job"] == self.job) & (h["gen"] == self.gen) & (numel > 0)
              & (numel <= wire.MAX_ELEMS) & (lens >= wire.HDR_LEN + 4 * numel) & (rank < self.world)
              & ((h["op"] == wire.OP_SUM) | (h["op"] == wire.OP_MAX)))
        intact = wire.csum_ok(rows, lens)  # changed on the way: as if lost
        st.corrupt += int((~intact & (lens >= wire.HDR_LEN + 4 * numel) & (numel > 0)).sum())
        ok &= intact
        agg = (h["flags"] & wire.F_AGGREGATE) != 0
        if self.mode == "ps":
            ok &= ~agg & (src_ip == self.member_ip[np.minimum(rank, wire.MAX_WORKERS - 1)])
        st.ignored += k - int(ok.sum())
        psn = h["psn"].astype(np.int64)
        out = []

        if self.mode == "hash":
            # A complete aggregate is the result, whatever else came for its psn.
            full = ok & agg & (h["bitmap"] == self.all_bits) & (self.done_tag[psn & (RING - 1)] != psn)
            if full.any():
                sel = np.nonzero(full)[0]
                _, first = np.unique(psn[sel], return_index=True)
                sel = sel[np.sort(first)]
                lanes = rows[sel, wire.HDR_LEN:ROW].view("<i4")
                out.append(self._store(psn[sel], numel[sel], h["op"][sel], h["slot"][sel], lanes,
                                       (h["flags"][sel] & wire.F_OVERFLOW) != 0))
                st.aggregates += sel.size
                if self.pending:
                    for p in psn[sel].tolist():
                        self.pending.pop(p, None)
                        self.evict_at.pop(p, None)
                        self.evict_gap.pop(p, None)
                ok[sel] = False

        # A psn already finished: the sender lost the result; send it again.
        hit = ok & (self.done_tag[psn & (RING - 1)] == psn)
        if hit.any():
            sel = np.nonzero(hit)[0]
            out.append(psn[sel] & (RING - 1))
            st.results_resent += sel.size
            ok &= ~hit

        if self.mode == "ps" and ok.any():
            fast = ok.copy()
            if self.pending:
                fast &= ~np.isin(psn, np.fromiter(self.pending, dtype=np.int64))
            d, alias, mismatch = self._ps_singles(np.nonzero(fast)[0], rows, h, psn, numel, rank)
            out.append(d)
            st.ignored += mismatch.size  # its psn is here with another size or op
            ok &= ~fast
            ok[alias] = True  # its ring entry holds another psn: per-packet path

        for i in np.nonzero(ok)[0].tolist():
            d = self._slow(rows[i], h[i], now)
            if d is not None:
                out.append(np.array([d]))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _ps_singles(self, sel: np.ndarray, rows, h, psn, numel, rank):
        """Sums single contributions into the psn-indexed ring. Returns the
        result rows finished, the rows whose ring entry holds another psn, and
        the rows that disagree with their psn's size or op."""
        st = self.stats
        r = psn[sel] & (RING - 1)
        op = h["op"][sel].astype(np.int64)
        free = self.tag[r] < 0
        if free.any():  # each free entry goes to the first row that wants it
            fr = np.nonzero(free)[0]
            u, first = np.unique(r[fr], return_index=True)
            c = fr[first]
            self.tag[u], self.numel[u], self.op[u], self.bits[u] = psn[sel][c], numel[sel][c], op[c], 0
            self.acc[u] = np.where(op[c] == wire.OP_MAX, INT32_MIN, 0)[:, None]
        same_psn = self.tag[r] == psn[sel]
        mine = same_psn & (self.numel[r] == numel[sel]) & (self.op[r] == op)
        alias, mismatch = sel[~same_psn], sel[same_psn & ~mine]
        taken = sel[mine]
        r, op, rk = r[mine], op[mine], rank[taken]
        bit = np.left_shift(np.uint64(1), rk.astype(np.uint64))
        new = (self.bits[r] & bit) == 0
        once = np.zeros(r.size, dtype=bool)
        once[np.unique(r * 64 + rk, return_index=True)[1]] = True  # a repeat within the batch counts once
        use = new & once
        st.ignored += int(r.size - use.sum())
        st.singles += int(use.sum())
        r, op, bit = r[use], op[use], bit[use]
        lanes = rows[taken[use], wire.HDR_LEN:ROW].view("<i4").astype(np.int64)
        s = op == wire.OP_SUM
        if s.any():
            np.add.at(self.acc, r[s], lanes[s])
        if (~s).any():
            np.maximum.at(self.acc, r[~s], lanes[~s])
        np.bitwise_or.at(self.bits, r, bit)
        done = np.unique(r[self.bits[r] == self.all_bits])
        if not done.size:
            return np.zeros(0, dtype=np.int64), alias, mismatch
        n = self.numel[done]
        live = np.arange(wire.MAX_ELEMS)[None, :] < n[:, None]
        lanes = np.where(live, self.acc[done], 0)
        ovf = (self.op[done] == wire.OP_SUM) & ((lanes > INT32_MAX) | (lanes < INT32_MIN)).any(axis=1)
        d = self._store(self.tag[done], n, self.op[done], np.zeros(done.size, dtype=np.int64), lanes, ovf)
        self.tag[done] = -1
        return d, alias, mismatch

    def _slow(self, row: np.ndarray, h, now: float) -> int | None:
        """One packet, any case. Returns the result row to send, if any."""
        st = self.stats
        st.slow_path += 1
        d = int(h["psn"]) & (RING - 1)
        if self.done_tag[d] == int(h["psn"]):  # finished earlier in this batch
            st.results_resent += 1
            return d
        psn, numel, op, flags, rank = int(h["psn"]), int(h["numel"]), int(h["op"]), int(h["flags"]), int(h["rank"])
        lanes = row[wire.HDR_LEN:wire.HDR_LEN + 4 * numel].view("<i4").astype(np.int64)
        acc = self.pending.get(psn)
        if acc is None:
            acc = self.pending[psn] = _Pending(numel, op, int(h["slot"]))
        elif acc.numel != numel or acc.op != op:
            st.ignored += 1
            return None
        if flags & wire.F_AGGREGATE:
            bitmap = int(h["bitmap"])
            if bitmap & acc.agg_bits or bitmap & ~self.all_bits:
                st.overlaps_ignored += 1  # a repeat of an aggregate already merged
                return None
            st.aggregates += 1
            st.partials += bitmap != self.all_bits
            acc.agg = acc.combine(acc.agg, lanes)
            acc.agg_bits |= bitmap
            acc.overflow |= bool(flags & wire.F_OVERFLOW)
        else:
            st.singles += 1
            st.collisions += bool(flags & wire.F_COLLISION)
            if rank in acc.singles:
                st.ignored += 1
                return None
            acc.singles[rank] = lanes
            if self.mode == "hash" and psn not in self.evict_at:
                self.evict_at[psn] = now + EVICT_AFTER_S
        if acc.have() == self.all_bits:
            return self._finish_slow(psn, acc)
        return None

    def evicts_due(self, now: float) -> list[bytes]:
        """EVICT packets for psns that waited too long on singles (hash mode):
        the switch answers with that psn's partial aggregate."""
        out = []
        for psn, at in list(self.evict_at.items()):
            acc = self.pending.get(psn)
            if acc is not None and self.done_tag[psn & (RING - 1)] == psn:
                self.pending.pop(psn)  # finished by the XDP fast path
                acc = None
            if acc is None:
                del self.evict_at[psn]
                self.evict_gap.pop(psn, None)
            elif now >= at:
                hdr = np.zeros(1, wire.HDR_DTYPE)
                hdr[0] = (wire.VERSION, wire.T_EVICT, 0, acc.op, self.job, self.gen,
                          psn, acc.slot, 0, acc.numel, 0, 0)
                out.append(wire.seal_bytes(hdr.tobytes() + bytes(4 * acc.numel)))
                self.stats.evicts_sent += 1
                # Again later if the partial is still short: its missing
                # contribution may be lost and come only with the workers'
                # resends, so ask less and less often (at most every 50 ms).
                gap = min(EVICT_MAX_GAP_S, self.evict_gap.get(psn, 2 * EVICT_AFTER_S) * 2)
                self.evict_gap[psn] = gap
                self.evict_at[psn] = now + gap
        return out
