"""One reduce() of an int32 vector over the switch, reliable and windowed.

Window rule (NetReduce): a rank sends psn p only while p < lowest psn without
a result + W. The job's region has 2W slots, so when anyone sends p, every
rank already holds the result of p - 2W and the slot can start a new round.
Losses are repaired by the sender: a timeout (adaptive RTO) or three later
results arriving first makes it resend; the switch either adds the missing
contribution or answers from the stored result.

Per step of the loop: one send for everything the window allows, one wait
for whatever results arrived, and numpy over the batch; no Python runs per
packet. The packets go by sockets or by the host's XDP programs (reduce_io). The RTT estimate, the RTO and the congestion window live in
the Session and carry over from one reduce to the next.
"""
from __future__ import annotations

import time

import numpy as np


from .incd_link import TransportError
from .reduce_io import SocketIO

# Halving stops here: below it, three later results rarely come to trigger a
# fast retransmit, and every loss waits for the timeout (5 % loss, hash mode,
# 1 MiB: floor 1 2.3 s, 8 0.59 s, 16 0.43 s).
CWND_FLOOR = 16.0


WIRE_PSNS = 1 << 32


def first_psn(next_psn: int, npk: int, p) -> int:
    """Where a reduce of npk packets starts (absolute psn; the wire carries it
    mod 2^32). In modulo mode a psn's slot is psn % slots, and unless slots
    divides 2^32 the mapping jumps where the wire psn wraps: psns in flight on
    both sides would share slots. So a reduce that would cross the wrap starts
    in the next lap instead, at the wire psn that continues the slot sequence
    (same psn % slots): every rank computes the same, and slots are reused in
    the usual order."""
    w0 = next_psn % WIRE_PSNS
    if p.mode != "modulo" or not p.slots or WIRE_PSNS % p.slots == 0 or w0 + npk <= WIRE_PSNS:
        return next_psn
    return next_psn + (WIRE_PSNS - w0) + w0 % p.slots


class WindowedReduce:
    """The state of one reduce: every packet built up front, which are sent
    (nxt), which have results (got, base = the lowest without one), when each
    was last sent and how often."""

    def __init__(self, session, values: np.ndarray, op: int, io=None, select: np.ndarray | None = None):
        self.s = s = session
        p = s.params
        values = np.ascontiguousarray(values, dtype=np.int32).ravel()
        self.n = values.size
        io = io or SocketIO
        self.step = io.step  # psns per packet
        self.psn0_abs = first_psn(s.next_psn, io.packets(p, values.size) * io.step, p)
        self.psn0 = self.psn0_abs & 0xFFFFFFFF
        self.io = io(s, values, op, self.psn0, select)
        self.npk = npk = self.io.npk
        s.next_psn = self.psn0_abs + npk * self.step
        self.sent_gen = np.full(npk, -1, dtype=np.int64)  # a resize changes the generation between psns
        self.W = p.window  # the job's window as last read under the lock (a resize may change it)
        self.got = np.zeros(npk, dtype=bool)
        self.sends = np.zeros(npk, dtype=np.int32)
        self.sent_at = np.zeros(npk)
        self.fast_done = np.zeros(npk, dtype=bool)
        self.overflow = False
        self.base = self.nxt = self.ngot = self.fr = self.retx = 0
        self.last_progress = time.monotonic()
        self.rto_fired = 0.0  # when the retransmission timeout last fired

    def run_rows(self) -> tuple[np.ndarray, bool]:
        """The results as (packets, elems) rows (see Session.reduce_rows)."""
        s = self.s
        while self.ngot < self.npk:
            now = time.monotonic()
            if s.failure is not None or s.ctl.lost_at is not None:
                s._check_failed(now, self.last_progress,
                                f"psn {self.psn0 + self.base * self.step}, {self.ngot}/{self.npk} packets done")
            self.send_new(now)
            if s.resize is not None:
                with s._lock:  # S may come after the last result below it
                    s._maybe_passed(self.psn0_abs + self.base * self.step)
            ids, overflow = self.io.receive(s.rto, self)
            now = time.monotonic()
            if ids.size:
                self.receive(ids, overflow, now)
            self.retransmit_late(now)
            self.check_progress(now)
        s.stats.packets += self.npk
        s.stats.retransmits += self.retx
        s.stats.rto_s = s.rto
        return self.io.rows(), self.overflow

    def send_new(self, now: float) -> None:
        """Sends what the window (and a resize's fence) allows now. The window
        and cwnd count psns; a packet takes `step` of them."""
        s, nxt, step = self.s, self.nxt, self.step
        # Under the lock: a resize proposal reports sent_upto as this rank's
        # fence, so nothing may be sent past it between reading and updating it.
        with s._lock:
            fence, W = s.fence, s.params.window
            self.W = W
            limit = min(self.npk, self.base + max(1, min(int(s.cwnd), W) // step))
            if fence is not None:
                limit = min(limit, max(nxt, (fence - self.psn0_abs) // step))
            if limit > nxt:
                self.sent_gen[nxt:limit] = s.params.gen  # the generation when first sent
                self.sent_at[nxt:limit] = now
                self.sends[nxt:limit] = 1
                self.io.send(nxt, limit, s.params.gen)
                self.nxt = limit
                s.sent_upto = self.psn0_abs + limit * step

    def resend(self, idx: np.ndarray, now: float) -> None:
        self.sent_at[idx] = now
        self.sends[idx] += 1
        self.retx += idx.size
        self.io.resend(idx, self.sent_gen[idx])

    def receive(self, ids: np.ndarray, overflow: bool, now: float) -> None:
        """Takes the results just received (new, valid, each once): then the
        RTT, the window and fast retransmits."""
        s, p = self.s, self.s.params
        got = self.got
        got[ids] = True
        self.ngot += ids.size
        self.overflow |= overflow
        clean = ids[self.sends[ids] == 1]
        if clean.size:
            s._sample_rtt(now - float(self.sent_at[clean].mean()))
        self.last_progress = now
        s.cwnd = min(float(self.W), s.cwnd + ids.size * self.step / max(s.cwnd, 1.0))
        base = self.base
        if base < self.npk and got[base]:
            rest = got[base:]
            self.base = base = self.npk if rest.all() else base + int(rest.argmin())
        # Three later results overtook these: a contribution (maybe another
        # rank's) or the result was lost. Every rank resends, so the one whose
        # packet was lost repairs it without an RTO. Also in hash mode, where a
        # resend evicts the psn's partial to the PS, which completes it (1%
        # loss: 13x faster than waiting for the RTO). Not in ps mode: the PS
        # has it all.
        hi = int(ids.max()) - 2
        if p.mode != "ps" and hi > max(self.fr, base):
            cand = np.arange(max(self.fr, base), min(hi, self.nxt))
            cand = cand[~got[cand] & ~self.fast_done[cand]]
            if cand.size:
                self.fast_done[cand] = True
                self.resend(cand, now)
            self.fr = hi

    def retransmit_late(self, now: float) -> None:
        """The retransmission timeout: resends what waited longer than the RTO,
        backs the RTO off while nothing comes back, and halves the window."""
        s, base, nxt = self.s, self.base, self.nxt
        if base < nxt and now - self.sent_at[base] > s.rto:
            span = np.arange(base, nxt)
            late = span[~self.got[span] & (now - self.sent_at[span] > s.rto)]
            if late.size:
                self.resend(late, now)
            if self.last_progress <= self.rto_fired:
                s.rto = min(0.2, s.rto * 1.5)  # back off while nothing comes back
            self.rto_fired = now
            s.cwnd = max(min(CWND_FLOOR, self.W), s.cwnd / 2)  # and send less: AIMD

    def check_progress(self, now: float) -> None:
        s = self.s
        if now - self.last_progress > s.progress_timeout:
            missing = s.missing_ranks(self.psn0 + self.base * self.step)
            if s.failure is not None:  # another rank gave up first, or incd failed the job: its reason
                raise TransportError(s.failure)
            why = (" while incd was resizing the job's memory" if s.fence is not None and self.base == self.nxt
                   else f"; the switch has nothing from rank{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing))} for it" if missing
                   else "; another rank may have stopped, or incd is gone")
            msg = (f"job {s.params.job}: no result for psn {self.psn0 + self.base * self.step} in {s.progress_timeout:.1f}s "
                   f"({self.ngot}/{self.npk} packets done){why}")
            s.give_up(msg)  # the other ranks learn why from incd, not only that this one left
            raise TransportError(msg)
