"""A test's own control connections to incd from inside lab namespaces."""
from __future__ import annotations

import ctypes
import json
import os
import socket
import threading

from bpf import wire

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn):
    """fn() run by a thread that enters namespace netns (a namespace switch is
    per thread, so the test process itself stays put); its result or error."""
    out: dict = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def socket_in(netns: str, kind: int = socket.SOCK_STREAM, bind_port: int | None = None) -> socket.socket:
    """A socket (TCP by default) in a lab namespace, bound to bind_port if given."""
    def make():
        sock = socket.socket(socket.AF_INET, kind)
        if bind_port is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(("0.0.0.0", bind_port))
        return sock

    return in_netns(netns, make)


class Ctl:
    """One control connection from a lab host (or the switch: host "sw")."""

    def __init__(self, lab, host: str, addr: str | None = None):
        self.s = socket_in(lab.netns(host))
        self.s.settimeout(30)
        self.s.connect((addr or lab.host(host)["gateway"], wire.CTRL_PORT))
        self.f = self.s.makefile("rb")

    def send(self, req) -> None:
        self.s.sendall((req if isinstance(req, bytes) else json.dumps(req).encode()) + b"\n")

    def reply(self) -> dict | None:
        try:
            line = self.f.readline()
        except ConnectionResetError:
            return None
        return json.loads(line) if line else None

    def call(self, req) -> dict | None:
        self.send(req)
        return self.reply()

    def close(self) -> None:
        self.f.close()
        self.s.close()
