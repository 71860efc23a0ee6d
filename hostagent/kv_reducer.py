"""Word count through the switch (key-value mode): the reducer, `inc-agent kv-reduce`.

It registers as the job's PS (so incd's control API calls it) and adds the
leftover tuples the switch forwards, each (flow, psn) once (a replayed or
duplicated leftover packet is acknowledged again but not added; kv_merge),
and acknowledges each straight to its mapper; it takes the mappers'
dictionaries on TCP. When all of them are in (every psn of every mapper
acknowledged, so every leftover is here), it drains the switch's aggregators
twice ("kv_drain": the epoch flips each time, so both copies are read), waits
for the mappers to have left, says "done" and returns {word: count} with what
it drained (ReduceResult). A key claimed by two words (a 64-bit hash
collision, between mappers or within one) is never merged silently: the
colliding keys are left out of the counts and reported (CollisionError, exit
status 3). A key with no word in any dictionary is an error (exit status 1).
"""
from __future__ import annotations

import json
import queue
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from bpf import wire

from . import batchio
from .kv_merge import ReducerState, ReduceSummary
from .kv_messages import CollisionError, KVError, build_acks, parse_dictionary
from .member import Member
from .transport import data_socket


def _listen_tcp(port: int) -> socket.socket:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port))
    t.listen(64)
    return t


def _reducer_sockets() -> tuple[socket.socket, socket.socket]:
    """A UDP data socket and a TCP listener on the same port number."""
    for _ in range(32):
        u = data_socket()
        try:
            return u, _listen_tcp(u.getsockname()[1])
        except OSError:
            u.close()
    raise KVError("no port free for both UDP and TCP")


class _DictServer:
    """Accepts the mappers' dictionary lines; each connection: one JSON line in,
    {"ok": true} out, then it stays open until the mapper has said "done" to incd
    and closes it (closed records that)."""

    def __init__(self, lsock: socket.socket, job: int):
        self.lsock, self.job = lsock, job
        self.inbox: queue.Queue = queue.Queue()
        self.closed: set[int] = set()
        self.cond = threading.Condition()
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        flow = None
        try:
            c.settimeout(60)
            f = c.makefile("rb")
            line = f.readline()
            try:
                msg = parse_dictionary(line, self.job)
            except ValueError as e:
                c.sendall((json.dumps({"ok": False, "error": str(e)}) + "\n").encode())
                return
            flow = msg[0]
            done = threading.Event()
            self.inbox.put((msg, done))
            done.wait(60)  # merged by the main loop (which may refuse it)
            c.sendall((json.dumps(getattr(done, "reply", {"ok": True})) + "\n").encode())
            c.settimeout(None)
            while c.recv(4096):  # until the mapper has left the job and closes
                pass
        except OSError:
            pass
        finally:
            c.close()
            if flow is not None:
                with self.cond:
                    self.closed.add(flow)
                    self.cond.notify_all()

    def wait_closed(self, flows: set[int], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not flows <= self.closed:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


@dataclass
class ReduceResult:
    """What a reducer ends with: {word: count}, its summary, timings and such
    (info), and its state, which still knows what came from where."""
    counts: dict[str, int]
    summary: ReduceSummary
    info: dict
    state: ReducerState

    def drained_counts(self) -> dict[str, int]:
        """{word: sum drained from the switch}: how much of each word the switch absorbed."""
        return self.state.drained_counts()


def run_reducer(job: int, mappers: int, *, switch: str | None = None, ctrl_port: int = wire.CTRL_PORT,
                register_timeout: float = 30.0, fail_timeout: float = 2.0, timeout: float = 600.0,
                say=lambda m: None) -> ReduceResult:
    """Serves one kv job as its reducer. Raises CollisionError (with .result,
    and .counts/.summary/.info) if keys collided."""
    member = Member(job, fail_timeout, KVError)
    t0 = time.perf_counter()
    sock, lsock = _reducer_sockets()
    try:
        say(f"reducer: registering job {job} ({mappers} mappers) on port {sock.getsockname()[1]} ...")
        reply = member.register(switch, ctrl_port, register_timeout, {
            "role": "ps", "job": job, "world": mappers, "mode": "kv",
            "port": sock.getsockname()[1], "timeout": register_timeout})
        member.start()
        ctl = member.ctl
        gen = int(reply["gen"])
        # incd's "members" are the mappers, by flow id ("rank")
        flows = {int(m["rank"]): (m["addr"], int(m["port"])) for m in reply.get("members") or []}
        if set(flows) != set(range(mappers)):
            raise KVError(f"job {job}: incd named mappers {sorted(flows)}, expected 0..{mappers - 1}")
        state = ReducerState(job, gen, mappers)
        server = _DictServer(lsock, job)
        t_reg = time.perf_counter()
        say(f"reducer: job {job} gen {gen} running")
        rx = batchio.Receiver(sock.fileno(), 256, wire.HDR_LEN + 4 * wire.MAX_ELEMS + 64)
        names = np.stack([batchio.sockaddr_in(*flows[f]) for f in range(mappers)])

        def ack(got: list[tuple[int, int, int]]) -> int:
            """Acknowledges leftover packets to their mappers, one sendmmsg."""
            if not got:
                return 0
            flows, psns, tuples = zip(*got)
            rows = build_acks(job=job, gen=gen, flows=flows, psns=psns, tuples=tuples)
            try:
                batchio.send_rows(sock.fileno(), rows, names[list(flows)])
            except OSError:
                return 0  # the mappers resend; so do we then
            return len(got)

        acks = 0
        start = time.monotonic()
        while not state.complete:
            k = rx.recv(0.02)
            if k:
                acks += ack(state.packets(rx.buf[:k], rx.m.msgs["len"][:k]))
            while True:
                try:
                    msg, merged = server.inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    flow, keys, words, col = msg
                    state.dictionary(flow, dict(zip(keys, words)), col)
                except KVError as e:
                    merged.reply = {"ok": False, "error": str(e)}
                merged.set()
            if member.failure:
                raise KVError(member.failure)
            now = time.monotonic()
            if ctl.refused is not None or ctl.lost_at is not None and now - ctl.lost_at > fail_timeout:
                raise KVError(f"job {job}: lost the control connection to incd")
            if now - start > timeout:
                raise KVError(f"job {job}: the mappers' dictionaries did not all come within {timeout:.0f}s "
                              f"(from flows {sorted(state.dict_from)})")
        t_data = time.perf_counter()
        for _ in range(2):  # each flips the epoch: both copies are read
            ctl.send({"op": "kv_drain", "job": job})
            try:
                d = ctl.replies.get(timeout=60)
            except queue.Empty:
                raise KVError(f"job {job}: incd did not answer kv_drain in 60 s") from None
            if d is None:
                raise KVError(f"job {job}: lost the control connection to incd during kv_drain")
            if not d.get("ok"):
                raise KVError(f"job {job}: incd refused kv_drain: {d.get('error')}")
            state.drained(d.get("keys") or [], d.get("values") or [])
        t_drain = time.perf_counter()
        # A mapper closes its dictionary connection after incd took its "done": the
        # reducer leaving before that would fail the job.
        if not server.wait_closed(set(range(mappers)), 10.0):
            say("reducer: warning: not every mapper closed its connection within 10 s")
        # a late replay may still be in the socket: acknowledge it (nothing to add)
        while True:
            k = rx.recv(0.0)
            if not k:
                break
            acks += ack(state.packets(rx.buf[:k], rx.m.msgs["len"][:k]))
        if member.failure:
            raise KVError(member.failure)
        member.leave()
        counts, collisions = state.counts()
        info = {"job": job, "gen": gen, "mappers": mappers, "acks_sent": acks,
                "wait_s": t_reg - t0, "data_s": t_data - t_reg, "drain_s": t_drain - t_data,
                "total_s": time.perf_counter() - t0, "cpu_s": time.process_time()}
        if collisions:
            e = CollisionError(f"{len(collisions)} key(s) claimed by two words, left out of the counts: "
                               + ", ".join(f"{k:#x} ({a!r} / {b!r})" for k, a, b in collisions[:5]))
            e.result = ReduceResult(counts, state.s, info, state)
            e.counts, e.summary, e.info = counts, state.s, info
            raise e
        return ReduceResult(counts, state.s, info, state)
    finally:
        member.close()
        sock.close()
        lsock.close()
