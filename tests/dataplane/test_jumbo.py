"""Jumbo frames (bpf/mode_jumbo.h) under BPF_PROG_TEST_RUN: 64 KB frames in
fragments, added into 20 slots, the result on its chain from rank to rank,
resends, duplicates, corruption, overflow, the next round.

The switch checks that a rank's frame comes in through that rank's port, so
each rank gets a device in a namespace of this test, and the runs
happen in a thread that entered it."""
from __future__ import annotations

import os
import socket
import subprocess

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpf import wire
from bpf.testrun import XDP_DROP, XDP_REDIRECT, prog_test_run
from helpers.control import in_netns

WORLD = 3
SLOTS = 2 * 2 * wire.JUMBO_SUBS  # a window of two frames
OFFSET = 8
SW_MAC, SW_IP = "02:00:00:00:00:fe", "10.78.0.254"
PORT = 40000
E = wire.JUMBO_ELEMS


def addr(rank: int) -> str:
    return f"10.78.0.{rank + 1}"


@pytest.fixture(scope="module")
def ports(root):
    """One device per rank in a namespace of this test: their ifindexes."""
    ns = f"inc-tjumbo-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for r in range(WORLD):
            subprocess.run(["ip", "-n", ns, "link", "add", f"d{r}", "type", "veth", "peer", "name", f"e{r}"],
                           check=True)  # this kernel has no dummy devices
        idx = [int(in_netns(ns, lambda r=r: socket.if_nametoindex(f"d{r}"))) for r in range(WORLD)]
        yield ns, idx
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def dp(root, ports):
    from incd.dataplane import Dataplane

    d = Dataplane(pool_slots=OFFSET + SLOTS + 8)
    yield d
    d.close()


@pytest.fixture()
def job(dp, ports):
    ns, idx = ports
    j, gen = 5, 2
    dp.set_job(j, offset=OFFSET, slots=SLOTS, gen=gen, world=WORLD)
    for r in range(WORLD):
        dp.set_member(j, mac=bytes([2, 0, 0, 0, 1, r]), port_mac=bytes([2, 0, 0, 0, 2, r]),
                      addr=socket.inet_aton(addr(r)), switch_addr=socket.inet_aton(SW_IP), port=PORT + r,
                      rank=r, ifindex=idx[r])
    dp.clear_slots(OFFSET, SLOTS, j)
    dp.reset_stats(j)
    return j, gen


def frame(job, gen, rank, psn, vals, *, typ=wire.T_JUMBO, flags=0, flip_bit=None, to_rank=None) -> bytes:
    """A jumbo frame from rank (or, for a result on its chain, the frame rank
    sends back: from rank's address and port)."""
    vals = np.asarray(vals, dtype="<i4")
    h = np.zeros(1, wire.HDR_DTYPE)
    h[0] = (wire.VERSION, typ, flags, wire.OP_SUM, job, gen, psn, 0, rank, vals.size, 0, 0)
    payload = bytearray(wire.seal_bytes(h.tobytes() + vals.tobytes()))
    if flip_bit is not None:
        payload[flip_bit // 8] ^= 1 << flip_bit % 8
    return bytes(Ether(src="02:00:00:00:01:00", dst=SW_MAC) / IP(src=addr(rank), dst=SW_IP)
                 / UDP(sport=PORT + rank, dport=wire.PORT) / Raw(bytes(payload)))


def run(dp, ports, rank, pkt):
    ns, idx = ports
    return in_netns(ns, lambda: prog_test_run(dp.ingress.fd, pkt, ingress_ifindex=idx[rank]))


def lanes(out: bytes) -> np.ndarray:
    return np.frombuffer(out[42 + wire.HDR_LEN:], "<i4")


def hdr(out: bytes):
    return wire.parse_header(out[42:42 + wire.HDR_LEN])


def sealed(out: bytes) -> bool:
    inc = np.frombuffer(out[42:], np.uint8)
    return bool(wire.csum_ok(inc[None, :], np.array([inc.size]))[0])


def stats(dp, job):
    s = dp.read_stats(job)
    out = {k: v for k, v in s.items() if k != "drops" and v}
    out.update({f"drops.{k}": v for k, v in s["drops"].items() if v})
    return out


def data(seed: int, n: int = E) -> np.ndarray:
    return np.random.default_rng(seed).integers(-(2**20), 2**20, n, dtype=np.int32)


def test_three_ranks_fill_twenty_slots_and_the_result_starts_its_chain(dp, ports, job):
    j, gen = job
    P = 3 * wire.JUMBO_SUBS  # the frame takes slots 60..79 % 80 (the region's second half)
    vals = [data(r) for r in range(WORLD)]
    total = sum(v.astype(np.int64) for v in vals).astype(np.int32)
    assert run(dp, ports, 0, frame(j, gen, 0, P, vals[0])).verdict == XDP_DROP
    assert run(dp, ports, 0, frame(j, gen, 0, P, vals[0])).verdict == XDP_DROP  # a duplicate while partial
    assert run(dp, ports, 2, frame(j, gen, 2, P, vals[2])).verdict == XDP_DROP
    r = run(dp, ports, 1, frame(j, gen, 1, P, vals[1]))  # the last contribution: the result, to rank 0
    assert r.verdict == XDP_REDIRECT
    h = hdr(r.data)
    assert (h["type"], h["rank"], h["numel"], h["psn"], h["flags"]) == (wire.T_JRESULT, 0, E, P, 0)
    assert np.array_equal(lanes(r.data), total) and sealed(r.data)
    ip = IP(r.data[14:])
    assert (ip.dst, ip[UDP].dport, ip.len) == (addr(0), PORT, len(r.data) - 14)
    for k in range(wire.JUMBO_SUBS):
        s = dp.read_slot(OFFSET + (P + k) % SLOTS)
        assert (s.psn, s.state, s.count, s.bitmap) == (P + k, wire.SLOT_COMPLETE, WORLD, 0b111)
        assert np.array_equal(np.array(s.lanes[:s.numel]), total[k * wire.MAX_ELEMS:(k + 1) * wire.MAX_ELEMS])
    assert dp.read_slot(OFFSET + P % SLOTS).jdone == WORLD
    assert stats(dp, j) == {"pkts_in": 4, "consumed": 3, "slots_completed": wire.JUMBO_SUBS, "drops.dup": 1}

    # The chain: rank 0 sends the result back, the switch passes it to rank 1, then 2; rank 2's ends it.
    back = frame(j, gen, 0, P, total, typ=wire.T_JRESULT)
    r = run(dp, ports, 0, back)
    assert r.verdict == XDP_REDIRECT and hdr(r.data)["rank"] == 1 and IP(r.data[14:]).dst == addr(1)
    assert np.array_equal(lanes(r.data), total) and sealed(r.data)
    assert run(dp, ports, 1, frame(j, gen, 1, P, total, typ=wire.T_JRESULT)).verdict == XDP_REDIRECT
    assert run(dp, ports, 2, frame(j, gen, 2, P, total, typ=wire.T_JRESULT)).verdict == XDP_DROP
    assert run(dp, ports, 0, back[:-4]).verdict == XDP_DROP  # cut short: bad length
    # A rank that lost its result resends: answered from the slots, for it alone.
    r = run(dp, ports, 2, frame(j, gen, 2, P, vals[2], flags=wire.F_RETRANS))
    assert r.verdict == XDP_REDIRECT
    h = hdr(r.data)
    assert (h["type"], h["flags"] & wire.F_RETRANS, h["rank"]) == (wire.T_JRESULT, wire.F_RETRANS, 2)
    assert np.array_equal(lanes(r.data), total) and sealed(r.data) and IP(r.data[14:]).dst == addr(2)
    # Such an answer is not passed on.
    assert run(dp, ports, 2, frame(j, gen, 2, P, total, typ=wire.T_JRESULT, flags=wire.F_RETRANS)).verdict == XDP_DROP
    s = stats(dp, j)
    assert (s["chained"], s["retrans_answered"], s["drops.stale"], s["drops.bad_len"], s["drops.bad_hdr"]) == \
        (2, 1, 1, 1, 1), s


def test_a_short_frame_a_corrupted_one_overflow_and_the_next_round(dp, ports, job):
    j, gen = job
    n = wire.MAX_ELEMS + 434  # two slots, the second partly
    a, b = data(7, n), data(8, n)
    a[5] = 2**31 - 1
    b[5] = 1  # overflows
    bad = frame(j, gen, 1, 0, b, flip_bit=8 * (wire.HDR_LEN + 4 * 1000) + 3)
    assert run(dp, ports, 1, bad).verdict == XDP_DROP
    assert dp.read_slot(OFFSET).state == wire.SLOT_EMPTY  # nothing of it was added
    assert run(dp, ports, 0, frame(j, gen, 0, 0, a)).verdict == XDP_DROP
    assert run(dp, ports, 1, frame(j, gen, 1, 0, b)).verdict == XDP_DROP
    r = run(dp, ports, 2, frame(j, gen, 2, 0, np.zeros(n, np.int32)))
    assert r.verdict == XDP_REDIRECT
    total = (a.astype(np.int64) + b).astype(np.int32)
    assert np.array_equal(lanes(r.data), total) and sealed(r.data)
    assert hdr(r.data)["flags"] & wire.F_OVERFLOW
    assert dp.read_slot(OFFSET + 1).numel == 434 and dp.read_slot(OFFSET + 2).state == wire.SLOT_EMPTY
    # A frame of another length for the same psns: refused before anything is added.
    assert run(dp, ports, 0, frame(j, gen, 0, 0, a[:100], flags=wire.F_RETRANS)).verdict == XDP_DROP
    # Two windows on, the psns' slots start a new round.
    nxt = SLOTS
    c = [data(20 + r, n) for r in range(WORLD)]
    for r in range(WORLD - 1):
        assert run(dp, ports, r, frame(j, gen, r, nxt, c[r])).verdict == XDP_DROP
    assert run(dp, ports, 0, frame(j, gen, 0, 0, a)).verdict == XDP_DROP  # the old round is gone: stale
    r = run(dp, ports, 2, frame(j, gen, 2, nxt, c[2]))
    assert r.verdict == XDP_REDIRECT and np.array_equal(lanes(r.data), sum(x.astype(np.int64) for x in c).astype(np.int32))
    assert not hdr(r.data)["flags"] & wire.F_OVERFLOW
    s = stats(dp, j)
    assert (s["drops.bad_csum"], s["drops.bad_len"], s["drops.stale"], s["overflows"]) == (1, 1, 1, 1), s


def test_jumbo_frames_are_for_modulo_jobs_and_their_members(dp, ports, job):
    j, gen = job
    hj = 6
    dp.set_job(hj, offset=OFFSET, slots=SLOTS, gen=1, world=WORLD, mode=wire.MODE_HASH)
    dp.reset_stats(hj)
    assert run(dp, ports, 0, frame(hj, 1, 0, 0, data(1))).verdict == XDP_DROP
    assert dp.read_stats(0)["drops"]["bad_hdr"] >= 1
    # rank 1's frame through rank 0's port: a stranger
    assert run(dp, ports, 0, frame(j, gen, 1, 0, data(1))).verdict == XDP_DROP
    too_long = np.zeros(E + 1, np.int32)
    assert run(dp, ports, 0, frame(j, gen, 0, 0, too_long)).verdict == XDP_DROP
    s = stats(dp, j)
    assert (s["drops.bad_source"], s["drops.bad_len"]) == (1, 1), s
    dp.clear_job(hj)


def test_a_frame_whose_tail_calls_cross_into_a_restarted_incds_programs_is_added_exactly(root, ports):
    """A restarted incd loads its programs again and puts them into the pinned
    tail-call table while frames are in flight: one frame can start in the
    old xdp_inc_jumbo and go on in the new xdp_inc_jumbo_add. The lanes it
    loaded must be where the new programs read them (jumbo_buf is pinned with
    the other maps), or the slots take another frame's lanes and the round
    never completes."""
    import ctypes as ct
    from pathlib import Path

    from incd.dataplane import Dataplane

    pin = Path(f"/sys/fs/bpf/inc-tjumbo-{os.getpid()}")
    old = new = None
    try:
        old = Dataplane(pool_slots=OFFSET + SLOTS + 8, pin_dir=pin)
        new = Dataplane(pool_slots=OFFSET + SLOTS + 8, pin_dir=pin)  # what a restarted incd does
        assert new.adopted
        modes = new.bpf[b"mode_progs"]
        # The table mid-update: the frame's first program is the old load's, the rest the new's.
        modes[ct.c_int(wire.PROG_JUMBO)] = ct.c_int(old.mode_fns[wire.PROG_JUMBO].fd)
        modes[ct.c_int(wire.PROG_JUMBO_ADD)] = ct.c_int(new.mode_fns[wire.PROG_JUMBO_ADD].fd)
        modes[ct.c_int(wire.PROG_JUMBO_OUT)] = ct.c_int(old.mode_fns[wire.PROG_JUMBO_OUT].fd)
        j, gen = 7, 1
        _, idx = ports
        new.set_job(j, offset=OFFSET, slots=SLOTS, gen=gen, world=WORLD)
        for r in range(WORLD):
            new.set_member(j, mac=bytes([2, 0, 0, 0, 1, r]), port_mac=bytes([2, 0, 0, 0, 2, r]),
                           addr=socket.inet_aton(addr(r)), switch_addr=socket.inet_aton(SW_IP), port=PORT + r,
                           rank=r, ifindex=idx[r])
        new.clear_slots(OFFSET, SLOTS, j)
        vals = [data(40 + r) for r in range(WORLD)]
        for r in range(WORLD - 1):
            assert run(old, ports, r, frame(j, gen, r, 0, vals[r])).verdict == XDP_DROP
        r = run(new, ports, WORLD - 1, frame(j, gen, WORLD - 1, 0, vals[WORLD - 1]))
        assert r.verdict == XDP_REDIRECT, stats(new, j)
        assert np.array_equal(lanes(r.data), sum(v.astype(np.int64) for v in vals).astype(np.int32))
        assert sealed(r.data) and hdr(r.data)["rank"] == 0
    finally:
        for d in (new, old):
            if d is not None:
                d.close()  # the first close unpins; the second finds nothing left
        assert not pin.exists()
