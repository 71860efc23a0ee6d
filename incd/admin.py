"""incd's admin door: a root-only unix socket for local administration
(status, stop). The socket file is 0600 and owned by root, and every
connection's peer credentials (SO_PEERCRED) must say uid 0."""
from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import threading

from .json_lines import next_request, send_line
from .requests import short

log = logging.getLogger("incd")


class AdminServer(socketserver.ThreadingUnixStreamServer):
    """Root only: it can stop the switch. The socket is created 0600 (umask, so
    there is no moment it is open to others), and each peer's uid is checked."""
    daemon_threads = True

    def __init__(self, path: str, status_fn, stop_fn):
        self.status_fn = status_fn
        self.stop_fn = stop_fn
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            super().__init__(path, AdminHandler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)


def peer_uid(sock: socket.socket) -> int:
    pid, uid, gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("iII")))
    return uid


class AdminHandler(socketserver.StreamRequestHandler):
    server: AdminServer

    def handle(self) -> None:
        uid = peer_uid(self.connection)
        if uid != 0:  # file permissions already say so; this holds even for a peer with CAP_DAC_OVERRIDE
            log.warning("admin connection from uid %d refused", uid)
            send_line(self.wfile, {"ok": False, "error": f"uid {uid} may not administer incd (root only)"})
            return
        req = next_request(self.rfile, self.wfile)
        if req is None:
            return
        handler = self.OPS.get(req["op"])
        if handler is None:
            send_line(self.wfile, {"ok": False, "error": f"unknown op {short(req['op'])}"})
        else:
            handler(self)

    def op_status(self) -> None:
        send_line(self.wfile, {"ok": True, **self.server.status_fn()})

    def op_stop(self) -> None:
        send_line(self.wfile, {"ok": True})
        threading.Thread(target=self.server.stop_fn, daemon=True).start()

    OPS = {"status": op_status, "stop": op_stop}
