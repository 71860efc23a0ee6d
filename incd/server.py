"""incd's control API: the TCP door host agents use to register jobs and
follow them (JSON lines, json_lines.py; the admin door is admin.py).

Who may talk to incd (see docs/operations.md, "Who may talk to incd"): a
connection is accepted only from an address in the allow list (default: the
switch ports' own networks); a registration must also come from a host that
incd reaches through one of its switch ports (route + neighbour lookup on the
connection's source address, never an address in the request); with a key,
only after answering incd's challenge.

A bad request (not UTF-8, not JSON, NaN/Infinity, too deeply nested, not an
object, unknown op, missing or wrong fields, a conflict) is answered with
{"ok": false, "error": "..."} and changes nothing; the connection stays usable,
except after a line longer than MAX_LINE (the stream is out of step then), which
is answered and the connection closed.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import select
import socket
import socketserver
import threading

from bpf import control, wire

from .json_lines import MAX_LINE, BadRequest, Outbox, read_request, send_line
from .registry import Registry
from .requests import RegistrationError, check_version, resolve_path, short

__all__ = ["MAX_LINE", "ControlServer", "ControlHandler", "joined_reply"]
UNAUTHENTICATED_OPS = ("ping", "challenge", "auth")
# Connections: a peer has this long to send each request until it registers
# (a member's heartbeats keep it busy after); at most this many at once, from
# one address and in all, so the daemon keeps descriptors for its own work.
IDLE_BEFORE_JOIN_S = 60.0
MAX_CONNECTIONS = 512
MAX_PER_ADDRESS = 128
log = logging.getLogger("incd")


def register_timeout(req: dict, default: float) -> float:
    """The request's "timeout" (seconds to wait for the rest of the job), clamped to [0.1, 600]."""
    v = req.get("timeout", default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10**6:
        raise RegistrationError(f"'timeout' must be a number of seconds in [0, 1000000], got {short(v)}")
    return min(max(float(v), 0.1), control.MAX_REGISTER_TIMEOUT)


def joined_reply(job, rank: int) -> dict:
    """What a member needs to take part: the job's switch programming and peers."""
    member = job.ps if rank == -1 else job.members[rank]
    kv = {}
    if job.mode == "kv":  # the job's columns of the switch's key-value array, and the packet size
        kv = {"cols": job.cols, "parts": job.parts, "epoch": job.kv_epoch, "tuples": job.tuples,
              "kv_window": wire.KV_WINDOW}
    return {
        "ok": True, "job": job.id, "gen": job.gen, "world": job.world,
        "window": job.window, "offset": job.offset, "slots": job.slots,
        "elems": job.elems, "frame": job.frame, "tiers": job.tiers, "data_addr": member.path.switch_addr,
        "data_port": wire.PORT, "mode": job.mode,
        "ps": {"addr": job.ps.addr, "port": job.ps.port} if job.ps else None,
        "members": [{"rank": m.rank, "addr": m.addr, "port": m.port}
                    for m in sorted(job.members.values(), key=lambda m: m.rank)],
        "token": member.token,
        **kv,
    }


class ControlServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, registry: Registry, netinfo, port_ifindexes: set[int],
                 allow: list, register_timeout: float, key: bytes | None = None, switch: str = ""):
        self.switch = switch  # a fabric's leaf this door is on (incd/fabric.py); "" for the only switch
        self.key = key  # None: network position alone decides who may talk (see the module doc)
        self.registry = registry
        self.netinfo = netinfo
        self.port_ifindexes = port_ifindexes
        self.allow = allow
        self.register_timeout = register_timeout
        self.conn_lock = threading.Lock()
        self.open_conns: dict[str, int] = {}  # peer address -> open connections
        super().__init__(addr, ControlHandler)

    def admit(self, peer: str) -> str | None:
        """Counts a new connection in, or says why it may not have one."""
        with self.conn_lock:
            if sum(self.open_conns.values()) >= MAX_CONNECTIONS:
                return f"incd has {MAX_CONNECTIONS} control connections open; try again later"
            if self.open_conns.get(peer, 0) >= MAX_PER_ADDRESS:
                return f"{peer} has {MAX_PER_ADDRESS} control connections open; close some first"
            self.open_conns[peer] = self.open_conns.get(peer, 0) + 1
            return None

    def release(self, peer: str) -> None:
        with self.conn_lock:
            n = self.open_conns.get(peer, 0) - 1
            if n > 0:
                self.open_conns[peer] = n
            else:
                self.open_conns.pop(peer, None)


class ControlHandler(socketserver.StreamRequestHandler):
    """One control connection: at most one membership (register or rejoin),
    then requests about it. Each op has a handler in OPS; a handler returns the
    reply, or None for ops answered with nothing (their sender reads events
    asynchronously), and raises RegistrationError to refuse."""
    server: ControlServer

    def handle(self) -> None:
        peer = self.client_address[0]
        srv = self.server
        if not any(ipaddress.ip_address(peer) in net for net in srv.allow):
            log.warning("control connection from %s refused: not in the allow list", peer)
            send_line(self.wfile, {"ok": False, "error": f"{peer} may not use this switch "
                               "(only hosts on the switch ports' networks or the configured allow list)"})
            return
        refused = srv.admit(peer)
        if refused:
            log.warning("control connection from %s refused: %s", peer, refused)
            send_line(self.wfile, {"ok": False, "error": refused})
            return
        try:
            self._serve(peer)
        finally:
            srv.release(peer)

    def _serve(self, peer: str) -> None:
        srv = self.server
        self.peer = peer
        self.joined = None  # (job, rank)
        self.cut_off: str | None = None  # why this connection was dropped by incd
        self.out = Outbox(self.connection, self._overflow)
        self.connection.settimeout(IDLE_BEFORE_JOIN_S)
        self.nonce: str | None = None
        self.authed = srv.key is None
        try:
            while True:
                req = self._next()
                if req is None:
                    return
                op = req["op"]
                try:
                    if not self.authed and op not in UNAUTHENTICATED_OPS:
                        raise RegistrationError("incd requires a key: start the agent with --key-file "
                                                "(or INC_KEY_FILE) naming the key incd was started with")
                    handler = self.OPS.get(op)
                    reply = (handler(self, req) if handler is not None
                             else {"ok": False, "error": f"unknown op {short(op)}"})
                    if reply is not None:
                        self.out.put(reply)
                except RegistrationError as e:
                    self.out.put({"ok": False, "error": str(e)})
                except Exception as e:  # a bug: say so, keep the daemon and this connection up
                    log.exception("control request %s from %s", short(op), peer)
                    self.out.put({"ok": False, "error": f"internal error: {type(e).__name__}"})
        except OSError:
            pass
        finally:
            if self.joined:
                srv.registry.leave(*self.joined, reason=self.cut_off)
            self.out.close()

    def _next(self) -> dict | None:
        """The next request; a malformed one is answered and skipped. None at EOF
        or after an oversized line (the stream is out of step then)."""
        while True:
            try:
                return read_request(self.rfile)
            except BadRequest as e:
                self.out.put({"ok": False, "error": f"bad request: {e}"})
                if e.fatal:
                    return None

    def _closed(self) -> bool:
        """Whether the peer closed the connection (it sent nothing else while it
        waits for its registration's answer, so any byte waiting is not EOF)."""
        try:  # poll first: a socket with a timeout would wait for data in recv
            p = select.poll()
            p.register(self.connection, select.POLLIN)
            if not p.poll(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def _overflow(self, nbytes: int, nmsgs: int) -> None:
        """The member stopped reading: cut it off (the read loop ends, and so
        does its membership, failing its job with this reason)."""
        if self.cut_off is None:
            self.cut_off = (f"stopped reading its control connection ({nmsgs} replies and events, "
                            f"{nbytes // 1024} KiB unread); incd disconnected it")
            log.warning("control connection from %s: %s", self.peer, self.cut_off)
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def push(self, obj: dict) -> None:
        """An event to this connection's member (from the registry's threads,
        under its lock: never blocks)."""
        self.out.put(obj)

    # --- membership -------------------------------------------------------------
    def _join(self, req: dict, joining) -> dict:
        check_version(req)
        if self.joined:
            raise RegistrationError("this connection already registered; open another")
        job, rank = joining()
        self.joined = (job, rank)
        self.connection.settimeout(None)  # a member: its heartbeats and the watchdog take over
        # Events from now on: one that overtakes the reply is kept
        # by the agent (transport.Control) and handled after it.
        job.member(rank).send = self.push
        return joined_reply(job, rank)

    def op_register(self, req: dict) -> dict:
        srv = self.server

        def joining():
            timeout = register_timeout(req, srv.register_timeout)
            path = resolve_path(srv.netinfo, self.peer, srv.port_ifindexes)
            path.switch = srv.switch
            return srv.registry.register(req, self.peer, path, timeout, gone=self._closed)
        return self._join(req, joining)

    def op_rejoin(self, req: dict) -> dict:
        """A member of a job a restarted incd recovered."""
        return self._join(req, lambda: self.server.registry.rejoin(req, self.peer))

    def _own_job(self, req: dict, op: str):
        """(job, rank) of this connection; requests are only about its own
        membership: there is no way to end or watch somebody else's job."""
        if not self.joined:
            raise RegistrationError(f"{op!r} before 'register': this connection is in no job")
        if "job" in req and req["job"] != self.joined[0].id:
            raise RegistrationError(f"job {short(req['job'])} is not this connection's job "
                                    f"(job {self.joined[0].id})")
        return self.joined

    def op_done(self, req: dict) -> dict:
        self.server.registry.leave(*self._own_job(req, "done"), done=True)  # leaving without it fails the job
        return {"ok": True}

    def op_abort(self, req: dict) -> dict:
        """A member cannot go on (its own reason, e.g. its MTU): the job fails at
        once with that reason instead of the others waiting for a timeout."""
        job, rank = self._own_job(req, "abort")
        why = req.get("error")
        if not isinstance(why, str) or not why.strip():
            raise RegistrationError("'abort' needs an 'error' string")
        self.server.registry.leave(job, rank, reason="gave up: " + " ".join(why.split())[:300])
        return {"ok": True}

    def op_missing(self, req: dict) -> dict:
        """Which ranks the switch still waits for at a psn (an agent that stalls names them)."""
        job, _ = self._own_job(req, "missing")
        psn = req.get("psn")
        if not isinstance(psn, int) or isinstance(psn, bool) or psn < 0:
            raise RegistrationError("'missing' needs a non-negative integer 'psn'")
        return {"ok": True, "missing": self.server.registry.missing_ranks(job, psn)}

    def op_wait_end(self, req: dict) -> dict:
        return {"ok": True, "reason": self.server.registry.wait_end(self._own_job(req, "wait_end")[0])}

    # --- live resize (the wire keeps the ops' first name, "remap_*") -------------
    def _resize_step(self, req: dict, op: str) -> tuple | None:
        """(job, rank, resize id) of a well-formed step from a worker; None to ignore it."""
        if not self.joined:
            raise RegistrationError(f"{op!r} before 'register': this connection is in no job")
        if self.joined[1] >= 0 and isinstance(req.get("remap"), int):
            return (*self.joined, req["remap"])
        return None

    def op_resize_report(self, req: dict) -> None:
        # No reply, even to a malformed one: the agent's reader is async.
        step = self._resize_step(req, "remap_report")
        if step and isinstance(req.get("next_psn"), int):
            self.server.registry.resize_report(*step, req["next_psn"])

    def op_resize_passed(self, req: dict) -> None:
        step = self._resize_step(req, "remap_passed")
        if step:
            self.server.registry.resize_passed(*step)

    # --- the rest -------------------------------------------------------------------
    def op_kv_drain(self, req: dict) -> dict:
        """The reducer of a kv job: flip the epoch, read and empty the old copy.
        The reply is one line of up to cols x 266 keys and values (a few MB)."""
        return self.server.registry.kv_drain(*self._own_job(req, "kv_drain"))

    def op_alive(self, req: dict) -> None:
        """A heartbeat; no reply (see watchdog.py)."""
        if self.joined:
            self.server.registry.heartbeat(*self.joined, req.get("fail_timeout"))

    def op_ping(self, req: dict) -> dict:
        return {"ok": True}

    # --- authentication: challenge, then HMAC of the nonce with the shared key ----
    def op_challenge(self, req: dict) -> dict:
        self.nonce = secrets.token_hex(32)
        return {"ok": True, "nonce": self.nonce, "auth": self.server.key is not None}

    def op_auth(self, req: dict) -> dict:
        key, nonce, self.nonce = self.server.key, self.nonce, None  # a nonce answers once
        if key is None:
            return {"ok": True}
        mac = req.get("mac")
        if nonce is None or not isinstance(mac, str) or not hmac.compare_digest(mac, control.auth_mac(key, nonce)):
            log.warning("control connection from %s: authentication failed", self.peer)
            raise RegistrationError("authentication failed: not the key incd was started with")
        self.authed = True
        return {"ok": True}

    OPS = {
        "register": op_register, "rejoin": op_rejoin, "done": op_done, "abort": op_abort, "missing": op_missing,
        "wait_end": op_wait_end,
        "remap_report": op_resize_report, "remap_passed": op_resize_passed,
        "kv_drain": op_kv_drain, "alive": op_alive, "ping": op_ping,
        "challenge": op_challenge, "auth": op_auth,
    }


