"""incd's two front doors: the TCP control API host agents use to register jobs,
and a root-only unix socket for local administration (status, stop).

Both speak JSON lines: one request object per line, one reply object per line,
always with "ok" and, on failure, a one-line "error".
"""
from __future__ import annotations

import ipaddress
import json
import os
import socketserver
import threading

from hostagent import proto

from .registry import RegistrationError, Registry, resolve_path

MAX_LINE = 64 * 1024


def _send(wfile, obj: dict, lock: threading.Lock | None = None) -> None:
    data = (json.dumps(obj) + "\n").encode()
    if lock is None:
        wfile.write(data)
        wfile.flush()
        return
    with lock:  # replies and pushed events share the connection
        wfile.write(data)
        wfile.flush()


def _next_request(rfile, wfile) -> dict | None:
    """The next request; None at EOF or after answering a malformed one (then the
    connection ends, since the stream can no longer be trusted)."""
    try:
        return _read_request(rfile)
    except (ValueError, UnicodeDecodeError) as e:
        _send(wfile, {"ok": False, "error": f"bad request: {e}"})
        return None


def _read_request(rfile) -> dict | None:
    """None at EOF; raises ValueError for a malformed or oversized line."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise ValueError(f"request longer than {MAX_LINE} bytes")
    req = json.loads(line)
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise ValueError("a request is a JSON object with an 'op' string")
    return req


class ControlServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, registry: Registry, netinfo, port_ifindexes: set[int],
                 allow: list, register_timeout: float):
        self.registry = registry
        self.netinfo = netinfo
        self.port_ifindexes = port_ifindexes
        self.allow = allow
        self.register_timeout = register_timeout
        super().__init__(addr, ControlHandler)


class ControlHandler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        peer = self.client_address[0]
        srv = self.server
        if not any(ipaddress.ip_address(peer) in net for net in srv.allow):
            _send(self.wfile, {"ok": False, "error": f"{peer} may not use this switch "
                               "(only hosts on the switch ports' networks or the configured allow list)"})
            return
        joined = None  # (job, rank)
        lock = threading.Lock()

        def push(obj: dict) -> None:
            try:
                _send(self.wfile, obj, lock)
            except OSError:
                pass

        try:
            while True:
                req = _next_request(self.rfile, self.wfile)
                if req is None:
                    return
                op = req["op"]
                try:
                    if op == "register":
                        if joined:
                            raise RegistrationError("this connection already registered; open another")
                        try:
                            timeout = float(req.get("timeout", srv.register_timeout))
                        except (TypeError, ValueError):
                            raise RegistrationError("'timeout' must be a number of seconds")
                        path = resolve_path(srv.netinfo, peer, srv.port_ifindexes)
                        job, rank = srv.registry.register(req, peer, path, min(max(timeout, 0.1), 600.0))
                        joined = (job, rank)
                        member = job.ps if rank == -1 else job.members[rank]
                        _send(self.wfile, {
                            "ok": True, "job": job.id, "gen": job.gen, "world": job.world,
                            "window": job.window, "offset": job.offset, "slots": job.slots,
                            "elems": job.elems, "data_addr": path.switch_addr,
                            "data_port": proto.PORT, "mode": job.mode,
                            "ps": {"addr": job.ps.addr, "port": job.ps.port} if job.ps else None,
                            "members": [{"rank": m.rank, "addr": m.addr, "port": m.port}
                                        for m in sorted(job.members.values(), key=lambda m: m.rank)],
                        }, lock)
                        member.send = push
                    elif op == "done":
                        if joined:
                            srv.registry.leave(*joined)
                        _send(self.wfile, {"ok": True}, lock)
                    elif op in ("remap_report", "remap_passed"):  # no reply: the agent's reader is async
                        if joined and joined[1] >= 0 and isinstance(req.get("remap"), int):
                            if op == "remap_report" and isinstance(req.get("next_psn"), int):
                                srv.registry.remap_report(joined[0], joined[1], req["remap"], req["next_psn"])
                            elif op == "remap_passed":
                                srv.registry.remap_passed(joined[0], joined[1], req["remap"])
                    elif op == "wait_end":
                        if not joined:
                            raise RegistrationError("register first")
                        _send(self.wfile, {"ok": True, "reason": srv.registry.wait_end(joined[0])}, lock)
                    elif op == "ping":
                        _send(self.wfile, {"ok": True}, lock)
                    else:
                        _send(self.wfile, {"ok": False, "error": f"unknown op {op!r}"}, lock)
                except RegistrationError as e:
                    _send(self.wfile, {"ok": False, "error": str(e)}, lock)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if joined:
                srv.registry.leave(*joined)


class AdminServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, status_fn, stop_fn):
        self.status_fn = status_fn
        self.stop_fn = stop_fn
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o077)  # root only: the socket can stop the switch
        try:
            super().__init__(path, AdminHandler)
        finally:
            os.umask(old)


class AdminHandler(socketserver.StreamRequestHandler):
    server: AdminServer

    def handle(self) -> None:
        req = _next_request(self.rfile, self.wfile)
        if req is None:
            return
        if req["op"] == "status":
            _send(self.wfile, {"ok": True, **self.server.status_fn()})
        elif req["op"] == "stop":
            _send(self.wfile, {"ok": True})
            threading.Thread(target=self.server.stop_fn, daemon=True).start()
        else:
            _send(self.wfile, {"ok": False, "error": f"unknown op {req['op']!r}"})
