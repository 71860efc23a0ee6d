"""The parameter server of one job: finishes what the switch could not (hash
mode), or does all the aggregation (ps mode, the baseline). The merging is in
ps_merge.py; this is its I/O: recvmmsg in, sendmmsg out, and the EVICT timer.

In hash mode results go back to the switch, which frees the slot as they pass
(the ACK) and broadcasts them to the workers; in ps mode they go straight to
every worker.

The PS serves until incd says the job is over: "job_ended" when its workers
have all finished, "job_failed" when one of them died or hung, or incd stopped
(then `failure` says why). If the control connection to incd is lost, it tries
to rejoin a restarted incd for REJOIN_S, serving all the while, and stops
fail_timeout after that window and the last packet.
"""
from __future__ import annotations

import threading
import time

from bpf import wire

from . import batchio
from .incd_link import REJOIN_S, TransportError
from .member import Member
from .ps_merge import EVICT_AFTER_S, RING, Merger, PSStats
from .ps_xdp import PsFastPath, result_row_view
from .transport import data_socket, default_gateway, params_from
from .xdp_path import XdpUnavailable

__all__ = ["ParameterServer", "PSStats"]


class ParameterServer(Member):
    def __init__(self, job: int, world: int, *, mode: str = "hash", switch: str | None = None,
                 ctrl_port: int = wire.CTRL_PORT, register_timeout: float = 30.0,
                 fail_timeout: float = 2.0, datapath: str = "socket"):
        if mode not in ("hash", "ps"):
            raise TransportError("a parameter server serves hash or ps mode")
        if datapath not in ("auto", "xdp", "socket"):
            raise TransportError(f"datapath must be auto, xdp or socket, got {datapath!r}")
        super().__init__(job, fail_timeout)
        self.sock = data_socket()
        self.fast: PsFastPath | None = None
        try:
            self.datapath, self.datapath_note = self._open_fast(datapath, mode, switch)
            reply = self.register(switch, ctrl_port, register_timeout, {
                "role": "ps", "job": job, "world": world, "mode": mode,
                "port": self.sock.getsockname()[1], "timeout": register_timeout})
            self.p = params_from(reply)
        except BaseException:
            self.close()
            raise
        members = {m["rank"]: (m["addr"], m["port"]) for m in self.p.members or []}
        cache = None
        if self.fast is not None:
            cache = (result_row_view(self.fast), self.fast.tag, self.fast.length)
        self.merge = Merger(job, self.p.gen, world, mode, {r: a for r, (a, _) in members.items()},
                            cache=cache)
        if self.fast is not None:
            self.fast.start(port=self.sock.getsockname()[1], job=job, gen=self.p.gen, world=world)
        dests = [(self.p.data_addr, wire.PORT)] if mode == "hash" else list(members.values())
        self.out = batchio.Outbox(self.merge.done_rows, dests)
        self.stop = threading.Event()
        self.end_reason: str | None = None  # why serve() stopped (failure too if the job failed)

    def _open_fast(self, datapath: str, mode: str, switch: str | None) -> tuple[str, str]:
        """The XDP fast path where asked for and possible: (data path, why)."""
        if datapath == "socket":
            return "socket", "asked for"
        if mode != "hash":
            if datapath == "xdp":
                raise TransportError("--datapath xdp: the PS's fast path serves hash mode only")
            return "socket", "ps mode has no fast path"
        try:
            self.fast = PsFastPath.open(RING, switch or default_gateway() or "127.0.0.1")
        except XdpUnavailable as e:
            if datapath == "xdp":
                raise TransportError(f"--datapath xdp: {e}") from None
            return "socket", str(e)
        return "xdp", f"complete aggregates answered on {self.fast.dev}"

    def on_job_failed(self, ev: dict) -> None:
        self.failure = self.end_reason = (f"job {ev.get('job', self.p.job)} failed: "
                                          f"{ev.get('error') or 'no reason given'}")
        self.stop.set()

    def on_event(self, ev: dict) -> None:
        if ev.get("event") == "job_ended":
            self.end_reason = ev.get("reason") or "all workers left"
            self.stop.set()

    @property
    def stats(self) -> PSStats:
        st = self.merge.stats
        if self.fast is not None:
            n = self.fast.results
            st.results += n - st.xdp_results
            st.aggregates += n - st.xdp_results
            st.packets += n - st.xdp_results
            st.xdp_results = n
        return st

    def close(self) -> None:
        super().close()
        if self.fast is not None:
            self.merge = None  # its views of the cache first
            self.out = None
            self.fast.close()
            self.fast = None
        try:
            self.sock.close()
        except OSError:
            pass

    def serve(self) -> PSStats:
        # The workers need the PS until the job ends: after losing incd it waits
        # for a restarted one the whole rejoin window, packets or not.
        self.start(lambda: {"op": "rejoin", "job": self.p.job, "rank": -1, "gen": self.p.gen,
                                    "token": self.p.token})
        fd = self.sock.fileno()
        rx = batchio.Receiver(fd, 256, wire.HDR_LEN + 4 * wire.MAX_ELEMS + 64, addrs=True)
        m = self.merge
        next_check = last_rx = 0.0
        while not self.stop.is_set():
            k = rx.recv(EVICT_AFTER_S / 2)
            now = time.monotonic()
            lost = self.ctl.lost_at
            if self.ctl.refused is not None:
                self.failure = self.end_reason = f"job {self.p.job}: the restarted incd refused the PS ({self.ctl.refused})"
                break
            if lost is not None and not k and now - max(lost + REJOIN_S, last_rx) > self.fail_timeout:
                self.failure = self.end_reason = (
                    f"job {self.p.job}: lost the control connection to incd {now - lost:.1f}s ago "
                    f"(incd stopped or crashed) and no packet came for {self.fail_timeout:.1f}s")
                break
            if k:
                last_rx = now
                send = m.feed(rx.buf[:k], rx.m.msgs["len"][:k], rx.src_ip[:k], now)
                if send.size:
                    self.out.send(fd, send, m.done_len[send])
            if m.evict_at and now >= next_check:
                for pkt in m.evicts_due(now):
                    self.sock.sendto(pkt, (self.p.data_addr, wire.PORT))
                next_check = now + EVICT_AFTER_S / 2
        return self.stats
