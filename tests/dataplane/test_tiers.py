"""Two tiers (bpf/mode_tier.h) under BPF_PROG_TEST_RUN: two leaves and a
spine, each a switch of its own (its own maps), fed crafted packets. A leaf
sums its rack and sends one partial up; the spine sums the leaves' partials;
the result comes down, is stored at the leaf and replicated to the rack.
Losses on the way up and down are repaired by resends, nothing counted
twice; an overflow in a leaf's partial reaches the result; strangers and
single-switch features are refused.

Every device here is lo (ifindex 1): the switch tells senders apart by address
and port, which is what these tests vary."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpf import wire
from bpf.testrun import XDP_DROP, XDP_REDIRECT, prog_test_run

JOB, GEN, WORLD = 9, 3, 4
SLOTS, OFFSET = 8, 4
LO = 1
RACK = {0: "a", 1: "a", 2: "b", 3: "b"}  # rank -> leaf
UP_RANK = {"a": 0, "b": 1}
SPINE_IP = {"a": "10.76.1.1", "b": "10.76.2.1"}
LEAF_UP_IP = {"a": "10.76.1.2", "b": "10.76.2.2"}
HOST_PORT = 40000


def host_ip(rank: int) -> str:
    return f"10.77.{rank + 1}.2"


def aton(a: str) -> bytes:
    return socket.inet_aton(a)


def mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 9, i])


@pytest.fixture(scope="module")
def fabric(root):
    from incd.dataplane import Dataplane

    sw = {}
    try:
        for name in ("a", "b", "spine"):
            sw[name] = Dataplane(pool_slots=OFFSET + SLOTS + 4)
        yield sw
    finally:
        for d in sw.values():
            d.close()


@pytest.fixture()
def job(fabric):
    for leaf in ("a", "b"):
        d = fabric[leaf]
        for r in (r for r in range(WORLD) if RACK[r] == leaf):
            d.set_member(JOB, mac=mac(r), port_mac=mac(50 + r), addr=aton(host_ip(r)),
                         switch_addr=aton(f"10.77.{r + 1}.1"), port=HOST_PORT, rank=r, ifindex=LO)
        # members are keyed by port; here every port is lo, so the last one stays:
        # these tests look at the leaf's verdicts, not at the devmap's copies
        d.set_up(JOB, mac=mac(90), port_mac=mac(91), addr=aton(SPINE_IP[leaf]),
                 switch_addr=aton(LEAF_UP_IP[leaf]), port=wire.PORT, rank=UP_RANK[leaf], ifindex=LO)
        d.set_job(JOB, offset=OFFSET, slots=SLOTS, gen=GEN, world=WORLD, tier=wire.TIER_LEAF, local=2)
        d.clear_slots(OFFSET, SLOTS, JOB)
        d.reset_stats(JOB)
    sp = fabric["spine"]
    for leaf in ("a", "b"):
        sp.set_member(JOB, mac=mac(80 + UP_RANK[leaf]), port_mac=mac(90), addr=aton(LEAF_UP_IP[leaf]),
                      switch_addr=aton(SPINE_IP[leaf]), port=wire.PORT, rank=UP_RANK[leaf], ifindex=LO)
    sp.set_job(JOB, offset=OFFSET, slots=SLOTS, gen=GEN, world=2, tier=wire.TIER_SPINE)
    sp.clear_slots(OFFSET, SLOTS, JOB)
    sp.reset_stats(JOB)
    return fabric


def pkt(rank, psn, vals, *, typ=wire.T_DATA, flags=0, src=None, sport=HOST_PORT, dst="10.77.1.1") -> bytes:
    vals = np.asarray(vals, dtype="<i4")
    h = np.zeros(1, wire.HDR_DTYPE)
    h[0] = (wire.VERSION, typ, flags, wire.OP_SUM, JOB, GEN, psn, 0, rank, vals.size, 0, 0)
    payload = wire.seal_bytes(h.tobytes() + vals.tobytes())
    return bytes(Ether(src="02:00:00:00:01:00", dst="02:00:00:00:00:fe")
                 / IP(src=src or host_ip(rank), dst=dst) / UDP(sport=sport, dport=wire.PORT) / Raw(payload))


def from_spine(leaf, psn, vals, flags=0, src=None) -> bytes:
    """The spine's result as it reaches a leaf's uplink."""
    return pkt(UP_RANK[leaf], psn, vals, typ=wire.T_RESULT, flags=flags, src=src or SPINE_IP[leaf],
               sport=wire.PORT, dst=LEAF_UP_IP[leaf])


def run(d, p):
    return prog_test_run(d.ingress.fd, p, ingress_ifindex=LO)


def hdr(out: bytes):
    return wire.parse_header(out[42:42 + wire.HDR_LEN])


def lanes(out: bytes) -> np.ndarray:
    return np.frombuffer(out[42 + wire.HDR_LEN:], "<i4")


def sealed(out: bytes) -> bool:
    inc = np.frombuffer(out[42:], np.uint8)
    return bool(wire.csum_ok(inc[None, :], np.array([inc.size]))[0])


def stats(d):
    s = d.read_stats(JOB)
    out = {k: v for k, v in s.items() if k != "drops" and v}
    out.update({f"drops.{k}": v for k, v in s["drops"].items() if v})
    return out


def vec(seed, n=300):
    return np.random.default_rng(seed).integers(-(2**20), 2**20, n, dtype=np.int32)


def leaf_partial(fab, leaf, psn, vals):
    """The leaf's two ranks send; the second's packet leaves as the partial."""
    ranks = [r for r in range(WORLD) if RACK[r] == leaf]
    assert run(fab[leaf], pkt(ranks[0], psn, vals[ranks[0]])).verdict == XDP_DROP
    out = run(fab[leaf], pkt(ranks[1], psn, vals[ranks[1]]))
    assert out.verdict == XDP_REDIRECT
    return out.data


def test_a_leaf_sends_one_partial_up_and_the_spines_result_comes_down_to_the_rack(job):
    fab = job
    vals = [vec(r) for r in range(WORLD)]
    total = sum(v.astype(np.int64) for v in vals).astype(np.int32)
    up_a = leaf_partial(fab, "a", 5, vals)
    h = hdr(up_a)
    assert (h["type"], h["rank"], h["psn"], h["flags"]) == (wire.T_DATA, UP_RANK["a"], 5, 0)
    assert np.array_equal(lanes(up_a), (vals[0].astype(np.int64) + vals[1]).astype(np.int32)) and sealed(up_a)
    ip = IP(up_a[14:])
    assert (ip.src, ip.dst, ip[UDP].sport, ip[UDP].dport) == (LEAF_UP_IP["a"], SPINE_IP["a"], wire.PORT, wire.PORT)
    assert Ether(up_a).dst == "02:00:00:00:09:5a"  # the spine's port MAC (mac(90))
    assert fab["a"].read_slot(OFFSET + 5 % SLOTS).state == wire.SLOT_UP
    up_b = leaf_partial(fab, "b", 5, vals)
    # The spine: one contribution per leaf, the second completes the psn.
    assert run(fab["spine"], up_a).verdict == XDP_DROP
    res = run(fab["spine"], up_b)
    assert res.verdict == XDP_REDIRECT
    assert hdr(res.data)["type"] == wire.T_RESULT and np.array_equal(lanes(res.data), total) and sealed(res.data)
    assert stats(fab["spine"]) == {"pkts_in": 2, "consumed": 2, "slots_completed": 1}
    # Down at leaf a: stored, the slot complete, replicated to the rack.
    down = run(fab["a"], from_spine("a", 5, total))
    assert down.verdict == XDP_REDIRECT and np.array_equal(lanes(down.data), total) and sealed(down.data)
    s = fab["a"].read_slot(OFFSET + 5 % SLOTS)
    assert (s.state, s.count, s.bitmap) == (wire.SLOT_COMPLETE, 2, 0b11)
    assert np.array_equal(np.array(s.lanes[:s.numel]), total)
    # A rank of the rack that lost it is answered by the leaf alone.
    again = run(fab["a"], pkt(1, 5, vals[1], flags=wire.F_RETRANS))
    assert again.verdict == XDP_REDIRECT and np.array_equal(lanes(again.data), total)
    assert IP(again.data[14:]).dst == host_ip(1)
    # A second copy of the result (answers to two resends) is not replicated again.
    assert run(fab["a"], from_spine("a", 5, total)).verdict == XDP_DROP
    assert stats(fab["a"]) == {"pkts_in": 5, "consumed": 2, "up_sent": 1, "down_received": 1,
                               "slots_completed": 1, "retrans_answered": 1, "drops.dup": 1}


def test_a_lost_partial_and_a_lost_result_are_repaired_without_counting_twice(job):
    fab = job
    vals = [vec(10 + r) for r in range(WORLD)]
    total = sum(v.astype(np.int64) for v in vals).astype(np.int32)
    leaf_partial(fab, "a", 2, vals)  # lost on its way to the spine
    up_b = leaf_partial(fab, "b", 2, vals)
    assert run(fab["spine"], up_b).verdict == XDP_DROP
    # Rank 0 times out and resends: the leaf sends its stored partial up again.
    again = run(fab["a"], pkt(0, 2, vals[0], flags=wire.F_RETRANS))
    assert again.verdict == XDP_REDIRECT
    h = hdr(again.data)
    assert (h["type"], h["rank"], h["flags"] & wire.F_RETRANS) == (wire.T_DATA, UP_RANK["a"], wire.F_RETRANS)
    assert np.array_equal(lanes(again.data), (vals[0].astype(np.int64) + vals[1]).astype(np.int32))
    res = run(fab["spine"], again.data)
    assert res.verdict == XDP_REDIRECT and np.array_equal(lanes(res.data), total)
    # The result to leaf b is lost: b's rank 3 resends, b sends its partial up
    # again, the spine (complete, b's partial counted) answers b alone.
    again_b = run(fab["b"], pkt(3, 2, vals[3], flags=wire.F_RETRANS))
    assert again_b.verdict == XDP_REDIRECT and hdr(again_b.data)["type"] == wire.T_DATA
    ans = run(fab["spine"], again_b.data)
    assert ans.verdict == XDP_REDIRECT and np.array_equal(lanes(ans.data), total)
    assert IP(ans.data[14:]).dst == LEAF_UP_IP["b"] and hdr(ans.data)["type"] == wire.T_RESULT
    assert run(fab["b"], from_spine("b", 2, total)).verdict == XDP_REDIRECT
    assert stats(fab["spine"]) == {"pkts_in": 3, "consumed": 2, "slots_completed": 1, "retrans_answered": 1}
    assert stats(fab["a"])["up_resent"] == 1 and stats(fab["b"])["up_resent"] == 1
    sp = fab["spine"].read_slot(OFFSET + 2 % SLOTS)
    assert (sp.count, sp.bitmap, sp.state) == (2, 0b11, wire.SLOT_COMPLETE)


def test_an_overflowing_partial_flags_the_result(job):
    fab = job
    n = 50
    vals = [np.zeros(n, np.int32) for _ in range(WORLD)]
    vals[0][7], vals[1][7] = 2**31 - 1, 10  # wraps at leaf a
    vals[2][7] = -20  # and the spine's sum of the two partials does not overflow again
    up_a = leaf_partial(fab, "a", 1, vals)
    assert hdr(up_a)["flags"] & wire.F_OVERFLOW
    up_b = leaf_partial(fab, "b", 1, vals)
    assert run(fab["spine"], up_a).verdict == XDP_DROP
    res = run(fab["spine"], up_b)
    assert res.verdict == XDP_REDIRECT and hdr(res.data)["flags"] & wire.F_OVERFLOW
    down = run(fab["a"], from_spine("a", 1, lanes(res.data), flags=wire.F_OVERFLOW))
    assert down.verdict == XDP_REDIRECT and hdr(down.data)["flags"] & wire.F_OVERFLOW
    assert fab["a"].read_slot(OFFSET + 1).overflow == 1


def test_a_leaf_refuses_strangers_a_round_ahead_and_single_switch_features(job):
    fab = job
    vals = [vec(20 + r) for r in range(WORLD)]
    leaf_partial(fab, "a", 3, vals)
    # While the partial is up, the psn a window later is not started.
    assert run(fab["a"], pkt(0, 3 + SLOTS, vals[0])).verdict == XDP_DROP
    total = sum(v.astype(np.int64) for v in vals).astype(np.int32)
    # A result not from the spine's address, or not from its port: refused.
    assert run(fab["a"], from_spine("a", 3, total, src="10.76.1.9")).verdict == XDP_DROP
    forged = pkt(UP_RANK["a"], 3, total, typ=wire.T_RESULT, src=SPINE_IP["a"], sport=wire.PORT + 1,
                 dst=LEAF_UP_IP["a"])
    assert run(fab["a"], forged).verdict == XDP_DROP
    assert fab["a"].read_slot(OFFSET + 3).state == wire.SLOT_UP
    # Broadcasts stay within one switch.
    assert run(fab["a"], pkt(0, 4, vals[0], flags=wire.F_BCAST)).verdict == XDP_DROP
    s = stats(fab["a"])
    assert (s["drops.ahead"], s["drops.bad_source"], s["drops.bad_hdr"]) == (1, 2, 1), s
    # The genuine result still completes it.
    assert run(fab["a"], from_spine("a", 3, total)).verdict == XDP_REDIRECT
    # The spine takes a leaf's partial only from that leaf's uplink address.
    sp = fab["spine"]
    spoof = pkt(UP_RANK["b"], 6, vals[0], src=LEAF_UP_IP["a"], sport=wire.PORT, dst=SPINE_IP["b"])
    assert run(sp, spoof).verdict == XDP_DROP
    assert sp.read_stats(JOB)["drops"]["bad_source"] == 1
    assert sp.read_slot(OFFSET + 6 % SLOTS).state == wire.SLOT_EMPTY
