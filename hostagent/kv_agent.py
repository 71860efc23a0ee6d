"""Word count through the switch (key-value mode): the mapper and the reducer.

Mapper (`inc-agent kv-map`): tokenizes its text (tokenize()), counts words per
chunk of the input (a Counter: the mapper's combiner) and streams the counts as
INC_T_KV packets of (key, int32 value) tuples to the switch, psn 0, 1, 2, ...
with at most W psns unacknowledged (W <= INC_KV_WINDOW, the switch's seen ring
per flow, so a resend always finds its psn's seen state). A psn is acknowledged
by the switch (INC_T_KV_ACK: all tuples absorbed) or by the reducer (an
INC_T_KV_ACK from the reducer's address: it got the leftovers). A psn not
acknowledged within the retransmission timeout is resent with INC_F_RETRANS;
the switch re-ACKs it or replays the same leftovers, never adds it twice. When
every psn is acknowledged, the mapper sends the reducer its dictionary (key ->
word for every key it sent) over TCP at the reducer's address and UDP port
number, one JSON line, reads {"ok": true}, says "done" to incd and only then
closes that TCP connection (so the reducer knows it has left the job). With
direct (kv-map --direct: switch aggregation off, a baseline for benchmarks)
the packets go to the reducer's address instead; the switch only forwards them.

Reducer (`inc-agent kv-reduce`, registered as the job's PS): adds the leftover
tuples the switch forwards, each (flow, psn) once (a replayed or duplicated
leftover packet is acknowledged again but not added), and acknowledges each
straight to its mapper; takes the mappers' dictionaries on TCP. When all of
them are in (every psn of every mapper acknowledged, so every leftover is
here), it drains the switch's aggregators twice ("kv_drain": the epoch flips
each time, so both copies are read), waits for the mappers to have left, says
"done" and writes {word: count}. A key claimed by two words (a 64-bit hash
collision, between mappers or within one) is never merged silently: the
colliding keys are left out of the counts and reported, exit status 3. A key
with no word in any dictionary is an error (exit status 1).

The pure parts (tokenize, chunk_tuples, split_counts, AckWindow, parse_acks,
ReducerState) are unit-tested in tests/test_kv_agents.py.
"""
from __future__ import annotations

import json
import queue
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from . import batchio, kv_proto, proto
from .transport import (MAX_FAIL_TIMEOUT, Control, TransportError, connect_incd, data_socket)

INT32_MAX = 2**31 - 1
CHUNK_BYTES = 4 << 20          # the mapper's combiner counts this much text at a time
MIN_RTO, MAX_RTO = 0.02, 1.0
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode); everything else separates


class KVError(TransportError):
    pass


class CollisionError(KVError):
    """Two words share a key: their counts cannot be told apart."""


# --- tokenizing and combining (pure) ---------------------------------------------

def tokenize(text: str) -> list[str]:
    """Words of a text: lowercased, split on everything that is not a letter or a
    digit (underscore and punctuation separate; Unicode letters count)."""
    return _TOKEN.findall(text.lower())


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The file's text in pieces of about chunk_bytes, cut only at line ends
    (a word never spans two chunks)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            lines = f.readlines(chunk_bytes)
            if not lines:
                return
            yield "".join(lines)


def split_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key, count) pairs as int32 tuples: a count above INT32_MAX becomes several
    tuples of the same key (INT32_MAX each, then the rest)."""
    keys = np.asarray(keys, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 1:
        raise ValueError("counts must be positive")
    if not counts.size or counts.max() <= INT32_MAX:
        return keys, counts.astype(np.int32)
    reps = -(-counts // INT32_MAX)
    k = np.repeat(keys, reps)
    v = np.full(k.size, INT32_MAX, dtype=np.int64)
    last = np.cumsum(reps) - 1
    v[last] = counts - (reps - 1) * INT32_MAX
    return k, v.astype(np.int32)


def chunk_tuples(counter: Counter, dictionary: dict[int, str], collisions: list,
                 key_fn=kv_proto.word_key) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's word counts as tuples; records key -> word in dictionary and a
    key two of this mapper's words share in collisions (key, word, other word)."""
    keys = np.empty(len(counter), dtype=np.uint64)
    counts = np.empty(len(counter), dtype=np.int64)
    for i, (w, c) in enumerate(counter.items()):
        k = key_fn(w)
        old = dictionary.setdefault(k, w)
        if old != w and (k, old, w) not in collisions:
            collisions.append((k, old, w))
        keys[i], counts[i] = k, c
    return split_counts(keys, counts)


def map_file(paths: Iterable[str], chunk_bytes: int = CHUNK_BYTES, key_fn=kv_proto.word_key):
    """All tuples of the input files, combined per chunk. Returns (keys, values,
    dictionary, collisions, words)."""
    dictionary: dict[int, str] = {}
    collisions: list = []
    ks, vs, words = [], [], 0
    for path in paths:
        for text in read_chunks(path, chunk_bytes):
            toks = tokenize(text)
            words += len(toks)
            k, v = chunk_tuples(Counter(toks), dictionary, collisions, key_fn)
            ks.append(k)
            vs.append(v)
    keys = np.concatenate(ks) if ks else np.zeros(0, np.uint64)
    values = np.concatenate(vs) if vs else np.zeros(0, np.int32)
    return keys, values, dictionary, collisions, words


# --- the mapper's window (pure) ------------------------------------------------------

class AckWindow:
    """Which psns of 0..n-1 may be sent, which are acknowledged, which are due
    for a resend. psn p is sent only while p < base + window, base = lowest psn
    not acknowledged."""

    def __init__(self, n: int, window: int):
        if not 1 <= window <= kv_proto.WINDOW:
            raise ValueError(f"window must be in 1..{kv_proto.WINDOW}")
        self.n, self.window = n, window
        self.acked = np.zeros(n, dtype=bool)
        self.sent_at = np.zeros(n)
        self.sends = np.zeros(n, dtype=np.int32)
        self.base = self.next = self.nacked = 0

    @property
    def finished(self) -> bool:
        return self.nacked == self.n

    def to_send(self) -> tuple[int, int]:
        """[start, stop) of the new psns the window allows now."""
        stop = min(self.n, self.base + self.window)
        return self.next, max(self.next, stop)

    def mark_sent(self, start: int, stop: int, now: float) -> None:
        self.sent_at[start:stop] = now
        self.sends[start:stop] += 1
        self.next = max(self.next, stop)

    def ack(self, idx: np.ndarray) -> np.ndarray:
        """Marks psns acknowledged; returns those that were not before (each once)."""
        idx = np.unique(np.asarray(idx, dtype=np.int64))
        idx = idx[(idx >= 0) & (idx < self.next)]
        new = idx[~self.acked[idx]]
        self.acked[new] = True
        self.nacked += new.size
        if self.base < self.n and self.acked[self.base]:
            rest = self.acked[self.base:]
            self.base = self.n if rest.all() else self.base + int(rest.argmin())
        return new

    def due(self, now: float, rto: float) -> np.ndarray:
        """Sent, not acknowledged, and older than rto."""
        span = np.arange(self.base, self.next)
        return span[~self.acked[span] & (now - self.sent_at[span] > rto)]


def parse_acks(rows: np.ndarray, lens: np.ndarray, *, job: int, gen: int, flow: int, n: int) -> np.ndarray:
    """psn indices (0..n-1) acknowledged by a batch of received datagrams: intact
    INC_T_KV_ACKs of this job, generation and flow."""
    k = rows.shape[0]
    if not k:
        return np.zeros(0, np.int64)
    h = np.frombuffer(rows[:, :proto.HDR_LEN].tobytes(), dtype=proto.HDR_DTYPE)
    ok = ((lens >= proto.HDR_LEN) & (h["version"] == proto.VERSION) & (h["type"] == kv_proto.T_KV_ACK)
          & (h["job"] == job) & (h["gen"] == gen) & (h["rank"] == flow) & proto.csum_ok(rows, lens))
    idx = h["psn"].astype(np.int64)
    return idx[ok & (idx < n)]


def build_ack(*, job: int, gen: int, flow: int, psn: int, tuples: int = 0, flags: int = 0) -> bytes:
    """The reducer's acknowledgement of a leftover packet: a header-only
    INC_T_KV_ACK (slot = tuples it took), sealed."""
    h = np.zeros(1, proto.HDR_DTYPE)
    h["version"], h["type"], h["flags"], h["op"] = proto.VERSION, kv_proto.T_KV_ACK, flags, proto.OP_SUM
    h["job"], h["gen"], h["rank"], h["psn"], h["slot"] = job, gen, flow, psn & 0xFFFFFFFF, tuples
    return proto.seal_bytes(h.tobytes())


# --- the reducer's state (pure) -----------------------------------------------------

@dataclass
class ReduceSummary:
    leftover_packets: int = 0      # distinct (flow, psn) leftover packets added
    leftover_tuples: int = 0
    partial_packets: int = 0       # of those, ones the switch absorbed part of
    dup_packets: int = 0           # replays/duplicates acknowledged again, not added
    bad_packets: int = 0           # wrong job/gen/flow/type or bad csum
    drain_keys: int = 0            # distinct keys (per drain) read from the switch
    drain_total: int = 0           # sum of the values drained from the switch
    leftover_total: int = 0        # sum of the leftover values
    drains: int = 0
    words: int = 0
    dictionaries: int = 0
    collisions: list = field(default_factory=list)


class ReducerState:
    """Leftovers (each (flow, psn) once), drained sums and dictionaries -> counts."""

    def __init__(self, job: int, gen: int, world: int):
        self.job, self.gen, self.world = job, gen, world
        self.seen: set[tuple[int, int]] = set()
        self._keys: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self.words: dict[int, str] = {}
        self.dict_from: set[int] = set()
        self.s = ReduceSummary()

    def packet(self, data: bytes) -> tuple[int, int, int] | None:
        """A datagram from the switch. Returns (flow, psn, tuples) to acknowledge, or
        None if it is not a leftover packet of this job. Adds its tuples only the
        first time its (flow, psn) comes."""
        try:
            h, t = kv_proto.parse_kv(data)
        except ValueError:
            self.s.bad_packets += 1
            return None
        flow, psn = int(h["rank"]), int(h["psn"])
        if h["type"] != kv_proto.T_KV or h["job"] != self.job or h["gen"] != self.gen or flow >= self.world:
            self.s.bad_packets += 1
            return None
        if (flow, psn) in self.seen:
            self.s.dup_packets += 1
            return flow, psn, len(t)
        self.seen.add((flow, psn))
        self.s.leftover_packets += 1
        self.s.leftover_tuples += len(t)
        self.s.partial_packets += bool(h["flags"] & kv_proto.F_KV_PARTIAL)
        if len(t):
            self._keys.append(t["key"].astype(np.uint64))
            self._vals.append(t["value"].astype(np.int64))
            self.s.leftover_total += int(t["value"].astype(np.int64).sum())
        return flow, psn, len(t)

    def drained(self, keys, values) -> None:
        k = np.asarray(keys, dtype=np.uint64)
        v = np.asarray(values, dtype=np.int64)
        if k.size != v.size:
            raise KVError("kv_drain reply: keys and values differ in length")
        self.s.drains += 1
        self.s.drain_keys += int(k.size)
        self.s.drain_total += int(v.sum())
        if k.size:
            self._keys.append(k)
            self._vals.append(v)

    def dictionary(self, flow: int, words: dict, collisions=()) -> None:
        """A mapper's key -> word dictionary (keys as ints or decimal strings), and
        the collisions it found among its own words."""
        if not 0 <= flow < self.world:
            raise KVError(f"dictionary from flow {flow}, not a mapper of this job (0..{self.world - 1})")
        if flow in self.dict_from:
            return  # the same mapper again (a retry): already merged
        self.dict_from.add(flow)
        self.s.dictionaries += 1
        new = {int(k): str(w) for k, w in words.items()}
        bad = kv_proto.merge_dictionary(self.words, new)
        for c in [*bad, *((int(k), str(a), str(b)) for k, a, b in collisions)]:
            if all(c[0] != x[0] or {c[1], c[2]} - {x[1], x[2]} for x in self.s.collisions):
                self.s.collisions.append(c)

    @property
    def complete(self) -> bool:
        return len(self.dict_from) == self.world

    def counts(self) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
        """{word: count} over everything added; raises KVError for a key that no
        dictionary names. Colliding keys are left out and returned."""
        if self._keys:
            keys = np.concatenate(self._keys)
            vals = np.concatenate(self._vals)
            uk, inv = np.unique(keys, return_inverse=True)
            sums = np.zeros(uk.size, np.int64)
            np.add.at(sums, inv, vals)
        else:
            uk, sums = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        bad = {c[0] for c in self.s.collisions}
        out: dict[str, int] = {}
        missing = []
        for k, v in zip(uk.tolist(), sums.tolist()):
            if k in bad:
                continue
            w = self.words.get(k)
            if w is None:
                missing.append(k)
                continue
            if v:
                out[w] = v
        if missing:
            raise KVError(f"{len(missing)} key(s) summed with no word in any mapper's dictionary "
                          f"(e.g. {missing[:3]}): a mapper sent tuples it did not name")
        self.s.words = len(out)
        return out, list(self.s.collisions)


# --- I/O: the mapper --------------------------------------------------------------

@dataclass
class MapStats:
    job: int
    flow: int
    words: int = 0
    distinct: int = 0
    tuples: int = 0
    packets: int = 0
    tuples_per_packet: int = 0
    window: int = 0
    retransmits: int = 0
    acks_switch: int = 0
    acks_reducer: int = 0
    collisions: int = 0
    map_s: float = 0.0
    send_s: float = 0.0
    total_s: float = 0.0


class _Failure:
    def __init__(self):
        self.failure: str | None = None

    def on_event(self, ev: dict) -> None:
        if ev.get("event") == "job_failed" and self.failure is None:
            self.failure = f"job {ev.get('job')} failed: {ev.get('error') or 'no reason given'}"


def _leave(ctl: Control) -> None:
    """Says "done" to incd and waits for its reply."""
    if ctl.lost_at is not None:
        return
    ctl.send({"op": "done"})
    try:
        ctl.replies.get(timeout=5)
    except queue.Empty:
        pass


def run_mapper(job: int, flow: int, world: int, inputs: list[str], *, window: int = 64,
               switch: str | None = None, ctrl_port: int = proto.CTRL_PORT, register_timeout: float = 30.0,
               progress_timeout: float = 10.0, fail_timeout: float = 2.0,
               chunk_bytes: int = CHUNK_BYTES, direct: bool = False, say=lambda m: None) -> MapStats:
    """One mapper of a kv job. direct: send the tuples straight to the reducer's
    address instead of the switch's (switch aggregation off, a baseline): the
    switch forwards them like any other traffic and absorbs nothing; the job,
    the window, the reducer's acknowledgements and the dictionary are as usual."""
    if not 1 <= window <= kv_proto.WINDOW:
        raise KVError(f"window must be in 1..{kv_proto.WINDOW} (the switch remembers {kv_proto.WINDOW} psns per flow)")
    if not 0 < fail_timeout <= MAX_FAIL_TIMEOUT:
        raise KVError(f"fail_timeout must be in (0, {MAX_FAIL_TIMEOUT:.0f}] seconds")
    t0 = time.perf_counter()
    st = MapStats(job, flow)
    try:
        keys, values, dictionary, collisions, st.words = map_file(inputs, chunk_bytes)
    except OSError as e:
        raise KVError(f"cannot read input: {e}") from e
    st.map_s = time.perf_counter() - t0
    st.distinct, st.tuples, st.collisions = len(dictionary), int(keys.size), len(collisions)
    sock = data_socket()
    ctl = None
    try:
        ctl = Control(connect_incd(switch, ctrl_port))
        ctl.sock.settimeout(register_timeout + 10)
        say(f"mapper {flow}/{world}: {st.words} words, {st.tuples} tuples; registering job {job} ...")
        reply = ctl.call({"op": "register", "job": job, "rank": flow, "world": world, "mode": "kv",
                                "port": sock.getsockname()[1], "window": window, "timeout": register_timeout})
        fail = _Failure()
        ctl.start(fail.on_event, fail_timeout)
        gen = int(reply["gen"])
        W = max(1, min(window, int(reply.get("window") or window), kv_proto.WINDOW))
        per = int(reply.get("tuples") or kv_proto.tuples_for_mtu(1500))
        if per < 1:
            raise KVError("the switch ports' MTU is too small for a key-value packet")
        red = reply.get("ps") or {}
        if not red.get("addr"):
            raise KVError(f"job {job}: incd named no reducer")
        dest = (red["addr"], int(red["port"])) if direct else (reply["data_addr"], int(reply["data_port"]))
        st.tuples_per_packet, st.window = per, W
        t1 = time.perf_counter()
        if keys.size:
            _stream(sock, keys, values, per, job=job, gen=gen, flow=flow, window=W, dest=dest,
                    reducer_addr=red["addr"], fail=fail, ctl=ctl, progress_timeout=progress_timeout,
                    fail_timeout=fail_timeout, st=st)
        st.send_s = time.perf_counter() - t1
        say(f"mapper {flow}: {st.packets} packets acknowledged; sending the dictionary to the reducer")
        with socket.create_connection((red["addr"], int(red["port"])), timeout=30) as tcp:
            msg = {"job": job, "flow": flow, "words": {str(k): w for k, w in dictionary.items()},
                   "collisions": [[str(k), a, b] for k, a, b in collisions]}
            tcp.sendall((json.dumps(msg) + "\n").encode())
            f = tcp.makefile("rb")
            line = f.readline()
            try:
                ans = json.loads(line)
            except ValueError:
                ans = None
            if not isinstance(ans, dict) or not ans.get("ok"):
                raise KVError(f"the reducer did not take the dictionary: {line[:200]!r}")
            if fail.failure:
                raise KVError(fail.failure)
            _leave(ctl)  # before closing the TCP connection: the reducer waits for that close
        st.total_s = time.perf_counter() - t0
        return st
    except (OSError, ValueError) as e:  # the reducer unreachable, a garbled reply
        raise KVError(f"job {job} mapper {flow}: {e}") from e
    finally:
        if ctl is not None:
            ctl.close()
        sock.close()


def _stream(sock, keys, values, per, *, job, gen, flow, window, dest, reducer_addr, fail, ctl,
            progress_timeout, fail_timeout, st: MapStats) -> None:
    rows, sizes = kv_proto.build_kv_packets(keys, values, per, job=job, gen=gen, flow=flow, psn0=0)
    n = len(rows)
    numel = (sizes - proto.HDR_LEN) // 4
    msgs = batchio.Messages(rows, sizes.astype(np.uint64))
    name = batchio.sockaddr_in(*dest)
    msgs.msgs["name"] = name.ctypes.data
    msgs.msgs["namelen"] = 16
    fd = sock.fileno()
    rx = batchio.Receiver(fd, 256, proto.HDR_LEN + 64, addrs=True)
    red_ip = int(np.frombuffer(socket.inet_aton(reducer_addr), "<u4")[0])
    win = AckWindow(n, window)
    srtt, rto = None, 0.05
    last_progress = rto_fired = time.monotonic()
    while not win.finished:
        now = time.monotonic()
        a, b = win.to_send()
        if b > a:
            batchio.send_msgs(fd, msgs.msgs, a, b - a)
            win.mark_sent(a, b, now)
        k = rx.recv(min(rto, 0.05))
        now = time.monotonic()
        if k:
            got = rx.buf[:k]
            lens = rx.m.msgs["len"][:k].astype(np.int64)
            ok_rows = parse_acks(got, lens, job=job, gen=gen, flow=flow, n=n)
            if ok_rows.size:
                h = np.frombuffer(got[:, :proto.HDR_LEN].tobytes(), dtype=proto.HDR_DTYPE)
                new = win.ack(ok_rows)
                if new.size:
                    # who acknowledged (first ACK per psn): the reducer's address or the switch
                    src = rx.src_ip[:k]
                    psn_src = {}
                    for p, s in zip(h["psn"].tolist(), src.tolist()):
                        psn_src.setdefault(p, s)
                    from_red = sum(psn_src.get(int(p)) == red_ip for p in new)
                    st.acks_reducer += from_red
                    st.acks_switch += new.size - from_red
                    clean = new[win.sends[new] == 1]
                    if clean.size:
                        rtt = now - float(win.sent_at[clean].mean())
                        srtt = rtt if srtt is None else 0.875 * srtt + 0.125 * min(rtt, 2 * srtt)
                        rto = min(MAX_RTO, max(MIN_RTO, 3 * srtt))
                    last_progress = now
        due = win.due(now, rto)
        if due.size:
            sub = rows[due]
            sub[:, 2] |= proto.F_RETRANS
            proto.seal_rows(sub, numel[due])
            rows[due] = sub
            batchio.send_msgs(fd, msgs.subset(due))
            win.sent_at[due] = now
            win.sends[due] += 1
            st.retransmits += due.size
            if last_progress <= rto_fired:
                rto = min(MAX_RTO, rto * 1.5)  # nothing came back since the last timeout: back off
            rto_fired = now
        if fail.failure:
            raise KVError(fail.failure)
        if ctl.refused is not None or (ctl.lost_at is not None and now - max(ctl.lost_at, last_progress) > fail_timeout):
            raise KVError(f"job {job}: lost the control connection to incd and no acknowledgement came "
                          f"for {now - last_progress:.1f}s")
        if now - last_progress > progress_timeout:
            raise KVError(f"job {job} mapper {flow}: no acknowledgement for psn {win.base} in "
                          f"{progress_timeout:.1f}s ({win.nacked}/{n} packets acknowledged); is the reducer running?")
    st.packets = n


# --- I/O: the reducer -------------------------------------------------------------

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
                msg = json.loads(line)
                if not isinstance(msg, dict) or msg.get("job") != self.job or not isinstance(msg.get("flow"), int) \
                        or not isinstance(msg.get("words"), dict):
                    raise ValueError("not a dictionary of this job")
            except ValueError as e:
                c.sendall((json.dumps({"ok": False, "error": str(e)}) + "\n").encode())
                return
            flow = msg["flow"]
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


def run_reducer(job: int, world: int, *, switch: str | None = None, ctrl_port: int = proto.CTRL_PORT,
                register_timeout: float = 30.0, fail_timeout: float = 2.0, timeout: float = 600.0,
                say=lambda m: None) -> tuple[dict[str, int], ReduceSummary, dict]:
    """Serves one kv job as its reducer. Returns (counts, summary, info); raises
    CollisionError (with .counts/.summary) if keys collided."""
    if not 0 < fail_timeout <= MAX_FAIL_TIMEOUT:
        raise KVError(f"fail_timeout must be in (0, {MAX_FAIL_TIMEOUT:.0f}] seconds")
    t0 = time.perf_counter()
    sock, lsock = _reducer_sockets()
    ctl = None
    try:
        ctl = Control(connect_incd(switch, ctrl_port))
        ctl.sock.settimeout(register_timeout + 10)
        say(f"reducer: registering job {job} ({world} mappers) on port {sock.getsockname()[1]} ...")
        reply = ctl.call({"op": "register", "role": "ps", "job": job, "world": world, "mode": "kv",
                                "port": sock.getsockname()[1], "timeout": register_timeout})
        fail = _Failure()
        ctl.start(fail.on_event, fail_timeout)
        gen = int(reply["gen"])
        members = {int(m["rank"]): (m["addr"], int(m["port"])) for m in reply.get("members") or []}
        if set(members) != set(range(world)):
            raise KVError(f"job {job}: incd named mappers {sorted(members)}, expected 0..{world - 1}")
        state = ReducerState(job, gen, world)
        server = _DictServer(lsock, job)
        t_reg = time.perf_counter()
        say(f"reducer: job {job} gen {gen} running")
        rx = batchio.Receiver(sock.fileno(), 256, proto.HDR_LEN + 4 * proto.MAX_ELEMS + 64)
        acks = 0
        start = time.monotonic()
        while not state.complete:
            k = rx.recv(0.02)
            for i in range(k):
                n = int(rx.m.msgs["len"][i])
                r = state.packet(rx.buf[i, :n].tobytes())
                if r is not None:
                    flow, psn, t = r
                    try:
                        sock.sendto(build_ack(job=job, gen=gen, flow=flow, psn=psn, tuples=t), members[flow])
                        acks += 1
                    except OSError:
                        pass  # the mapper resends; so do we then
            while True:
                try:
                    msg, ev = server.inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    state.dictionary(int(msg["flow"]), msg["words"], msg.get("collisions") or ())
                except KVError as e:
                    ev.reply = {"ok": False, "error": str(e)}
                ev.set()
            if fail.failure:
                raise KVError(fail.failure)
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
        if not server.wait_closed(set(range(world)), 10.0):
            say("reducer: warning: not every mapper closed its connection within 10 s")
        # a late replay may still be in the socket: acknowledge it (nothing to add)
        while True:
            k = rx.recv(0.0)
            if not k:
                break
            for i in range(k):
                r = state.packet(rx.buf[i, :int(rx.m.msgs["len"][i])].tobytes())
                if r is not None:
                    sock.sendto(build_ack(job=job, gen=gen, flow=r[0], psn=r[1], tuples=r[2]), members[r[0]])
        if fail.failure:
            raise KVError(fail.failure)
        _leave(ctl)
        counts, collisions = state.counts()
        info = {"job": job, "gen": gen, "mappers": world, "acks_sent": acks,
                "wait_s": t_reg - t0, "data_s": t_data - t_reg, "drain_s": t_drain - t_data,
                "total_s": time.perf_counter() - t0}
        if collisions:
            e = CollisionError(f"{len(collisions)} key(s) claimed by two words, left out of the counts: "
                               + ", ".join(f"{k:#x} ({a!r} / {b!r})" for k, a, b in collisions[:5]))
            e.counts, e.summary, e.info = counts, state.s, info
            raise e
        return counts, state.s, info
    finally:
        if ctl is not None:
            ctl.close()
        sock.close()
        lsock.close()


def summary_dict(s: ReduceSummary) -> dict:
    d = asdict(s)
    d["collisions"] = [[hex(k), a, b] for k, a, b in s.collisions]
    return d
