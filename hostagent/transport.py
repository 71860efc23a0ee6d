"""An allreduce rank's membership in one job (Session): registration through
incd, the data socket, incd's events (a failed job, the live resize of the
job's memory), and reduce(), whose windowed reliable loop is in reduction.py.
"""
from __future__ import annotations

import collections
import queue
import socket
import threading
from dataclasses import dataclass

import numpy as np

from bpf import wire

from . import batchio
from .bcast import BcastReceive, BcastRootIO, BcastRootXdpIO
from .incd_link import TransportError, default_gateway
from .member import Member
from .reduce_io import JumboIO, XdpIO
from .reduction import WindowedReduce
from .xdp_path import MAX_PKTS, XdpPath, XdpUnavailable

# Below this, 4 agents sharing 2 cores time out on each other just by being
# descheduled; losses are mostly repaired earlier by the fast retransmit.
MIN_RTO = 0.02


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
    token: str = ""  # this member's, for a rejoin after an incd restart
    frame: str = "std"  # "jumbo": large vectors go in jumbo frames (JumboIO)
    tiers: int = 1  # 2: the job spans racks (leaves and a spine); switch broadcasts stay within one switch


MODES = ("modulo", "hash", "ps")
DATAPATHS = ("auto", "xdp", "socket")
FRAMES = ("std", "jumbo")
JUMBO_PKTS = 512  # jumbo results the XDP path holds at once (32 MiB; longer reduces go in pieces)


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


def params_from(reply: dict) -> JobParams:
    return JobParams(reply["job"], reply["gen"], reply["world"], reply.get("window") or 0,
                     reply["elems"], reply["data_addr"], reply["data_port"], reply["mode"],
                     reply["offset"], reply["slots"], reply.get("ps"), reply.get("members"),
                     str(reply.get("token") or ""), reply.get("frame") or "std", int(reply.get("tiers") or 1))


@dataclass
class ReduceStats:
    packets: int = 0
    retransmits: int = 0
    corrupt: int = 0
    rto_s: float = 0.0


class Session(Member):
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
                 fail_timeout: float = 2.0, datapath: str = "socket", first_psn: int = 0,
                 frame: str = "std"):
        if mode not in MODES:
            raise TransportError(f"mode must be one of {MODES}")
        if datapath not in DATAPATHS:
            raise TransportError(f"datapath must be one of {DATAPATHS}")
        if frame not in FRAMES:
            raise TransportError(f"frame must be one of {FRAMES}")
        if frame == "jumbo" and (mode != "modulo" or datapath == "socket"):
            raise TransportError("--frame jumbo needs modulo mode and the XDP data path (--datapath xdp or auto): "
                                 "its results travel from rank to rank through the hosts' XDP programs")
        super().__init__(job, fail_timeout)
        self.rank = rank
        self.progress_timeout = progress_timeout
        self._done = False
        self.udp = data_socket()
        self.xdp = None
        try:
            # Chosen before registering: loading the programs takes a second or
            # two, which the other ranks would otherwise wait for at the first psn.
            self.datapath, self.datapath_note = self._choose_datapath(datapath, mode, switch, frame)
            reply = self.register(switch, ctrl_port, register_timeout, {
                "job": job, "rank": rank, "world": world, "window": window,
                "port": self.udp.getsockname()[1], "mode": mode, "timeout": register_timeout,
                "shape": shape, "datapath": self.datapath, **(demand or {}),
                **({"frame": frame} if frame != "std" else {}),
            })
            self.params = params_from(reply)
            if self.params.elems <= 0:
                raise TransportError("switch ports' MTU too small for an INC packet")
            self.check_mtu(self.params.ps["addr"] if mode == "ps" else self.params.data_addr,
                           wire.JUMBO_IP_BYTES if frame == "jumbo" else
                           wire.IP_UDP_OVERHEAD + wire.HDR_LEN + 4 * self.params.elems)
            if mode == "ps":  # the baseline: straight to the parameter server
                self.udp.connect((self.params.ps["addr"], self.params.ps["port"]))
            else:
                self.udp.connect((self.params.data_addr, self.params.data_port))
        except BaseException:
            self.close()
            raise
        self.next_psn = first_psn  # absolute; the wire carries it mod 2^32
        self.sent_upto = 0         # absolute psn of the next packet not yet sent
        self.in_reduce = False
        self.fence: int | None = None  # live resize: send no psn >= this
        self.resize: dict | None = None  # the live resize under way: incd's id, its fence S, passed
        self.resizes = 0
        self._lock = threading.Lock()
        self.start(lambda: {"op": "rejoin", "job": job, "rank": rank, "gen": self.params.gen,
                                    "token": self.params.token})
        self.srtt = None
        self.rttvar = 0.0
        self.rto = 0.02
        self.cwnd = float(self.params.window)  # AIMD congestion window, at most the job's window
        self.gso = batchio.gso_supported(self.udp)
        self._packet_bufs: dict = {}
        self._rx = batchio.Receiver(self.udp.fileno(), 256, wire.HDR_LEN + 4 * wire.MAX_ELEMS + 64)
        # A broadcast's data that came before this rank opened the broadcast
        # (bcast.py takes it from here); at most a window's worth can be early.
        self.early: collections.deque = collections.deque(maxlen=4 * wire.MAX_WORKERS * 64)
        if self.xdp is not None:
            self.xdp.early = self.early
        self.stats = ReduceStats()

    # --- control connection after registration --------------------------------
    def on_event(self, ev: dict) -> None:
        """The live resize driven by incd (see incd/resize.py; its events and
        requests say "remap"): report where we are and stop there; drain to the
        fence S; switch generation and window on go."""
        kind = ev.get("event")
        with self._lock:
            if kind == "remap_propose":
                self.fence = self.sent_upto
                self.resize = {"id": ev["remap"], "S": None, "passed": False}
                self.ctl.send({"op": "remap_report", "remap": ev["remap"], "next_psn": self.sent_upto})
            elif kind == "remap_fence" and self.resize and self.resize["id"] == ev["remap"]:
                self.resize["S"] = self.fence = ev["S"]
                if not self.in_reduce:
                    self._maybe_passed(self.next_psn)
            elif kind == "remap_go" and self.resize and self.resize["id"] == ev["remap"]:
                self.params.gen = ev["gen"]
                self.params.window = ev["window"]
                self.params.offset, self.params.slots = ev["offset"], ev["slots"]
                self.fence = self.resize = None
                self.resizes += 1

    def _maybe_passed(self, acked_upto: int) -> None:
        """Called with self._lock held: all psns below acked_upto have results."""
        rs = self.resize
        if rs and rs["S"] is not None and not rs["passed"] and acked_upto >= rs["S"]:
            rs["passed"] = True
            self.ctl.send({"op": "remap_passed", "remap": rs["id"]})

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

    def missing_ranks(self, psn: int) -> list[int] | None:
        """The ranks the switch still waits for at psn (incd reads the slot), or
        None when it cannot tell (slot moved on, no answer, incd gone)."""
        if self.ctrl_lost:
            return None
        self.ctl.send({"op": "missing", "psn": psn & 0xFFFFFFFF})
        try:
            reply = self.ctl.replies.get(timeout=2)
        except queue.Empty:
            return None
        return reply.get("missing") if reply and reply.get("ok") else None

    def close(self) -> None:
        if self.xdp is not None:
            self.xdp.close()
            self.xdp = None
        super().close()
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

    def packet_buffer(self, npk: int) -> tuple[np.ndarray, np.ndarray]:
        """A packet buffer of npk rows for this job's packet size, and its bytes
        as rows: kept for the next reduce of the same length, since a fresh
        buffer of a large vector costs more in page faults than filling it."""
        key = (npk, self.params.elems)
        if key not in self._packet_bufs:
            if len(self._packet_bufs) >= 4:
                self._packet_bufs.pop(next(iter(self._packet_bufs)))
            buf = np.empty(npk, dtype=wire.packet_dtype(self.params.elems))
            self._packet_bufs[key] = (buf, buf.view(np.uint8).reshape(npk, -1))
        return self._packet_bufs[key]

    def _choose_datapath(self, want: str, mode: str, switch: str | None, frame: str = "std") -> tuple[str, str]:
        """("xdp" or "socket", why). auto: XDP where it can be loaded (jumbo
        frames: XDP or an error)."""
        if want == "socket":
            return "socket", "asked for"
        if mode == "ps":
            if want == "xdp":
                raise TransportError("--datapath xdp: ps mode sends to the parameter server, by sockets only")
            return "socket", "ps mode"
        try:
            self.xdp = XdpPath.open(self.udp, switch or default_gateway() or "127.0.0.1",
                                    jumbo_pkts=JUMBO_PKTS if frame == "jumbo" else 0)
        except XdpUnavailable as e:
            if want == "xdp" or frame == "jumbo":
                raise TransportError(f"--{'frame jumbo' if frame == 'jumbo' else 'datapath xdp'}: {e}") from None
            return "socket", str(e)
        return "xdp", f"host_rx on {self.xdp.dev}"

    def reduce(self, values: np.ndarray, op: int = wire.OP_SUM,
               select: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """Aggregate an int32 vector with the other ranks. Returns (result,
        overflowed); with select, only the packets this rank is in are valid."""
        values = np.ascontiguousarray(values, dtype=np.int32).ravel()
        pieces, overflow = self.reduce_rows(values, op, select)
        if self.xdp is None:  # the socket path's rows are this reduce's own
            return pieces[0].reshape(-1)[:values.size], overflow
        out = np.empty(values.size, dtype=np.int32)
        at = 0
        for rows in pieces:  # padded rows of the path's array: one copy into place
            width = rows.shape[1]
            k = min(rows.size, values.size - at)
            full, rest = divmod(k, width)
            out[at:at + full * width].reshape(full, width)[:] = rows[:full]
            if rest:
                out[at + full * width:at + k] = rows[full, :rest]
            at += k
        return out, overflow

    def select_masks(self, npk: int, owners) -> np.ndarray | None:
        """Per packet, the bitmap of the ranks that want its result's lanes
        (owners(first, stop): those of the elements first..stop-1), for the
        switch to give the others a completion without them; None where the
        switch cannot (ps mode: the PS sends the results to the workers). In
        hash mode the switch keeps the mask in the psn's slot and applies it to
        the PS's result on its way out; a psn the PS finished on its own (a
        collision) comes back whole to everyone."""
        if self.params.mode not in ("modulo", "hash"):
            return None
        E = self.params.elems
        return np.array([owners(i * E, (i + 1) * E) for i in range(npk)], dtype=np.uint64)

    def reduce_rows(self, values: np.ndarray, op: int = wire.OP_SUM,
                    select: np.ndarray | None = None) -> tuple[list[np.ndarray], bool]:
        """reduce() as it lands: pieces of (packets, elems) rows, one packet's
        lanes a row, the last row padded. They may be views of the data path's
        buffers, valid until the next reduce: a caller that converts them
        (dequantize) saves a copy of the whole vector. select: see
        select_masks(); rows of packets this rank is not in are not written."""
        values = np.ascontiguousarray(values, dtype=np.int32).ravel()
        with self._lock:
            self.in_reduce = True
        try:
            if self.xdp is None:
                rows, overflow = WindowedReduce(self, values, op, select=select).run_rows()
                return [rows], overflow
            # The XDP path holds a bounded number of packets: a longer vector
            # goes in pieces, one after the other (each piece copied out but
            # the last, whose buffer the next piece would overwrite).
            io, E, room = XdpIO, self.params.elems, self.xdp.max_pkts
            if self.jumbo_for(values.size, op, select):
                io, E, room = JumboIO, wire.JUMBO_ELEMS, self.xdp.jumbo_pkts
            step = room * E
            starts = range(0, max(1, values.size), step)
            pieces, overflow = [], False
            for at in starts:
                first = at // E
                part = None if select is None else select[first:first + room]
                rows, o = WindowedReduce(self, values[at:at + step], op, io=io, select=part).run_rows()
                pieces.append(rows if at == starts[-1] else rows.copy())
                overflow |= o
            return pieces, overflow
        finally:
            with self._lock:
                self.in_reduce = False
                self._maybe_passed(self.sent_upto)

    def jumbo_for(self, n: int, op: int, select) -> bool:
        """Whether a reduce of n values goes in jumbo frames: a jumbo job, a
        sum for every rank, at least one full frame. Every rank decides the
        same from the same call."""
        return (self.params.frame == "jumbo" and self.xdp is not None and self.xdp.jumbo_pkts > 0
                and op == wire.OP_SUM and select is None and n >= wire.JUMBO_ELEMS)

    def broadcast(self, values: np.ndarray | None, numel: int, root: int) -> np.ndarray:
        """root's int32 vector of numel values on every rank, sent once by the
        root and replicated by the switch (modulo mode; hostagent/bcast.py).
        The root passes values, the others None. Every rank goes in pieces of
        the same size (what the XDP receive path holds), whatever its path."""
        if not self.bcast_capable():
            raise TransportError("a switch broadcast needs a modulo job of two ranks or more")
        mine = self.rank == root
        if numel == 0:
            return np.zeros(0, dtype=np.int32)
        if mine:
            values = np.ascontiguousarray(values, dtype=np.int32).ravel()
            if values.size != numel:
                raise TransportError(f"broadcast: the root has {values.size} values, not {numel}")
        out = values if mine else np.empty(numel, dtype=np.int32)
        step = MAX_PKTS * self.params.elems
        with self._lock:
            self.in_reduce = True
        try:
            for at in range(0, numel, step):
                k = min(step, numel - at)
                if mine:
                    io = BcastRootIO if self.xdp is None else BcastRootXdpIO
                    WindowedReduce(self, values[at:at + k], wire.OP_SUM, io=io).run_rows()
                else:
                    rows = BcastReceive(self, k, root).run()
                    width = rows.shape[1]
                    full, rest = divmod(k, width)
                    out[at:at + full * width].reshape(full, width)[:] = rows[:full]
                    if rest:
                        out[at + full * width:at + k] = rows[full, :rest]
            return out
        finally:
            with self._lock:
                self.in_reduce = False
                self._maybe_passed(self.sent_upto)

    def bcast_capable(self) -> bool:
        """Whether broadcast() can run: a modulo job of more than one rank, on one switch."""
        return self.params.mode == "modulo" and self.params.world > 1 and self.params.tiers == 1

    def done(self) -> None:
        """Tell incd this rank is finished (it frees the job once all are). A
        rank that leaves without this is taken for crashed: its job fails."""
        self._done = True
        self.leave()
