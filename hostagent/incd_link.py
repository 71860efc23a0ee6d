"""The link to incd: finding and connecting to its control port, and the
control connection (JSON requests and replies, events, heartbeats, rejoining
a restarted incd). Member (member.py) builds on it."""
from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading
import time

from bpf import control


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


# A member sends a heartbeat this often (as a fraction of its --fail-timeout);
# incd declares it hung when none came for the whole fail timeout.
HEARTBEATS_PER_TIMEOUT = 4
# How long a member whose control connection broke keeps trying to rejoin a
# restarted incd (which waits 10 s by default for it; starting takes seconds
# per switch, and a two-tier fabric's incd builds a dataplane for each).
REJOIN_S = 60.0


class Refused(TransportError):
    """incd answered a request with an error."""


class Control:
    """incd's control connection: JSON lines both ways. Replies answer requests in
    order; events (objects with an "event" key) may come at any time, also in the
    same read as a reply, so bytes after a line are kept for the next one.

    After registration, start() runs a reader (events to a callback, replies to a
    queue; the connection's loss is noted in lost_at) and a heartbeat that tells
    incd this member is alive and how long a silence means it is not."""

    def __init__(self, sock: socket.socket, key: bytes | None = None):
        self.sock = sock
        self.key = key  # incd's shared key, if it wants one
        self.buf = b""
        self.early_events: list[dict] = []  # events read while waiting for a reply
        self.replies: queue.Queue = queue.Queue()
        self.lost_at: float | None = None   # monotonic time the connection was lost
        self.refused: str | None = None     # a restarted incd would not take us back: why
        self.rejoins = 0
        self._rejoin: dict | None = None
        self._send_lock = threading.Lock()
        self._closing = threading.Event()

    def authenticate(self) -> None:
        """Answers incd's challenge with the shared key (nothing to do without one)."""
        if self.key is None:
            return
        ch = self.call({"op": "challenge"})
        if ch.get("auth"):
            self.call({"op": "auth", "mac": control.auth_mac(self.key, ch["nonce"])})

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
                self.authenticate()
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


def shared_key() -> bytes | None:
    """The key in the file INC_KEY_FILE names (inc-agent --key-file sets it)."""
    path = os.environ.get("INC_KEY_FILE")
    if not path:
        return None
    try:
        return control.read_key(path)
    except control.LimitError as e:
        raise TransportError(str(e)) from None


def job_token() -> str | None:
    """The job's secret from INC_JOB_TOKEN (inc-agent --job-token sets it): incd
    lets a member into a job only with the token its first member brought."""
    token = os.environ.get("INC_JOB_TOKEN") or None
    if token is not None and not 8 <= len(token) <= 256:
        raise TransportError("the job token (--job-token or INC_JOB_TOKEN) must be 8 to 256 characters")
    return token


def connect_incd(switch: str | None, ctrl_port: int) -> socket.socket:
    switch = switch or default_gateway()
    if not switch:
        raise TransportError("no switch address: pass --switch (there is no default gateway)")
    try:
        return socket.create_connection((switch, ctrl_port), timeout=10)
    except OSError as e:
        raise TransportError(f"cannot reach incd at {switch}:{ctrl_port}: {e}") from e


