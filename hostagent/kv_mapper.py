"""Word count through the switch (key-value mode): the mapper, `inc-agent kv-map`.

It registers, then reads its text a chunk at a time, counts the words of each
chunk (count_words: the mapper's combiner), keys them (WordSource) and sends
the chunk's (key, int32 value) tuples while it maps the next: INC_T_KV
packets, psn 0, 1, 2, ... with at most W psns unacknowledged (W <=
INC_KV_WINDOW, the switch's seen ring per flow, so a resend always finds its
psn's seen state). Which tuples go through the switch (Router): each key has a
fixed place in the packet (kv_row: RowPacker), so it always meets the same
aggregator; when the mapper has a part of the switch array of its own it knows
which keys hold an aggregator there (PartOwners, the hottest first) and only
those go through the switch, the rest straight to the reducer in dense packets
(--all-via-switch: everything through the switch; --direct: nothing, switch
aggregation off, a baseline for benchmarks). A psn is acknowledged by the
switch (INC_T_KV_ACK: all tuples absorbed) or by the reducer (an INC_T_KV_ACK
from the reducer's address: it got the leftovers). A psn not acknowledged
within the retransmission timeout is resent with INC_F_RETRANS; the switch
re-ACKs it or replays the same leftovers, never adds it twice. When every psn
is acknowledged, the mapper sends the reducer its dictionary (key -> word for
every key it sent; dictionary_line) over TCP at the reducer's address and UDP
port number, reads {"ok": true}, says "done" to incd and only then closes that
TCP connection (so the reducer knows it has left the job).

In incd's control API a mapper registers its flow id as "rank" and learns the
reducer's address as "ps".
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

import numpy as np

from bpf import kv_wire, wire

from . import batchio
from .kv_flow import AckWindow, PacketLog, Router
from .kv_messages import KVError, dictionary_line, parse_acks
from .member import Member
from .transport import data_socket
from .words import CHUNK_BYTES, WordSource

MIN_RTO, MAX_RTO = 0.02, 1.0


@dataclass
class MapStats:
    job: int
    flow: int
    words: int = 0
    distinct: int = 0
    tuples: int = 0
    packets: int = 0
    route: str = ""
    tuples_to_switch: int = 0      # sent through the switch (the rest straight to the reducer)
    packets_to_switch: int = 0
    padding: int = 0               # key-0 places in those packets (a row with no tuple waiting)
    aggregators: int = 0           # of the mapper's part of the switch (0: shared with other mappers)
    claimed: int = 0               # of those, held by one of its keys
    tuples_per_packet: int = 0
    window: int = 0
    retransmits: int = 0
    acks_switch: int = 0
    acks_reducer: int = 0
    collisions: int = 0
    map_s: float = 0.0
    send_s: float = 0.0
    total_s: float = 0.0
    cpu_s: float = 0.0             # the mapper process's CPU time (user + system)


def run_mapper(job: int, flow: int, mappers: int, inputs: list[str], *, window: int = wire.KV_WINDOW,
               switch: str | None = None, ctrl_port: int = wire.CTRL_PORT, register_timeout: float = 30.0,
               progress_timeout: float = 10.0, fail_timeout: float = 2.0, cols: int | None = None,
               chunk_bytes: int = CHUNK_BYTES, route: str = "owned", split: str = "words",
               say=lambda m: None) -> MapStats:
    """One mapper of a kv job: registers, then maps its input chunk by chunk,
    sending each chunk's packets while it maps the next. cols: switch columns
    to ask for (incd's default if None). route (see _Router): "owned" (keys
    holding an aggregator through the switch, the rest straight to the
    reducer), "switch" (everything through the switch) or "direct" (switch
    aggregation off, a baseline: all tuples to the reducer's address; the
    switch forwards them like any other traffic and absorbs nothing; the job,
    the window, the reducer's acknowledgements and the dictionary are as
    usual). split: what a word is (see count_words)."""
    if route not in ("owned", "switch", "direct"):
        raise KVError(f"route must be owned, switch or direct, not {route!r}")
    if not 1 <= window <= wire.KV_WINDOW:
        raise KVError(f"window must be in 1..{wire.KV_WINDOW} (the switch remembers {wire.KV_WINDOW} psns per flow)")
    member = Member(job, fail_timeout, KVError)
    for path in inputs:  # before registering: a bad input must not start the job
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise KVError(f"cannot read input: {e}") from e
    t0 = time.perf_counter()
    st = MapStats(job, flow)
    src = WordSource(inputs, chunk_bytes, split=split)
    sock = data_socket()
    try:
        say(f"mapper {flow}/{mappers}: registering job {job} ...")
        req = {"job": job, "rank": flow, "world": mappers, "mode": "kv",
               "port": sock.getsockname()[1], "window": window, "timeout": register_timeout}
        if cols is not None:
            req["cols"] = cols
        reply = member.register(switch, ctrl_port, register_timeout, req)
        member.start()
        gen = int(reply["gen"])
        W = max(1, min(window, int(reply.get("window") or window), wire.KV_WINDOW))
        per = int(reply.get("tuples") or kv_wire.tuples_for_mtu(1500))
        if per < 1:
            raise KVError("the switch ports' MTU is too small for a key-value packet")
        reducer = reply.get("ps") or {}  # incd names the reducer as the job's PS
        if not reducer.get("addr"):
            raise KVError(f"job {job}: incd named no reducer")
        st.tuples_per_packet, st.window, st.route = per, W, route
        owners = None
        kcols, parts = int(reply.get("cols") or 0), int(reply.get("parts") or 0)
        if parts == mappers and kcols >= parts:  # a part of its own: it knows who holds what
            owners = kv_wire.PartOwners(per, kcols // parts)
        router = Router(route, per, owners)
        try:
            stream(sock, src, router, job=job, gen=gen, flow=flow, window=W,
                    switch_dest=(reply["data_addr"], int(reply["data_port"])),
                    reducer_dest=(reducer["addr"], int(reducer["port"])), member=member,
                    progress_timeout=progress_timeout, fail_timeout=fail_timeout, st=st)
        except (OSError, UnicodeError) as e:
            if isinstance(e, OSError) and e.filename is None:
                raise
            raise KVError(f"job {job} mapper {flow}: cannot read input: {e}") from e
        st.words, st.map_s = src.words, src.map_s
        st.distinct, st.collisions = len(src.dictionary), len(src.collisions)
        st.tuples_to_switch, st.packets_to_switch = router.tuples_to_switch, router.packets_to_switch
        st.padding = router.padding
        if owners is not None:
            st.aggregators, st.claimed = owners.owner.size, owners.claimed
        st.send_s = time.perf_counter() - t0 - st.map_s
        say(f"mapper {flow}: {st.words} words, {st.tuples} tuples in {st.packets} packets acknowledged; "
            "sending the dictionary to the reducer")
        with socket.create_connection((reducer["addr"], int(reducer["port"])), timeout=30) as tcp:
            tcp.sendall(dictionary_line(job, flow, src.dictionary, src.collisions))
            f = tcp.makefile("rb")
            line = f.readline()
            try:
                ans = json.loads(line)
            except ValueError:
                ans = None
            if not isinstance(ans, dict) or not ans.get("ok"):
                raise KVError(f"the reducer did not take the dictionary: {line[:200]!r}")
            if member.failure:
                raise KVError(member.failure)
            member.leave()  # before closing the TCP connection: the reducer waits for that close
        st.total_s = time.perf_counter() - t0
        st.cpu_s = time.process_time()
        return st
    except (OSError, ValueError) as e:  # the reducer unreachable, a garbled reply
        raise KVError(f"job {job} mapper {flow}: {e}") from e
    finally:
        member.close()
        sock.close()


def stream(sock, src: WordSource, router: Router, *, job, gen, flow, window, switch_dest, reducer_dest,
            member: Member, progress_timeout, fail_timeout, st: MapStats) -> None:
    """Maps the input a chunk at a time and sends the packets through the
    window meanwhile; returns when every packet is acknowledged."""
    log = PacketLog(router.per, [switch_dest, reducer_dest])
    fd = sock.fileno()
    rx = batchio.Receiver(fd, 256, wire.HDR_LEN + 64, addrs=True)
    red_ip = int(np.frombuffer(socket.inet_aton(reducer_dest[0]), "<u4")[0])
    win = AckWindow(0, window)
    # Until the first RTT sample: long enough for a reducer that shares its CPU
    # with busy mappers (a whole window resent for nothing otherwise).
    srtt, rto = None, 0.2
    mapping = True
    mapped_at = last_progress = rto_fired = time.monotonic()
    while mapping or not win.finished:
        now = time.monotonic()
        a, b = win.to_send()
        if b > a:
            if win.idle:
                last_progress = now  # the clock for an acknowledgement starts now
            log.send(fd, a, b)
            win.mark_sent(a, b, now)
        if mapping:
            # Map while the window is full (or everything built is out): the
            # acknowledgements wait in the socket meanwhile.
            t = src.next()
            if t is None:
                mapping = False
            else:
                router.add(*t)
                st.tuples += int(t[0].size)
            for rows, sizes, dest in router.packets(not mapping, job=job, gen=gen, flow=flow, psn0=log.n):
                log.add(rows, sizes, dest)
                win.extend(rows.shape[0])
            mapped_at = time.monotonic()
            wait = 0.0
        else:
            wait = min(rto, 0.05)
        while True:
            k = rx.recv(wait)
            now = time.monotonic()
            if not k:
                break
            wait = 0.0
            got = rx.buf[:k]
            lens = rx.m.msgs["len"][:k].astype(np.int64)
            ok_rows = parse_acks(got, lens, job=job, gen=gen, flow=flow, n=win.n)
            if not ok_rows.size:
                continue
            h = np.frombuffer(got[:, :wire.HDR_LEN].tobytes(), dtype=wire.HDR_DTYPE)
            new = win.ack(ok_rows)
            if not new.size:
                continue
            # who acknowledged (first ACK per psn): the reducer's address or the switch
            psn_src = {}
            for p, s_ip in zip(h["psn"].tolist(), rx.src_ip[:k].tolist()):
                psn_src.setdefault(p, s_ip)
            from_red = sum(psn_src.get(int(p)) == red_ip for p in new)
            st.acks_reducer += from_red
            st.acks_switch += new.size - from_red
            # RTT samples only from packets sent since the last mapping step: an
            # acknowledgement that waited in the socket while we mapped says nothing
            clean = new[(win.sends[new] == 1) & (win.sent_at[new] >= mapped_at)]
            if clean.size:
                rtt = now - float(win.sent_at[clean].mean())
                srtt = rtt if srtt is None else 0.875 * srtt + 0.125 * min(rtt, 2 * srtt)
                rto = min(MAX_RTO, max(MIN_RTO, 3 * srtt))
            last_progress = now
            if win.finished:
                break
        due = win.due(now, rto)
        if due.size:
            log.resend(fd, due)
            win.sent_at[due] = now
            win.sends[due] += 1
            st.retransmits += due.size
            if last_progress <= rto_fired:
                rto = min(MAX_RTO, rto * 1.5)  # nothing came back since the last timeout: back off
            rto_fired = now
        if member.failure:
            raise KVError(member.failure)
        ctl = member.ctl
        if ctl.refused is not None or (ctl.lost_at is not None and now - max(ctl.lost_at, last_progress) > fail_timeout):
            raise KVError(f"job {job}: lost the control connection to incd and no acknowledgement came "
                          f"for {now - last_progress:.1f}s")
        if not win.idle and now - last_progress > progress_timeout:
            raise KVError(f"job {job} mapper {flow}: no acknowledgement for psn {win.base} in "
                          f"{progress_timeout:.1f}s ({win.nacked}/{win.n} packets acknowledged); is the reducer running?")
    st.packets = win.n
