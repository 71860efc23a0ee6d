"""The parameter server of one job: finishes what the switch could not.

Hash mode (ATP): the switch sends complete aggregates, partial aggregates
evicted by a resend, and single contributions that collided or were resent.
Each aggregate carries the bitmap of ranks it holds; aggregates hold only
first transmissions, so they never overlap each other, and a rank that also
arrived on its own is counted from the aggregate. The result goes back to the
switch, which frees the slot as it passes (the ACK) and broadcasts it.

ps mode (the baseline): workers send straight here and get unicast results.

Finished results are kept for a while so a worker that lost one gets it again.
"""
from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import proto
from .transport import (TransportError, connect_incd, control_call, data_socket, params_from)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
KEEP_RESULTS = 16384
# How long the PS waits on a psn it got single packets for before asking the
# switch for that psn's partial (EVICT): other ranks' packets may have claimed
# the slot after the collision and can never complete it there.
EVICT_AFTER_S = 0.002


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
    ignored: int = 0        # other job/generation, malformed, or a rank's repeat

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
        return np.maximum(a, b) if self.op == proto.OP_MAX else a + b

    def total(self) -> np.ndarray:
        out = self.agg
        for r, lanes in self.singles.items():
            if not self.agg_bits >> r & 1:
                out = self.combine(out, lanes)
        return out


class ParameterServer:
    def __init__(self, job: int, world: int, *, mode: str = "hash", switch: str | None = None,
                 ctrl_port: int = proto.CTRL_PORT, register_timeout: float = 30.0):
        if mode not in ("hash", "ps"):
            raise TransportError("a parameter server serves hash or ps mode")
        self.sock = data_socket()
        self.ctrl = None
        try:
            self.ctrl = connect_incd(switch, ctrl_port)
            self.ctrl.settimeout(register_timeout + 10)
            reply = control_call(self.ctrl, {
                "op": "register", "role": "ps", "job": job, "world": world, "mode": mode,
                "port": self.sock.getsockname()[1], "timeout": register_timeout})
        except BaseException:
            self.close()
            raise
        self.p = params_from(reply)
        self.all_bits = (1 << world) - 1
        self.members = {m["rank"]: (m["addr"], m["port"]) for m in self.p.members or []}
        self.pending: dict[int, _Pending] = {}
        self.done: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.stats = PSStats()
        self.evict_at: dict[int, float] = {}  # psn -> when to ask the switch for its partial
        self.stop = threading.Event()
        self.end_reason: str | None = None

    def close(self) -> None:
        for s in (self.ctrl, self.sock):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def _watch_job(self) -> None:
        """incd answers wait_end when the job's workers have all left."""
        try:
            self.ctrl.settimeout(None)
            self.end_reason = control_call(self.ctrl, {"op": "wait_end"}).get("reason")
        except (TransportError, OSError, ValueError) as e:
            self.end_reason = f"lost incd: {e}"
        self.stop.set()

    def _send_result(self, pkt: bytes) -> None:
        if self.p.mode == "hash":
            self.sock.sendto(pkt, (self.p.data_addr, proto.PORT))
        else:
            for addr in self.members.values():
                self.sock.sendto(pkt, addr)

    def _finish(self, psn: int, acc: _Pending) -> None:
        total = acc.total()
        overflow = acc.overflow
        if acc.op == proto.OP_SUM and (total.max(initial=0) > INT32_MAX or total.min(initial=0) < INT32_MIN):
            overflow = True
        hdr = np.zeros(1, proto.HDR_DTYPE)
        hdr[0] = (proto.VERSION, proto.T_RESULT, proto.F_OVERFLOW if overflow else 0, acc.op,
                  self.p.job, self.p.gen, psn, acc.slot, 0, acc.numel, 0, self.all_bits)
        pkt = hdr.tobytes() + total.astype("<i4").tobytes()
        del self.pending[psn]
        self.evict_at.pop(psn, None)
        self.done[psn] = pkt
        if len(self.done) > KEEP_RESULTS:
            self.done.popitem(last=False)
        self.stats.results += 1
        self._send_result(pkt)

    def handle(self, buf: memoryview, nbytes: int, src) -> None:
        st = self.stats
        st.packets += 1
        if nbytes < proto.HDR_LEN:
            st.ignored += 1
            return
        (ver, typ, flags, op, job, gen, psn, slot, rank, numel, _r, bitmap) = proto.HDR_STRUCT.unpack_from(buf)
        if (ver != proto.VERSION or typ != proto.T_DATA or job != self.p.job or gen != self.p.gen
                or not 0 < numel <= proto.MAX_ELEMS or nbytes < proto.HDR_LEN + 4 * numel
                or rank >= self.p.world):
            st.ignored += 1
            return
        if self.p.mode == "ps" and self.members.get(rank, (None,))[0] != src[0]:
            st.ignored += 1  # not the registered host of that rank
            return
        if psn in self.done:
            st.results_resent += 1
            self._send_result(self.done[psn])
            return
        lanes = np.frombuffer(buf, "<i4", numel, proto.HDR_LEN).astype(np.int64)
        acc = self.pending.get(psn)
        if acc is None:
            acc = self.pending[psn] = _Pending(numel, op, slot)
        elif acc.numel != numel or acc.op != op:
            st.ignored += 1
            return
        if flags & proto.F_AGGREGATE:
            if bitmap & acc.agg_bits:
                st.overlaps_ignored += 1  # a repeat of an aggregate already merged
                return
            st.aggregates += 1
            st.partials += bitmap != self.all_bits
            acc.agg = acc.combine(acc.agg, lanes)
            acc.agg_bits |= bitmap
            acc.overflow |= bool(flags & proto.F_OVERFLOW)
        else:
            st.singles += 1
            st.collisions += bool(flags & proto.F_COLLISION)
            if rank in acc.singles:
                st.ignored += 1
                return
            acc.singles[rank] = lanes
            if self.p.mode == "hash" and psn not in self.evict_at:
                self.evict_at[psn] = time.monotonic() + EVICT_AFTER_S
        if acc.have() == self.all_bits:
            self._finish(psn, acc)

    def _evict_overdue(self, now: float) -> None:
        for psn, at in list(self.evict_at.items()):
            acc = self.pending.get(psn)
            if acc is None:
                del self.evict_at[psn]
            elif now >= at:
                hdr = np.zeros(1, proto.HDR_DTYPE)
                hdr[0] = (proto.VERSION, proto.C["INC_T_EVICT"], 0, acc.op, self.p.job, self.p.gen,
                          psn, acc.slot, 0, acc.numel, 0, 0)
                self.sock.sendto(hdr.tobytes() + bytes(4 * acc.numel), (self.p.data_addr, proto.PORT))
                self.stats.evicts_sent += 1
                self.evict_at[psn] = now + 4 * EVICT_AFTER_S  # again later if the partial is still short

    def serve(self) -> PSStats:
        threading.Thread(target=self._watch_job, daemon=True).start()
        buf = bytearray(proto.HDR_LEN + 4 * proto.MAX_ELEMS + 64)
        view = memoryview(buf)
        self.sock.settimeout(EVICT_AFTER_S)
        next_check = 0.0
        while not self.stop.is_set():
            try:
                nbytes, src = self.sock.recvfrom_into(buf)
                self.handle(view, nbytes, src)
            except (socket.timeout, ConnectionRefusedError):
                pass
            now = time.monotonic()
            if self.evict_at and now >= next_check:
                self._evict_overdue(now)
                next_check = now + EVICT_AFTER_S / 2
        return self.stats
