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

from bpf import control, wire

from . import batchio


# Below this, 4 agents sharing 2 cores time out on each other just by being
# descheduled; losses are mostly repaired earlier by the fast retransmit.
MIN_RTO = 0.02
# Halving stops here: below it, three later results rarely come to trigger a
# fast retransmit, and every loss waits for the timeout (5 % loss, hash mode,
# 1 MiB: floor 1 2.3 s, 8 0.59 s, 16 0.43 s).
CWND_FLOOR = 16.0


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
        if not wire.PORT_MIN <= s.getsockname()[1] <= wire.PORT_MAX:
            return s
        s.close()
    raise TransportError("no UDP port outside the INC range")


# A member sends a heartbeat this often (as a fraction of its --fail-timeout);
# incd declares it hung when none came for the whole fail timeout.
HEARTBEATS_PER_TIMEOUT = 4
# How long a member whose control connection broke keeps trying to rejoin a
# restarted incd (which waits 10 s by default for it; starting takes seconds).
REJOIN_S = 30.0


class Refused(TransportError):
    """incd answered a request with an error."""


class Control:
    """incd's control connection: JSON lines both ways. Replies answer requests in
    order; events (objects with an "event" key) may come at any time, also in the
    same read as a reply, so bytes after a line are kept for the next one.

    After registration, start() runs a reader (events to a callback, replies to a
    queue; the connection's loss is noted in lost_at) and a heartbeat that tells
    incd this member is alive and how long a silence means it is not."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.early_events: list[dict] = []  # events read while waiting for a reply
        self.replies: queue.Queue = queue.Queue()
        self.lost_at: float | None = None   # monotonic time the connection was lost
        self.refused: str | None = None     # a restarted incd would not take us back: why
        self.rejoins = 0
        self._rejoin: dict | None = None
        self._send_lock = threading.Lock()
        self._closing = threading.Event()

    def rejoin_on_loss(self, req, within_s: float) -> None:
        """If the connection is lost, reconnect and send req() (a "rejoin") for up
        to within_s: a restarted incd takes back the jobs its predecessor ran."""
        self._rejoin = {"addr": self.sock.getpeername()[:2], "req": req, "within_s": within_s}

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TransportError("incd closed the control connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def call(self, req: dict) -> dict:
        """A request and its reply, before start() (the registration)."""
        try:
            self.sock.sendall((json.dumps(req) + "\n").encode())
            while True:
                msg = json.loads(self._line())
                if "event" not in msg:
                    break
                self.early_events.append(msg)
        except socket.timeout as e:
            raise TransportError(f"incd did not answer {req['op']!r} in time") from e
        except (OSError, ValueError) as e:
            raise TransportError(f"control connection to incd failed during {req['op']!r}: {e}") from e
        if not msg.get("ok"):
            raise Refused(f"incd refused {req['op']}: {msg.get('error')}")
        return msg

    def send(self, obj: dict) -> None:
        with self._send_lock:
            try:
                self.sock.sendall((json.dumps(obj) + "\n").encode())
            except OSError:
                pass

    def start(self, on_event, fail_timeout: float) -> None:
        self.sock.settimeout(None)
        self._fail_timeout = fail_timeout
        threading.Thread(target=self._read, args=(on_event,), daemon=True).start()
        threading.Thread(target=self._heartbeat, args=(fail_timeout,), daemon=True).start()

    def _read(self, on_event) -> None:
        while True:
            try:
                for ev in self.early_events:
                    on_event(ev)
                self.early_events = []
                while True:
                    msg = json.loads(self._line())
                    if "event" in msg:
                        on_event(msg)
                    else:
                        self.replies.put(msg)
            except Exception:  # closed, reset, or garbage: the connection is of no more use
                pass
            if self._closing.is_set():
                break
            self.lost_at = time.monotonic()
            if not self._reconnect():
                break
            self.lost_at = None
            threading.Thread(target=self._heartbeat, args=(self._fail_timeout,), daemon=True).start()
        self.replies.put(None)

    def _reconnect(self) -> bool:
        """Tries to rejoin a restarted incd until the deadline; True when back in."""
        rj = self._rejoin
        if rj is None:
            return False
        deadline = self.lost_at + rj["within_s"]
        while not self._closing.is_set() and time.monotonic() < deadline:
            try:
                sock = socket.create_connection(rj["addr"], timeout=2)
            except OSError:
                self._closing.wait(0.2)  # incd not (yet) listening
                continue
            old, self.sock, self.buf = self.sock, sock, b""
            try:
                old.close()
            except OSError:
                pass
            try:
                self.call(rj["req"]())
            except Refused as e:
                self.refused = str(e)
                return False
            except TransportError:
                self._closing.wait(0.2)
                continue
            self.sock.settimeout(None)
            self.rejoins += 1
            return True
        return False

    def _heartbeat(self, fail_timeout: float) -> None:
        beat = {"op": "alive", "fail_timeout": fail_timeout}
        period = fail_timeout / HEARTBEATS_PER_TIMEOUT
        sock = self.sock  # one heartbeat per connection: this one ends with it
        while self.lost_at is None and self.sock is sock:
            self.send(beat)
            if self._closing.wait(period):
                return

    def close(self) -> None:
        self._closing.set()
        try:
            self.sock.close()
        except OSError:
            pass


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
    """One rank's membership in one job: control connection plus data socket.

    Failures reach the reduce loop within about fail_timeout: incd tells the job's
    members when one of them is gone (killed: its control connection closed;
    hung: its heartbeats stopped) or when incd stops, and the loop raises with
    that reason. If the control connection itself is lost, the rank carries on
    while results keep coming (the switch works without incd) and fails after
    fail_timeout without one, since nobody can tell it about failures any more."""

    def __init__(self, job: int, rank: int, world: int, *, window: int = 64,
                 switch: str | None = None, ctrl_port: int = wire.CTRL_PORT,
                 register_timeout: float = 30.0, progress_timeout: float = 10.0,
                 shape: str | None = None, mode: str = "modulo", demand: dict | None = None,
                 fail_timeout: float = 2.0):
        if mode not in MODES:
            raise TransportError(f"mode must be one of {MODES}")
        try:
            control.check_fail_timeout(fail_timeout, 'fail_timeout')
        except control.LimitError as e:
            raise TransportError(str(e)) from None
        self.rank = rank
        self.progress_timeout = progress_timeout
        self.fail_timeout = fail_timeout
        self.failure: str | None = None  # why the job failed, as incd said
        self.ctl = None
        self._done = False
        self.udp = data_socket()
        try:
            sock = connect_incd(switch, ctrl_port)
            self.ctl = Control(sock)
            sock.settimeout(register_timeout + 10)
            reply = self.ctl.call({
                "op": "register", "version": control.CONTROL_VERSION, "job": job, "rank": rank, "world": world, "window": window,
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
        self.ctl.rejoin_on_loss(lambda: {"op": "rejoin", "job": job, "rank": rank, "gen": self.params.gen},
                                REJOIN_S)
        self.ctl.start(self._on_event, fail_timeout)
        self.srtt = None
        self.rttvar = 0.0
        self.rto = 0.02
        self.cwnd = float(self.params.window)  # AIMD congestion window, at most the job's window
        self._rx = batchio.Receiver(self.udp.fileno(), 256, wire.HDR_LEN + 4 * wire.MAX_ELEMS + 64)
        self.stats = ReduceStats()

    @property
    def ctrl_lost(self) -> bool:
        return self.ctl is not None and self.ctl.lost_at is not None

    # --- control connection after registration --------------------------------
    def _ctl_send(self, obj: dict) -> None:
        self.ctl.send(obj)

    def _on_event(self, ev: dict) -> None:
        """Job failures, and the live resize driven by incd (see incd/registry.py):
        report where we are and stop there; drain to the fence S; switch
        generation and window on go."""
        kind = ev.get("event")
        if kind == "job_failed":
            if self.failure is None:
                self.failure = f"job {ev.get('job', self.params.job)} failed: {ev.get('error') or 'no reason given'}"
            return
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

    def _check_failed(self, now: float, last_progress: float, what: str) -> None:
        """Raises if incd said the job failed, or if incd is gone and results stopped."""
        if self.failure is not None:
            raise TransportError(self.failure)
        if self.ctl.refused is not None:
            raise TransportError(f"job {self.params.job}: lost the control connection to incd, and the "
                                 f"restarted incd would not take this rank back ({self.ctl.refused})")
        lost = self.ctl.lost_at
        if lost is not None and now - max(lost, last_progress) > self.fail_timeout:
            raise TransportError(
                f"job {self.params.job}: lost the control connection to incd {now - lost:.1f}s ago "
                f"(incd stopped or crashed) and no result came for {now - last_progress:.1f}s ({what})")

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
        try:
            self.udp.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None and not self._done:
                self.done()  # finished normally: the other members must not take it for a crash
        finally:
            self.close()

    # --- data path ----------------------------------------------------------
    def _sample_rtt(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            # A result can be late because another rank's packet was lost and
            # repaired: that is not this path's RTT. Clamped, such samples lift
            # srtt to at most twice the real RTT instead of towards the RTO.
            rtt = min(rtt, 2 * self.srtt)
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(0.2, max(MIN_RTO, self.srtt + 4 * self.rttvar))

    def reduce(self, values: np.ndarray, op: int = wire.OP_SUM) -> tuple[np.ndarray, bool]:
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
        buf, sizes = wire.build_packets(values, E, job=p.job, gen=p.gen, rank=self.rank, psn0=psn0,
                                         op=op, hash_region=(p.offset, p.slots) if hashed else None)
        npk = len(buf)
        self.next_psn = psn0_abs + npk
        raw = buf.view(np.uint8).reshape(npk, -1)
        lsum = wire.lane_sums(buf)  # for resealing after header changes
        msgs = batchio.Messages(raw, sizes.astype(np.uint64))
        hdr_gen = buf["hdr"]["gen"]
        sent_gen = np.full(npk, -1, dtype=np.int64)  # a resize changes the generation between psns
        want_numel = (sizes - wire.HDR_LEN) // 4
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
        rto_fired = 0.0  # when the retransmission timeout last fired

        def resend(idx: np.ndarray, now: float) -> None:
            nonlocal retx
            buf["hdr"]["flags"][idx] |= wire.F_RETRANS
            wire.seal(buf, idx, lsum)
            sent_at[idx] = now
            sends[idx] += 1
            retx += idx.size
            batchio.send_msgs(fd, msgs.subset(idx))

        while ngot < npk:
            now = time.monotonic()
            if self.failure is not None or self.ctl.lost_at is not None:
                self._check_failed(now, last_progress, f"psn {psn0 + base}, {ngot}/{npk} packets done")
            # Under the lock: a resize proposal reports sent_upto as this rank's
            # fence, so nothing may be sent past it between reading and updating it.
            with self._lock:
                fence, W = self.fence, p.window
                limit = min(npk, base + max(1, min(int(self.cwnd), W)))
                if fence is not None:
                    limit = min(limit, max(nxt, fence - psn0_abs))
                if limit > nxt:
                    hdr_gen[nxt:limit] = sent_gen[nxt:limit] = p.gen  # the generation when first sent
                    wire.seal(buf, slice(nxt, limit), lsum)
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
                h = np.frombuffer(rows[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
                idx = (h["psn"].astype(np.int64) - psn0) & 0xFFFFFFFF
                ok = ((h["version"] == wire.VERSION) & (h["type"] == wire.T_RESULT) & (h["job"] == p.job)
                      & (lens >= wire.HDR_LEN) & (idx < npk))
                intact = wire.csum_ok(rows, lens)  # changed on the way: as if lost
                self.stats.corrupt += int((ok & ~intact).sum())
                ok &= intact
                idx = np.where(ok, idx, 0)
                numel = h["numel"].astype(np.int64)
                ok &= ((h["gen"] == sent_gen[idx]) & ~got[idx] & (numel == want_numel[idx])
                       & (lens >= wire.HDR_LEN + 4 * numel))
                sel = np.nonzero(ok)[0]
                if sel.size:
                    if sel.size == 1:
                        ids = idx[sel]
                    else:  # a duplicate in one batch counts once
                        ids, first = np.unique(idx[sel], return_index=True)
                        sel = sel[first]
                    full = want_numel[ids] == E
                    if full.any():
                        out[ids[full]] = rows[sel[full], wire.HDR_LEN:wire.HDR_LEN + 4 * E].view("<i4")
                    for j, r in zip(ids[~full], sel[~full]):  # the short last packet, at most one
                        m = int(want_numel[j])
                        out[j, :m] = rows[r, wire.HDR_LEN:wire.HDR_LEN + 4 * m].view("<i4")
                    got[ids] = True
                    ngot += ids.size
                    overflow |= bool(np.any(h["flags"][sel] & wire.F_OVERFLOW))
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
                    # Also in hash mode, where a resend evicts the psn's partial
                    # to the PS, which completes it (1% loss: 13x faster than
                    # waiting for the RTO). Not in ps mode: the PS has it all.
                    hi = int(ids.max()) - 2
                    if p.mode != "ps" and hi > max(fr, base):
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
                if last_progress <= rto_fired:
                    self.rto = min(0.2, self.rto * 1.5)  # back off while nothing comes back
                rto_fired = now
                self.cwnd = max(min(CWND_FLOOR, W), self.cwnd / 2)  # and send less: AIMD
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
        """Tell incd this rank is finished (it frees the job once all are). A
        rank that leaves without this is taken for crashed: its job fails."""
        self._done = True
        if self.ctrl_lost:
            return
        self._ctl_send({"op": "done"})
        try:
            self.ctl.replies.get(timeout=5)
        except queue.Empty:
            pass
