"""Talking to the switch: registration over incd's control API, and a reliable
windowed reduction of int32 vectors over UDP.

Window rule (NetReduce): a worker sends psn p only while p < lowest psn without
a result + W. The job's region has 2W slots, so when anyone sends p, every
worker already holds the result of p - 2W and the slot can start a new round.
Losses are repaired by the sender: a timeout (adaptive RTO) or three later
results arriving first makes it resend; the switch either adds the missing
contribution or answers from the stored result.
"""
from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import batchio, proto


# Below this, 4 agents sharing 2 cores time out on each other just by being
# descheduled; losses are mostly repaired earlier by the fast retransmit.
MIN_RTO = 0.02


class TransportError(RuntimeError):
    pass


def default_gateway() -> str | None:
    """The IPv4 default gateway of this namespace: where the switch is in the lab."""
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == "00000000" and int(fields[3], 16) & 2:
                    return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return None


@dataclass
class JobParams:
    job: int
    gen: int
    world: int
    window: int
    elems: int
    data_addr: str
    data_port: int
    mode: str = "modulo"
    offset: int = 0
    slots: int = 0
    ps: dict | None = None
    members: list | None = None


MODES = ("modulo", "hash", "ps")


def data_socket() -> socket.socket:
    """A UDP socket on an ephemeral port outside the INC range: the switch takes
    a datagram to such a port for INC traffic (PS-baseline packets and results
    are addressed to these sockets)."""
    for _ in range(64):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        s.bind(("0.0.0.0", 0))
        if not proto.PORT_MIN <= s.getsockname()[1] <= proto.PORT_MAX:
            return s
        s.close()
    raise TransportError("no UDP port outside the INC range")


def control_call(ctrl: socket.socket, req: dict) -> dict:
    ctrl.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            chunk = ctrl.recv(65536)
            if not chunk:
                raise TransportError("incd closed the control connection")
            buf += chunk
    except socket.timeout as e:
        raise TransportError(f"incd did not answer {req['op']!r} in time") from e
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise TransportError(f"incd refused {req['op']}: {reply.get('error')}")
    return reply


def connect_incd(switch: str | None, ctrl_port: int) -> socket.socket:
    switch = switch or default_gateway()
    if not switch:
        raise TransportError("no switch address: pass --switch (there is no default gateway)")
    try:
        return socket.create_connection((switch, ctrl_port), timeout=10)
    except OSError as e:
        raise TransportError(f"cannot reach incd at {switch}:{ctrl_port}: {e}") from e


def params_from(reply: dict) -> JobParams:
    return JobParams(reply["job"], reply["gen"], reply["world"], reply.get("window") or 0,
                     reply["elems"], reply["data_addr"], reply["data_port"], reply["mode"],
                     reply["offset"], reply["slots"], reply.get("ps"), reply.get("members"))


@dataclass
class ReduceStats:
    packets: int = 0
    retransmits: int = 0
    corrupt: int = 0
    rto_s: float = 0.0


class Session:
    """One rank's membership in one job: control connection plus data socket."""

    def __init__(self, job: int, rank: int, world: int, *, window: int = 64,
                 switch: str | None = None, ctrl_port: int = proto.CTRL_PORT,
                 register_timeout: float = 30.0, progress_timeout: float = 10.0,
                 shape: str | None = None, mode: str = "modulo", demand: dict | None = None):
        if mode not in MODES:
            raise TransportError(f"mode must be one of {MODES}")
        self.rank = rank
        self.progress_timeout = progress_timeout
        self.ctrl = None
        self.udp = data_socket()
        try:
            self.ctrl = connect_incd(switch, ctrl_port)
            self.ctrl.settimeout(register_timeout + 10)
            reply = self._call({
                "op": "register", "job": job, "rank": rank, "world": world, "window": window,
                "port": self.udp.getsockname()[1], "mode": mode, "timeout": register_timeout,
                "shape": shape, **(demand or {}),
            })
            self.params = params_from(reply)
            if self.params.elems <= 0:
                raise TransportError("switch ports' MTU too small for an INC packet")
            if mode == "ps":  # the baseline: straight to the parameter server
                self.udp.connect((self.params.ps["addr"], self.params.ps["port"]))
            else:
                self.udp.connect((self.params.data_addr, self.params.data_port))
        except BaseException:
            self.close()
            raise
        self.next_psn = 0          # absolute; the wire carries it mod 2^32
        self.sent_upto = 0         # absolute psn of the next packet not yet sent
        self.in_reduce = False
        self.fence: int | None = None  # live resize: send no psn >= this
        self.remap: dict | None = None
        self.resizes = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._replies: queue.Queue = queue.Queue()
        self.ctrl.settimeout(None)
        threading.Thread(target=self._read_control, daemon=True).start()
        self.srtt = None
        self.rttvar = 0.0
        self.rto = 0.02
        self.cwnd = float(self.params.window)  # AIMD congestion window, at most the job's window
        self._rx = batchio.Receiver(self.udp.fileno(), 256, proto.HDR_LEN + 4 * proto.MAX_ELEMS + 64)
        self.stats = ReduceStats()

    def _call(self, req: dict) -> dict:
        return control_call(self.ctrl, req)

    # --- control connection after registration --------------------------------
    def _ctl_send(self, obj: dict) -> None:
        with self._send_lock:
            try:
                self.ctrl.sendall((json.dumps(obj) + "\n").encode())
            except OSError:
                pass

    def _read_control(self) -> None:
        try:
            for line in self.ctrl.makefile("rb"):
                msg = json.loads(line)
                if "event" in msg:
                    self._on_event(msg)
                else:
                    self._replies.put(msg)
        except (OSError, ValueError):
            pass
        self._replies.put(None)

    def _on_event(self, ev: dict) -> None:
        """Live resize, driven by incd (see incd/registry.py): report where we are
        and stop there; drain to the fence S; switch generation and window on go."""
        kind = ev.get("event")
        with self._lock:
            if kind == "remap_propose":
                self.fence = self.sent_upto
                self.remap = {"id": ev["remap"], "S": None, "passed": False}
                self._ctl_send({"op": "remap_report", "remap": ev["remap"], "next_psn": self.sent_upto})
            elif kind == "remap_fence" and self.remap and self.remap["id"] == ev["remap"]:
                self.remap["S"] = self.fence = ev["S"]
                if not self.in_reduce:
                    self._maybe_passed(self.next_psn)
            elif kind == "remap_go" and self.remap and self.remap["id"] == ev["remap"]:
                self.params.gen = ev["gen"]
                self.params.window = ev["window"]
                self.params.offset, self.params.slots = ev["offset"], ev["slots"]
                self.fence = self.remap = None
                self.resizes += 1

    def _maybe_passed(self, acked_upto: int) -> None:
        """Called with self._lock held: all psns below acked_upto have results."""
        rm = self.remap
        if rm and rm["S"] is not None and not rm["passed"] and acked_upto >= rm["S"]:
            rm["passed"] = True
            self._ctl_send({"op": "remap_passed", "remap": rm["id"]})

    def close(self) -> None:
        for s in (getattr(self, "ctrl", None), self.udp):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- data path ----------------------------------------------------------
    def _sample_rtt(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(0.2, max(MIN_RTO, self.srtt + 4 * self.rttvar))

    def reduce(self, values: np.ndarray, op: int = proto.OP_SUM) -> tuple[np.ndarray, bool]:
        """Aggregate an int32 vector with the other ranks. Returns (result, overflowed)."""
        with self._lock:
            self.in_reduce = True
        try:
            return self._reduce(values, op)
        finally:
            with self._lock:
                self.in_reduce = False
                self._maybe_passed(self.sent_upto)

    def _reduce(self, values: np.ndarray, op: int) -> tuple[np.ndarray, bool]:
        """The hot loop. Per step: one sendmmsg for everything the window allows,
        one recvmmsg for whatever results arrived, and numpy over the batch; no
        Python runs per packet."""
        p = self.params
        values = np.ascontiguousarray(values, dtype=np.int32).ravel()
        n = values.size
        E = p.elems
        psn0_abs = self.next_psn
        psn0 = psn0_abs & 0xFFFFFFFF
        hashed = p.mode == "hash"
        buf, sizes = proto.build_packets(values, E, job=p.job, gen=p.gen, rank=self.rank, psn0=psn0,
                                         op=op, hash_region=(p.offset, p.slots) if hashed else None)
        npk = len(buf)
        self.next_psn = psn0_abs + npk
        raw = buf.view(np.uint8).reshape(npk, -1)
        lsum = proto.lane_sums(buf)  # for resealing after header changes
        msgs = batchio.Messages(raw, sizes.astype(np.uint64))
        hdr_gen = buf["hdr"]["gen"]
        sent_gen = np.full(npk, -1, dtype=np.int64)  # a resize changes the generation between psns
        want_numel = (sizes - proto.HDR_LEN) // 4
        out = np.zeros((npk, E), dtype=np.int32)
        got = np.zeros(npk, dtype=bool)
        sends = np.zeros(npk, dtype=np.int32)
        sent_at = np.zeros(npk)
        fast_done = np.zeros(npk, dtype=bool)
        fd = self.udp.fileno()
        rx = self._rx
        overflow = False
        base = nxt = ngot = fr = retx = 0
        last_progress = time.monotonic()

        def resend(idx: np.ndarray, now: float) -> None:
            nonlocal retx
            buf["hdr"]["flags"][idx] |= proto.F_RETRANS
            proto.seal(buf, idx, lsum)
            sent_at[idx] = now
            sends[idx] += 1
            retx += idx.size
            batchio.send_msgs(fd, msgs.subset(idx))

        while ngot < npk:
            now = time.monotonic()
            # Under the lock: a resize proposal reports sent_upto as this rank's
            # fence, so nothing may be sent past it between reading and updating it.
            with self._lock:
                fence, W = self.fence, p.window
                limit = min(npk, base + max(1, min(int(self.cwnd), W)))
                if fence is not None:
                    limit = min(limit, max(nxt, fence - psn0_abs))
                if limit > nxt:
                    hdr_gen[nxt:limit] = sent_gen[nxt:limit] = p.gen  # the generation when first sent
                    proto.seal(buf, slice(nxt, limit), lsum)
                    sent_at[nxt:limit] = now
                    sends[nxt:limit] = 1
                    batchio.send_msgs(fd, msgs.msgs, nxt, limit - nxt)
                    nxt = limit
                    self.sent_upto = psn0_abs + nxt
            if self.remap is not None:
                with self._lock:  # S may come after the last result below it
                    self._maybe_passed(psn0_abs + base)
            k = rx.recv(self.rto)
            now = time.monotonic()
            if k:
                rows = rx.buf[:k]
                lens = rx.m.msgs["len"][:k].astype(np.int64)
                h = np.frombuffer(rows[:, :proto.HDR_LEN].tobytes(), dtype=proto.HDR_DTYPE)
                idx = (h["psn"].astype(np.int64) - psn0) & 0xFFFFFFFF
                ok = ((h["version"] == proto.VERSION) & (h["type"] == proto.T_RESULT) & (h["job"] == p.job)
                      & (lens >= proto.HDR_LEN) & (idx < npk))
                intact = proto.csum_ok(rows, lens)  # changed on the way: as if lost
                self.stats.corrupt += int((ok & ~intact).sum())
                ok &= intact
                idx = np.where(ok, idx, 0)
                numel = h["numel"].astype(np.int64)
                ok &= ((h["gen"] == sent_gen[idx]) & ~got[idx] & (numel == want_numel[idx])
                       & (lens >= proto.HDR_LEN + 4 * numel))
                sel = np.nonzero(ok)[0]
                if sel.size:
                    if sel.size == 1:
                        ids = idx[sel]
                    else:  # a duplicate in one batch counts once
                        ids, first = np.unique(idx[sel], return_index=True)
                        sel = sel[first]
                    full = want_numel[ids] == E
                    if full.any():
                        out[ids[full]] = rows[sel[full], proto.HDR_LEN:proto.HDR_LEN + 4 * E].view("<i4")
                    for j, r in zip(ids[~full], sel[~full]):  # the short last packet, at most one
                        m = int(want_numel[j])
                        out[j, :m] = rows[r, proto.HDR_LEN:proto.HDR_LEN + 4 * m].view("<i4")
                    got[ids] = True
                    ngot += ids.size
                    overflow |= bool(np.any(h["flags"][sel] & proto.F_OVERFLOW))
                    clean = ids[sends[ids] == 1]
                    if clean.size:
                        self._sample_rtt(now - float(sent_at[clean].mean()))
                    last_progress = now
                    self.cwnd = min(float(W), self.cwnd + ids.size / max(self.cwnd, 1.0))
                    if base < npk and got[base]:
                        rest = got[base:]
                        base = npk if rest.all() else base + int(rest.argmin())
                    # Three later results overtook these: a contribution (maybe
                    # another rank's) or the result was lost. Every rank resends,
                    # so the one whose packet was lost repairs it without an RTO.
                    # Not in hash or ps mode: results come in the PS's order, and
                    # a resend there evicts the psn's partial from the switch.
                    hi = int(ids.max()) - 2
                    if p.mode == "modulo" and hi > max(fr, base):
                        cand = np.arange(max(fr, base), min(hi, nxt))
                        cand = cand[~got[cand] & ~fast_done[cand]]
                        if cand.size:
                            fast_done[cand] = True
                            resend(cand, now)
                        fr = hi
            if base < nxt and now - sent_at[base] > self.rto:
                span = np.arange(base, nxt)
                late = span[~got[span] & (now - sent_at[span] > self.rto)]
                if late.size:
                    resend(late, now)
                self.rto = min(0.2, self.rto * 1.5)  # back off while nothing comes back
                self.cwnd = max(1.0, self.cwnd / 2)  # and send less: AIMD
            if now - last_progress > self.progress_timeout:
                why = (" while incd was resizing the job's memory" if self.fence is not None and base == nxt
                       else "; another rank may have stopped, or incd is gone")
                raise TransportError(
                    f"job {p.job}: no result for psn {psn0 + base} in {self.progress_timeout:.1f}s "
                    f"({ngot}/{npk} packets done){why}")
        self.stats.packets += npk
        self.stats.retransmits += retx
        self.stats.rto_s = self.rto
        return out.reshape(-1)[:n], overflow

    def done(self) -> None:
        """Tell incd this rank is finished (it frees the job once all are)."""
        self._ctl_send({"op": "done"})
        try:
            self._replies.get(timeout=5)
        except queue.Empty:
            pass
