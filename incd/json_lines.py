"""The JSON-lines framing both of incd's doors speak: one request object per
line, one reply object per line; a malformed request is answered and skipped,
an oversized line ends the connection (the stream is out of step). And the
outbox that writes a connection's replies and events without ever blocking
its caller."""
from __future__ import annotations

import json
import math
import socket
import threading

MAX_LINE = 64 * 1024


class BadRequest(ValueError):
    """A request that cannot be read; fatal: the connection is out of step and must end."""

    def __init__(self, msg: str, fatal: bool = False):
        super().__init__(msg)
        self.fatal = fatal


# A member that stops reading its control connection is disconnected (and its
# job failed, naming it) once this much waits for it; nothing incd does ever
# waits for a member to read.
OUTBOX_MAX_BYTES = 16 * 1024 * 1024
OUTBOX_MAX_MSGS = 10000


class Outbox:
    """One connection's replies and events, written by a thread of its own:
    put() never blocks (the registry pushes events under its lock), and a
    reader that falls behind by more than the bounds is cut off."""

    def __init__(self, sock: socket.socket, on_overflow):
        self.sock, self.on_overflow = sock, on_overflow
        self.cond = threading.Condition()
        self.items: list[bytes] = []
        self.bytes = 0
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        with self.cond:
            if self.closed:
                return
            self.items.append(data)
            self.bytes += len(data)
            over = self.bytes > OUTBOX_MAX_BYTES or len(self.items) > OUTBOX_MAX_MSGS
            self.cond.notify()
        if over:
            self.on_overflow(self.bytes, len(self.items))

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait()
                if self.closed and not self.items:
                    return
                data = self.items.pop(0)
                self.bytes -= len(data)
            try:
                self.sock.sendall(data)
            except OSError:
                with self.cond:
                    self.closed = True
                    self.items.clear()
                return

    def close(self, wait_s: float = 2.0) -> None:
        """No more messages; what is queued still goes out (for up to wait_s)."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(wait_s)


def send_line(wfile, obj: dict) -> None:
    wfile.write((json.dumps(obj) + "\n").encode())
    wfile.flush()


def next_request(rfile, wfile) -> dict | None:
    """The next request; a malformed one is answered and skipped. None at EOF or
    after an oversized line (then the connection ends: the stream is out of step)."""
    while True:
        try:
            return read_request(rfile)
        except BadRequest as e:
            send_line(wfile, {"ok": False, "error": f"bad request: {e}"})
            if e.fatal:
                return None


def _no_constant(name: str):
    raise BadRequest(f"{name} is not a number incd accepts")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise BadRequest(f"{text[:20]} is out of range")
    return v


def read_request(rfile) -> dict | None:
    """None at EOF; raises BadRequest for a malformed or oversized line."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise BadRequest(f"request longer than {MAX_LINE} bytes", fatal=True)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise BadRequest("empty line; a request is a JSON object on one line")
    try:
        req = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except BadRequest:
        raise
    except ValueError as e:  # JSONDecodeError, or an integer with too many digits
        if "integer string conversion" in str(e):
            raise BadRequest("an integer with too many digits") from None
        raise BadRequest(f"not JSON: {str(e)[:120]}") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise BadRequest("a request is a JSON object with an 'op' string")
    return req
