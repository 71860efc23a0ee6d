"""The parameter server of one job: finishes what the switch could not (hash
mode), or does all the aggregation (ps mode, the baseline). The merging is in
ps_merge.py; this is its I/O: recvmmsg in, sendmmsg out, and the EVICT timer.

In hash mode results go back to the switch, which frees the slot as they pass
(the ACK) and broadcasts them to the workers; in ps mode they go straight to
every worker.
"""
from __future__ import annotations

import threading
import time


from . import batchio, proto
from .ps_merge import EVICT_AFTER_S, Merger, PSStats
from .transport import TransportError, connect_incd, control_call, data_socket, params_from

__all__ = ["ParameterServer", "PSStats"]


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
        members = {m["rank"]: (m["addr"], m["port"]) for m in self.p.members or []}
        self.merge = Merger(job, self.p.gen, world, mode, {r: a for r, (a, _) in members.items()})
        dests = [(self.p.data_addr, proto.PORT)] if mode == "hash" else list(members.values())
        self.out = batchio.Outbox(self.merge.done_rows, dests)
        self.stop = threading.Event()
        self.end_reason: str | None = None

    @property
    def stats(self) -> PSStats:
        return self.merge.stats

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

    def serve(self) -> PSStats:
        threading.Thread(target=self._watch_job, daemon=True).start()
        fd = self.sock.fileno()
        rx = batchio.Receiver(fd, 256, proto.HDR_LEN + 4 * proto.MAX_ELEMS + 64, addrs=True)
        m = self.merge
        next_check = 0.0
        while not self.stop.is_set():
            k = rx.recv(EVICT_AFTER_S / 2)
            now = time.monotonic()
            if k:
                send = m.feed(rx.buf[:k], rx.m.msgs["len"][:k], rx.src_ip[:k], now)
                if send.size:
                    self.out.send(fd, send, m.done_len[send])
            if m.evict_at and now >= next_check:
                for pkt in m.evicts_due(now):
                    self.sock.sendto(pkt, (self.p.data_addr, proto.PORT))
                next_check = now + EVICT_AFTER_S / 2
        return self.stats
