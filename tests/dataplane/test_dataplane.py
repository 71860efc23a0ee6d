"""The XDP program, loaded into the kernel, fed crafted packets with
BPF_PROG_TEST_RUN: verdict, output packet, counters and slot state per step."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from bpf.testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, prog_test_run
from bpf import wire

W_MAC, SW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
W_IP, SW_IP = "10.77.1.2", "10.77.1.1"
W_PORT = 40000
SLOTS = 8  # region of 2W, W = 4
OFFSET = 16


@pytest.fixture(scope="module")
def dp(root):
    from incd.dataplane import Dataplane

    d = Dataplane(pool_slots=64)
    for job in range(1, 128):  # the tests' workers all send from W_IP on lo
        for rank in range(8):
            d.set_source(job, rank, socket.inet_aton(W_IP), W_PORT, 1)
    yield d
    d.close()


def inc(job, gen, rank, psn, vals, *, op=wire.OP_SUM, typ=wire.T_DATA, version=wire.VERSION,
        numel=None, cut=0, dport=wire.PORT, flags=0, slot=0, src=W_IP, flip_bit=None,
        sport=W_PORT, bitmap=0) -> bytes:
    h = np.zeros(1, wire.HDR_DTYPE)
    vals = np.asarray(vals, dtype="<i4")
    h[0] = (version, typ, flags, op, job, gen, psn, slot, rank, len(vals) if numel is None else numel, 0, bitmap)
    payload = wire.seal_bytes(h.tobytes() + vals.tobytes())
    if flip_bit is not None:  # corrupted after sealing, as on a bad link
        b = bytearray(payload)
        b[flip_bit // 8] ^= 1 << flip_bit % 8
        payload = bytes(b)
    pkt = bytes(Ether(src=W_MAC, dst=SW_MAC) / IP(src=src, dst=SW_IP)
                / UDP(sport=sport, dport=dport) / Raw(payload))
    return pkt[: len(pkt) - cut] if cut else pkt


def sealed(out: bytes) -> bool:
    """The INC packet the switch sent carries a csum that checks out."""
    inc_part = np.frombuffer(out[42:], np.uint8)
    return bool(wire.csum_ok(inc_part[None, :], np.array([inc_part.size]))[0])


def lanes_of(out: bytes) -> np.ndarray:
    return np.frombuffer(out[42 + wire.HDR_LEN:], "<i4")


def hdr_of(out: bytes):
    return wire.parse_header(out[42:42 + wire.HDR_LEN])


@dataclass
class Step:
    what: str
    pkt: bytes
    verdict: int
    lanes: list | None = None           # payload expected in the output packet
    counters: dict = field(default_factory=dict)  # expected deltas; "drops.x" for drop reasons
    slot: dict = field(default_factory=dict)      # expected slot fields after the step
    job_for_counters: int | None = None


def flat(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if k != "drops"}
    out.update({f"drops.{k}": v for k, v in stats["drops"].items()})
    return out


def run_steps(dp, job, psn_slot, steps):
    for st in steps:
        cjob = job if st.job_for_counters is None else st.job_for_counters
        before = flat(dp.read_stats(cjob))
        r = prog_test_run(dp.ingress.fd, st.pkt)
        assert r.verdict == st.verdict, f"{st.what}: verdict {r.verdict_name}"
        if st.lanes is not None:
            assert lanes_of(r.data).tolist() == list(st.lanes), st.what
            assert sealed(r.data), f"{st.what}: csum of the packet sent"
        after = flat(dp.read_stats(cjob))
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        assert delta == st.counters, f"{st.what}: counter deltas {delta}"
        if st.slot:
            s = dp.read_slot(OFFSET + psn_slot)
            got = {k: (list(s.lanes[: s.numel]) if k == "lanes" else getattr(s, k)) for k in st.slot}
            assert got == st.slot, st.what
        yield st, r


def test_modulo_round_lifecycle(dp):
    """first / middle / last contributor, duplicate, retransmission after
    completion, slot reuse after 2W, stale and ahead packets."""
    job, gen = 5, 9
    dp.set_job(job, offset=OFFSET, slots=SLOTS, gen=gen, world=3)
    dp.reset_stats(job)
    a, b, c = [1, 2, 3], [10, 20, 30], [100, -200, 300]
    P = 3  # psn, slot OFFSET + 3
    steps = [
        Step("first contributor", inc(job, gen, 0, P, a), XDP_DROP, counters={"pkts_in": 1, "consumed": 1},
             slot={"state": 1, "count": 1, "bitmap": 0b001, "psn": P, "lanes": a}),
        Step("middle contributor", inc(job, gen, 2, P, b), XDP_DROP, counters={"pkts_in": 1, "consumed": 1},
             slot={"state": 1, "count": 2, "bitmap": 0b101, "lanes": [11, 22, 33]}),
        Step("duplicate while partial", inc(job, gen, 2, P, b), XDP_DROP,
             counters={"pkts_in": 1, "drops.dup": 1}, slot={"count": 2, "lanes": [11, 22, 33]}),
        Step("last contributor", inc(job, gen, 1, P, c), XDP_REDIRECT, lanes=[111, -178, 333],
             counters={"pkts_in": 1, "consumed": 1, "slots_completed": 1},
             slot={"state": 2, "count": 3, "bitmap": 0b111}),
        Step("retransmission after completion", inc(job, gen, 0, P, a), XDP_REDIRECT, lanes=[111, -178, 333],
             counters={"pkts_in": 1, "retrans_answered": 1}, slot={"state": 2, "lanes": [111, -178, 333]}),
        Step("slot reuse after 2W", inc(job, gen, 1, P + SLOTS, [7, 7, 7]), XDP_DROP,
             counters={"pkts_in": 1, "consumed": 1},
             slot={"state": 1, "psn": P + SLOTS, "bitmap": 0b010, "count": 1, "lanes": [7, 7, 7]}),
        Step("stale psn of the old round", inc(job, gen, 2, P, b), XDP_DROP,
             counters={"pkts_in": 1, "drops.stale": 1}, slot={"psn": P + SLOTS, "count": 1}),
        Step("psn ahead while partial", inc(job, gen, 0, P + 2 * SLOTS, a), XDP_DROP,
             counters={"pkts_in": 1, "drops.ahead": 1}, slot={"psn": P + SLOTS, "lanes": [7, 7, 7]}),
    ]
    for st, r in run_steps(dp, job, P, steps):
        if st.what == "last contributor":
            out = Ether(r.data)
            assert out[UDP].chksum == 0
            assert hdr_of(r.data)["type"] == wire.T_RESULT
        if st.what == "retransmission after completion":
            # unicast back out of the ingress port, addressed to the sender
            out = Ether(r.data)
            assert (out.src, out.dst) == (SW_MAC, W_MAC)
            assert (out[IP].src, out[IP].dst) == (SW_IP, W_IP)
            assert (out[UDP].sport, out[UDP].dport) == (wire.PORT, W_PORT)
            recomputed = IP(bytes(out[IP]))
            del recomputed.chksum
            assert IP(bytes(recomputed)).chksum == out[IP].chksum
            assert hdr_of(r.data)["type"] == wire.T_RESULT


def test_full_packet_and_max_op(dp):
    job, gen = 6, 1
    dp.set_job(job, offset=OFFSET + SLOTS, slots=SLOTS, gen=gen, world=2)
    rng = np.random.default_rng(1)
    x = rng.integers(-1000, 1000, wire.MAX_ELEMS, dtype=np.int32)
    y = rng.integers(-1000, 1000, wire.MAX_ELEMS, dtype=np.int32)
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 0, x)).verdict == XDP_DROP
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 0, y))
    assert r.verdict == XDP_REDIRECT
    assert np.array_equal(lanes_of(r.data), x + y)
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 1, x[:5], op=wire.OP_MAX)).verdict == XDP_DROP
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 1, y[:5], op=wire.OP_MAX))
    assert r.verdict == XDP_REDIRECT
    assert lanes_of(r.data).tolist() == np.maximum(x[:5], y[:5]).tolist()


def test_overflow_is_flagged(dp):
    job, gen = 7, 1
    dp.set_job(job, offset=OFFSET + 2 * SLOTS, slots=SLOTS, gen=gen, world=2)
    dp.reset_stats(job)
    big = 2**31 - 1
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 0, [big, -5])).verdict == XDP_DROP
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 0, [1, 5]))
    assert r.verdict == XDP_REDIRECT
    assert hdr_of(r.data)["flags"] & wire.F_OVERFLOW
    assert dp.read_stats(job)["overflows"] == 1
    # a clean round on the same job carries no flag
    prog_test_run(dp.ingress.fd, inc(job, gen, 0, 1, [1]))
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 1, [2]))
    assert r.verdict == XDP_REDIRECT and not hdr_of(r.data)["flags"] & wire.F_OVERFLOW


def test_single_worker_job_completes_at_once(dp):
    dp.set_job(8, offset=OFFSET + 3 * SLOTS, slots=SLOTS, gen=1, world=1)
    r = prog_test_run(dp.ingress.fd, inc(8, 1, 0, 0, [4, 5]))
    assert r.verdict == XDP_REDIRECT and lanes_of(r.data).tolist() == [4, 5]


NON_INC = [
    ("tcp", bytes(Ether() / IP(src=W_IP, dst=SW_IP) / TCP(sport=5, dport=wire.CTRL_PORT))),
    ("udp other port", bytes(Ether() / IP(src=W_IP, dst=SW_IP) / UDP(sport=5, dport=53) / Raw(b"x" * 40))),
    ("udp below range", bytes(Ether() / IP() / UDP(dport=wire.PORT_MIN - 1) / Raw(b"x" * 40))),
    ("udp above range", bytes(Ether() / IP() / UDP(dport=wire.PORT_MAX + 1) / Raw(b"x" * 40))),
    ("arp", bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP())),
    ("ip options", bytes(Ether() / IP(options=b"\x01\x01\x01\x01") / UDP(dport=wire.PORT) / Raw(b"x" * 40))),
]


@pytest.mark.parametrize("what,pkt", NON_INC, ids=[w for w, _ in NON_INC])
def test_non_inc_traffic_passes_untouched(dp, what, pkt):
    r = prog_test_run(dp.ingress.fd, pkt)
    assert r.verdict == XDP_PASS
    assert r.data == pkt


def bad_cases():
    j, g = 9, 3
    good = [1, 2]
    return [
        ("unknown job", inc(500, g, 0, 0, good), 0, "no_job"),
        ("job 0", inc(0, g, 0, 0, good), 0, "no_job"),
        ("job id out of range", inc(2000, g, 0, 0, good), 0, "no_job"),
        ("wrong version", inc(j, g, 0, 0, good, version=9), 0, "bad_hdr"),
        ("spoofed result", inc(j, g, 0, 0, good, typ=wire.T_RESULT), 0, "bad_hdr"),
        ("unknown op", inc(j, g, 0, 0, good, op=7), 0, "bad_hdr"),
        ("truncated header", inc(j, g, 0, 0, [], cut=10), 0, "bad_hdr"),
        ("old generation", inc(j, g - 1, 0, 0, good), j, "bad_gen"),
        ("rank beyond world", inc(j, g, 2, 0, good), j, "bad_rank"),
        ("numel beyond packet", inc(j, g, 0, 0, good, numel=3), j, "bad_len"),
        ("numel zero", inc(j, g, 0, 0, good, numel=0), j, "bad_len"),
        ("numel above max", inc(j, g, 0, 0, good, numel=wire.MAX_ELEMS + 1), j, "bad_len"),
        ("payload cut short", inc(j, g, 0, 0, good, cut=4), j, "bad_len"),
        ("lane bit flipped", inc(j, g, 0, 0, good, flip_bit=8 * (wire.HDR_LEN + 4) + 3), j, "bad_csum"),
        ("psn bit flipped", inc(j, g, 0, 0, good, flip_bit=8 * 8 + 1), j, "bad_csum"),
        ("rank bit flipped", inc(j, g, 0, 0, good, flip_bit=8 * 16), j, "bad_csum"),
        ("another host as rank 0", inc(j, g, 0, 0, good, src="10.77.2.2"), j, "bad_source"),
        ("another process on rank 0's host", inc(j, g, 0, 0, good, sport=W_PORT + 1), j, "bad_source"),
        ("unregistered rank", inc(j, g, 1, 0, good), j, "bad_source"),
    ]


@pytest.mark.parametrize("what,pkt,cjob,reason", bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_packets_dropped_by_reason(dp, what, pkt, cjob, reason):
    dp.set_job(9, offset=OFFSET + 4 * SLOTS, slots=SLOTS, gen=3, world=2)
    dp.clear_source(9, 1)  # rank 1 of job 9 has not registered
    before = dp.read_stats(cjob)["drops"]
    slot_before = dp.read_slot(OFFSET + 4 * SLOTS).count
    r = prog_test_run(dp.ingress.fd, pkt)
    assert r.verdict == XDP_DROP
    after = dp.read_stats(cjob)["drops"]
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {reason: 1}
    assert dp.read_slot(OFFSET + 4 * SLOTS).count == slot_before  # nothing aggregated


# --- hash mode (ATP) ---------------------------------------------------------
PS_IP, PS_MAC, PS_PORT = "10.77.100.2", "02:00:00:00:00:99", 40100
PS_SW_IP, PS_SW_MAC = "10.77.100.1", "02:00:00:00:00:9e"
H_OFF, H_SIZE = 40, 8


@pytest.fixture()
def hash_job(dp):
    import socket

    job, gen = 20, 4
    for i in range(H_OFF, H_OFF + H_SIZE):
        dp.pool[__import__("ctypes").c_int(i)] = dp.pool.Leaf()
    dp.set_job(job, offset=H_OFF, slots=H_SIZE, gen=gen, world=3, mode=wire.MODE_HASH)
    dp.set_ps(job, mac=bytes.fromhex(PS_MAC.replace(":", "")), port_mac=bytes.fromhex(PS_SW_MAC.replace(":", "")),
              addr=socket.inet_aton(PS_IP), switch_addr=socket.inet_aton(PS_SW_IP), port=PS_PORT, rank=0,
              ifindex=1)  # lo: BPF_PROG_TEST_RUN needs a real device for ingress_ifindex
    dp.reset_stats(job)
    yield job, gen
    dp.clear_job(job)
    dp.clear_ps(job)


def to_ps(r) -> tuple:
    """Checks a packet the switch sent to the PS; returns (flags, bitmap, lanes)."""
    assert r.verdict == XDP_REDIRECT, r.verdict_name
    out = Ether(r.data)
    assert (out.dst, out.src) == (PS_MAC, PS_SW_MAC)
    assert (out[IP].dst, out[IP].src, out[UDP].dport, out[UDP].sport) == (PS_IP, PS_SW_IP, PS_PORT, wire.PORT)
    h = hdr_of(r.data)
    assert sealed(r.data), "csum of the packet sent to the PS"
    return int(h["flags"]), int(h["bitmap"]), lanes_of(r.data).tolist()


def stat_delta(dp, job, before):
    after = flat(dp.read_stats(job))
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_hash_claim_add_collision_complete_ack(dp, hash_job):
    job, gen = hash_job
    S = H_OFF + 3
    run = lambda pkt, **kw: prog_test_run(dp.ingress.fd, pkt, **kw)  # noqa: E731
    b = flat(dp.read_stats(job))
    assert run(inc(job, gen, 0, 5, [1, 2], slot=S)).verdict == XDP_DROP            # claim
    assert run(inc(job, gen, 1, 5, [10, 20], slot=S)).verdict == XDP_DROP          # add
    s = dp.read_slot(S)
    assert (s.state, s.psn, s.bitmap, s.count, list(s.lanes[:2])) == (1, 5, 0b011, 2, [11, 22])
    assert run(inc(job, gen, 1, 5, [10, 20], slot=S)).verdict == XDP_DROP          # duplicate
    assert stat_delta(dp, job, b) == {"pkts_in": 3, "consumed": 2, "drops.dup": 1}

    b = flat(dp.read_stats(job))
    flags, bitmap, lanes = to_ps(run(inc(job, gen, 0, 6, [7, 7], slot=S)))     # another psn: collision
    assert (flags, bitmap, lanes) == (wire.F_COLLISION, 0b001, [7, 7])
    assert dp.read_slot(S).psn == 5
    assert stat_delta(dp, job, b) == {"pkts_in": 1, "collisions": 1, "fallbacks": 1}

    b = flat(dp.read_stats(job))
    flags, bitmap, lanes = to_ps(run(inc(job, gen, 2, 5, [100, 200], slot=S)))   # last: sum to the PS
    assert (flags, bitmap, lanes) == (wire.F_AGGREGATE, 0b111, [111, 222])
    assert dp.read_slot(S).state == 2  # held until the ACK
    assert stat_delta(dp, job, b) == {"pkts_in": 1, "consumed": 1, "slots_completed": 1, "to_ps": 1}

    b = flat(dp.read_stats(job))
    flags, bitmap, lanes = to_ps(run(inc(job, gen, 0, 5, [1, 2], slot=S, flags=wire.F_RETRANS)))
    assert (flags, bitmap, lanes) == (wire.F_AGGREGATE | wire.F_RETRANS, 0b111, [111, 222])
    assert dp.read_slot(S).state == 2  # the complete aggregate is sent again, still held
    assert stat_delta(dp, job, b) == {"pkts_in": 1, "fallbacks": 1}

    spoof = inc(job, gen, 0, 5, [111, 222], typ=wire.T_RESULT, slot=S)          # from a worker
    b = flat(dp.read_stats(job))
    assert run(spoof, ingress_ifindex=1).verdict == XDP_DROP
    assert dp.read_slot(S).state == 2
    assert stat_delta(dp, job, b) == {"pkts_in": 1, "drops.bad_source": 1}

    b = flat(dp.read_stats(job))
    ack = inc(job, gen, 0, 5, [111, 222], typ=wire.T_RESULT, slot=S, src=PS_IP)
    r = run(ack, ingress_ifindex=1)
    assert r.verdict == XDP_REDIRECT and lanes_of(r.data).tolist() == [111, 222]
    assert dp.read_slot(S).state == 0                                              # released
    assert stat_delta(dp, job, b) == {"pkts_in": 1, "releases": 1}

    b = flat(dp.read_stats(job))                                                   # a late resend
    flags, bitmap, lanes = to_ps(run(inc(job, gen, 1, 5, [10, 20], slot=S, flags=wire.F_RETRANS)))
    assert (flags, bitmap, lanes) == (wire.F_RETRANS, 0b010, [10, 20])
    assert dp.read_slot(S).state == 0                                              # resends never claim
    assert stat_delta(dp, job, b) == {"pkts_in": 1, "fallbacks": 1}


def test_hash_result_goes_whole_only_to_the_ranks_the_workers_named(dp, hash_job):
    """INC_F_SELECT in hash mode (a reduce to a root, a reduce_scatter): the
    first contribution's mask stays in the slot, and the PS's result, which
    knows nothing of it, leaves the switch with the flag and the mask for the
    egress program to cut the lanes of the other ranks."""
    job, gen = hash_job
    S = H_OFF + 5
    run = lambda pkt, **kw: prog_test_run(dp.ingress.fd, pkt, **kw)  # noqa: E731
    sel = dict(flags=wire.F_SELECT, bitmap=0b100, slot=S)
    assert run(inc(job, gen, 0, 9, [1, 2], **sel)).verdict == XDP_DROP
    assert run(inc(job, gen, 1, 9, [1, 2], **sel)).verdict == XDP_DROP
    flags, bitmap, _ = to_ps(run(inc(job, gen, 2, 9, [1, 2], **sel)))
    assert (flags, bitmap) == (wire.F_AGGREGATE, 0b111)  # the PS sees no mask
    r = run(inc(job, gen, 0, 9, [3, 6], typ=wire.T_RESULT, slot=S, src=PS_IP, bitmap=0b111), ingress_ifindex=1)
    assert r.verdict == XDP_REDIRECT and sealed(r.data) and lanes_of(r.data).tolist() == [3, 6]
    h = hdr_of(r.data)
    assert (h["flags"] & wire.F_SELECT, h["bitmap"]) == (wire.F_SELECT, 0b100)
    # a psn claimed without a mask: its result goes whole to everyone
    assert run(inc(job, gen, 0, 10, [1], slot=S)).verdict == XDP_DROP
    r = run(inc(job, gen, 0, 10, [3], typ=wire.T_RESULT, slot=S, src=PS_IP, bitmap=0b111), ingress_ifindex=1)
    assert hdr_of(r.data)["flags"] & wire.F_SELECT == 0 and sealed(r.data)


def test_hash_resend_evicts_partial(dp, hash_job):
    job, gen = hash_job
    S = H_OFF + 5
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 7, [3, 4], slot=S)).verdict == XDP_DROP
    flags, bitmap, lanes = to_ps(prog_test_run(dp.ingress.fd, inc(job, gen, 2, 7, [9, 9], slot=S,
                                                                  flags=wire.F_RETRANS)))
    # the partial (rank 0 only) goes to the PS; the resender's own data is not added
    assert (flags, bitmap, lanes) == (wire.F_AGGREGATE | wire.F_RETRANS, 0b001, [3, 4])
    assert dp.read_slot(S).state == 0


def write_slot(dp, idx, **fields):
    import ctypes

    v = dp.pool.Leaf()
    for k, val in fields.items():
        setattr(v, k, val)
    dp.pool[ctypes.c_int(idx)] = v


def test_hash_stale_and_orphaned_slots_are_reclaimed(dp, hash_job):
    import time

    job, gen = hash_job
    S1, S2 = H_OFF + 6, H_OFF + 7
    write_slot(dp, S1, state=1, job=job, gen=gen, psn=9, bitmap=1, count=1, numel=1, claimed_ns=1)
    write_slot(dp, S2, state=1, job=21, gen=1, psn=9, bitmap=1, count=1, numel=1,
               claimed_ns=time.monotonic_ns())  # fresh, but job 21 does not exist
    b = flat(dp.read_stats(job))
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 1, 10, [5], slot=S1)).verdict == XDP_DROP
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 1, 11, [6], slot=S2)).verdict == XDP_DROP
    for idx, psn in ((S1, 10), (S2, 11)):
        s = dp.read_slot(idx)
        assert (s.job, s.psn, s.bitmap, s.state) == (job, psn, 0b010, 1)
    assert stat_delta(dp, job, b) == {"pkts_in": 2, "consumed": 2, "reclaims": 2}
    # a fresh slot of a live (job, psn) is not taken: that is a collision
    flags, _, _ = to_ps(prog_test_run(dp.ingress.fd, inc(job, gen, 0, 12, [1], slot=S1)))
    assert flags == wire.F_COLLISION


def test_hash_slot_outside_region_and_results_for_modulo_jobs(dp, hash_job):
    job, gen = hash_job
    b = flat(dp.read_stats(job))
    for slot in (H_OFF - 1, H_OFF + H_SIZE, 2**31):
        assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 1, [1], slot=slot)).verdict == XDP_DROP
    assert stat_delta(dp, job, b) == {"pkts_in": 3, "drops.bad_slot": 3}
    dp.set_job(9, offset=OFFSET, slots=SLOTS, gen=3, world=2)
    before = dp.read_stats(0)["drops"]["bad_hdr"]
    r = prog_test_run(dp.ingress.fd, inc(9, 3, 0, 0, [1], typ=wire.T_RESULT, src=PS_IP), ingress_ifindex=1)
    assert r.verdict == XDP_DROP and dp.read_stats(0)["drops"]["bad_hdr"] == before + 1


def test_hash_evict_from_ps(dp, hash_job):
    """The PS asks for a psn's partial: it comes back with its bitmap and the slot is freed;
    complete slots are left alone (their aggregate is on its way), strangers are refused."""
    job, gen = hash_job
    S = H_OFF + 2
    T_EVICT = wire.T_EVICT
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 1, 30, [5, 6], slot=S)).verdict == XDP_DROP
    evict = inc(job, gen, 0, 30, [0, 0], typ=T_EVICT, slot=S, src=PS_IP)
    b = flat(dp.read_stats(job))
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 30, [0, 0], typ=T_EVICT, slot=S),
                         ingress_ifindex=1).verdict == XDP_DROP  # not from the PS
    assert dp.read_slot(S).state == 1
    flags, bitmap, lanes = to_ps(prog_test_run(dp.ingress.fd, evict, ingress_ifindex=1))
    assert (flags, bitmap, lanes) == (wire.F_AGGREGATE, 0b010, [5, 6])
    assert dp.read_slot(S).state == 0
    assert stat_delta(dp, job, b) == {"pkts_in": 2, "drops.bad_source": 1, "evictions": 1}
    # nothing left: a second EVICT finds no partial and is dropped
    assert prog_test_run(dp.ingress.fd, evict, ingress_ifindex=1).verdict == XDP_DROP
    # a complete slot is not evicted
    for r in range(3):
        prog_test_run(dp.ingress.fd, inc(job, gen, r, 31, [1, 1], slot=S))
    assert dp.read_slot(S).state == 2
    ev31 = inc(job, gen, 0, 31, [0, 0], typ=T_EVICT, slot=S, src=PS_IP)
    assert prog_test_run(dp.ingress.fd, ev31, ingress_ifindex=1).verdict == XDP_DROP
    assert dp.read_slot(S).state == 2


@pytest.mark.parametrize("lanes", [1, 7, 8, 9, 13, 792, 797, 800])
def test_lane_counts_across_chunk_boundaries(dp, lanes):
    """The add loop works in chunks of 8 lanes plus a tail: every lane count sums exactly,
    and nothing past the packet's lanes is touched."""
    job = 30 + lanes % 50
    dp.set_job(job, offset=48, slots=8, gen=1, world=2)
    rng = np.random.default_rng(lanes)
    x = rng.integers(-2**20, 2**20, lanes, dtype=np.int32)
    y = rng.integers(-2**20, 2**20, lanes, dtype=np.int32)
    psn = lanes  # a fresh round of one of the job's slots for every case
    assert prog_test_run(dp.ingress.fd, inc(job, 1, 0, psn, x)).verdict == XDP_DROP
    r = prog_test_run(dp.ingress.fd, inc(job, 1, 1, psn, y))
    assert r.verdict == XDP_REDIRECT
    assert np.array_equal(lanes_of(r.data), x + y)
    s = dp.read_slot(48 + psn % 8)
    assert list(s.lanes[:lanes]) == (x + y).tolist()
    # a retransmission gets the stored sum back, all lanes of it
    r = prog_test_run(dp.ingress.fd, inc(job, 1, 0, psn, x))
    assert np.array_equal(lanes_of(r.data), x + y)


def test_broadcast_round_lifecycle(dp):
    """INC_F_BCAST (bpf/mode_bcast.h): the root's data claims the slot and goes
    on at once; header-only ACKs of the others release it; the last ACK leaves
    as a header-only completion to everyone; resends and late ACKs are answered
    with the completion; the next round reuses the slot."""
    job, gen, root = 41, 3, 1
    dp.set_job(job, offset=OFFSET, slots=SLOTS, gen=gen, world=3)
    dp.reset_stats(job)
    B, ACK = wire.F_BCAST, wire.F_BCAST | wire.F_NO_LANES
    data = [7, -8, 2**31 - 1]
    run = lambda pkt: prog_test_run(dp.ingress.fd, pkt)  # noqa: E731
    P = 4

    def completion(r, back):
        h = hdr_of(r.data)
        assert (h["type"], h["flags"], h["numel"], h["psn"]) == (wire.T_RESULT, ACK, 0, P)
        assert len(r.data) == 42 + wire.HDR_LEN and sealed(r.data)
        ip = IP(r.data[14:])
        words = np.frombuffer(r.data[14:34], ">u2").astype(np.uint32).sum()
        assert ip.len == 20 + 8 + wire.HDR_LEN and (words & 0xFFFF) + (words >> 16) == 0xFFFF  # IP csum valid
        assert (ip.dst == W_IP) == back  # unicast back to the sender, or broadcast to be readdressed

    b = flat(dp.read_stats(job))
    r = run(inc(job, gen, 2, P, [], numel=0, flags=ACK))           # an ACK before the data: nothing to ack
    assert r.verdict == XDP_DROP
    r = run(inc(job, gen, root, P, data, flags=B))                  # the root's data: on to everyone at once
    assert r.verdict == XDP_REDIRECT and lanes_of(r.data).tolist() == data and sealed(r.data)
    assert (hdr_of(r.data)["type"], hdr_of(r.data)["flags"]) == (wire.T_RESULT, B)
    s = dp.read_slot(OFFSET + P)
    assert (s.state, s.count, s.bitmap, s.psn) == (wire.SLOT_PARTIAL, 1, 1 << root, P)
    r = run(inc(job, gen, root, P, data, flags=B | wire.F_RETRANS))  # a resend while waiting: again to everyone
    assert r.verdict == XDP_REDIRECT and lanes_of(r.data).tolist() == data
    assert run(inc(job, gen, 0, P, [], numel=0, flags=ACK)).verdict == XDP_DROP      # rank 0's ACK: counted
    assert run(inc(job, gen, 0, P, [], numel=0, flags=ACK)).verdict == XDP_DROP      # again: a duplicate
    assert run(inc(job, gen, 2, P, [9], flags=B)).verdict == XDP_DROP                # data from a non-root
    r = run(inc(job, gen, 2, P, [], numel=0, flags=ACK))                              # the last ACK completes
    assert r.verdict == XDP_REDIRECT
    completion(r, back=False)
    s = dp.read_slot(OFFSET + P)
    assert (s.state, s.count, s.bitmap) == (wire.SLOT_COMPLETE, 3, 0b111)
    r = run(inc(job, gen, root, P, data, flags=B | wire.F_RETRANS))   # the root lost the completion
    assert r.verdict == XDP_REDIRECT
    completion(r, back=True)
    r = run(inc(job, gen, 0, P, [], numel=0, flags=ACK | wire.F_RETRANS))  # so did rank 0
    completion(r, back=True)
    r = run(inc(job, gen, root, P + SLOTS, [5], flags=B))             # the next round claims the slot
    assert r.verdict == XDP_REDIRECT and dp.read_slot(OFFSET + P).psn == P + SLOTS
    assert run(inc(job, gen, 0, P, [], numel=0, flags=ACK)).verdict == XDP_DROP      # stale now
    d = stat_delta(dp, job, b)
    assert d.get("drops.stale", 0) + d.get("drops.ahead", 0) == 2  # the early ACK, the stale one
    assert d["drops.dup"] == 2 and d["slots_completed"] == 1
    assert d["retrans_answered"] == 2 and d["consumed"] == 2, d


def test_broadcast_packets_are_checked(dp, hash_job):
    """Only a broadcast's ACK may carry no lanes, and broadcasts are modulo jobs'."""
    job, gen = 42, 1
    dp.set_job(job, offset=OFFSET, slots=SLOTS, gen=gen, world=2)
    dp.reset_stats(job)
    ACK = wire.F_BCAST | wire.F_NO_LANES
    run = lambda pkt: prog_test_run(dp.ingress.fd, pkt)  # noqa: E731
    b = flat(dp.read_stats(job))
    assert run(inc(job, gen, 0, 1, [], numel=0, flags=wire.F_BCAST)).verdict == XDP_DROP  # no lanes, no ACK flag
    assert run(inc(job, gen, 0, 1, [1], flags=ACK)).verdict == XDP_DROP                  # an ACK with lanes
    assert stat_delta(dp, job, b) == {"drops.bad_len": 2}
    hjob, hgen = hash_job
    hb = flat(dp.read_stats(hjob))
    assert run(inc(hjob, hgen, 0, 1, [1], flags=wire.F_BCAST, slot=H_OFF)).verdict == XDP_DROP
    assert stat_delta(dp, hjob, hb) == {"pkts_in": 1, "drops.bad_hdr": 1}
