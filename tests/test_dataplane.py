"""The XDP program, loaded into the kernel, fed crafted packets with
BPF_PROG_TEST_RUN: verdict, output packet, counters and slot state per step."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from bpf_testrun import XDP_DROP, XDP_PASS, XDP_REDIRECT, prog_test_run
from hostagent import proto

W_MAC, SW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
W_IP, SW_IP = "10.77.1.2", "10.77.1.1"
W_PORT = 40000
SLOTS = 8  # region of 2W, W = 4
OFFSET = 16


@pytest.fixture(scope="module")
def dp(root):
    from incd.dataplane import Dataplane

    d = Dataplane(pool_slots=64)
    yield d
    d.close()


def inc(job, gen, rank, psn, vals, *, op=proto.OP_SUM, typ=proto.T_DATA, version=proto.VERSION,
        numel=None, cut=0, dport=proto.PORT) -> bytes:
    h = np.zeros(1, proto.HDR_DTYPE)
    vals = np.asarray(vals, dtype="<i4")
    h[0] = (version, typ, 0, op, job, gen, psn, 0, rank, len(vals) if numel is None else numel, 0, 0)
    payload = h.tobytes() + vals.tobytes()
    pkt = bytes(Ether(src=W_MAC, dst=SW_MAC) / IP(src=W_IP, dst=SW_IP)
                / UDP(sport=W_PORT, dport=dport) / Raw(payload))
    return pkt[: len(pkt) - cut] if cut else pkt


def lanes_of(out: bytes) -> np.ndarray:
    return np.frombuffer(out[42 + proto.HDR_LEN:], "<i4")


def hdr_of(out: bytes):
    return proto.parse_header(out[42:42 + proto.HDR_LEN])


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
            assert hdr_of(r.data)["type"] == proto.T_RESULT
        if st.what == "retransmission after completion":
            # unicast back out of the ingress port, addressed to the sender
            out = Ether(r.data)
            assert (out.src, out.dst) == (SW_MAC, W_MAC)
            assert (out[IP].src, out[IP].dst) == (SW_IP, W_IP)
            assert (out[UDP].sport, out[UDP].dport) == (proto.PORT, W_PORT)
            recomputed = IP(bytes(out[IP]))
            del recomputed.chksum
            assert IP(bytes(recomputed)).chksum == out[IP].chksum
            assert hdr_of(r.data)["type"] == proto.T_RESULT


def test_full_packet_and_max_op(dp):
    job, gen = 6, 1
    dp.set_job(job, offset=OFFSET + SLOTS, slots=SLOTS, gen=gen, world=2)
    rng = np.random.default_rng(1)
    x = rng.integers(-1000, 1000, proto.MAX_ELEMS, dtype=np.int32)
    y = rng.integers(-1000, 1000, proto.MAX_ELEMS, dtype=np.int32)
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 0, x)).verdict == XDP_DROP
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 0, y))
    assert r.verdict == XDP_REDIRECT
    assert np.array_equal(lanes_of(r.data), x + y)
    assert prog_test_run(dp.ingress.fd, inc(job, gen, 0, 1, x[:5], op=proto.OP_MAX)).verdict == XDP_DROP
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 1, y[:5], op=proto.OP_MAX))
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
    assert hdr_of(r.data)["flags"] & proto.F_OVERFLOW
    assert dp.read_stats(job)["overflows"] == 1
    # a clean round on the same job carries no flag
    prog_test_run(dp.ingress.fd, inc(job, gen, 0, 1, [1]))
    r = prog_test_run(dp.ingress.fd, inc(job, gen, 1, 1, [2]))
    assert r.verdict == XDP_REDIRECT and not hdr_of(r.data)["flags"] & proto.F_OVERFLOW


def test_single_worker_job_completes_at_once(dp):
    dp.set_job(8, offset=OFFSET + 3 * SLOTS, slots=SLOTS, gen=1, world=1)
    r = prog_test_run(dp.ingress.fd, inc(8, 1, 0, 0, [4, 5]))
    assert r.verdict == XDP_REDIRECT and lanes_of(r.data).tolist() == [4, 5]


NON_INC = [
    ("tcp", bytes(Ether() / IP(src=W_IP, dst=SW_IP) / TCP(sport=5, dport=proto.CTRL_PORT))),
    ("udp other port", bytes(Ether() / IP(src=W_IP, dst=SW_IP) / UDP(sport=5, dport=53) / Raw(b"x" * 40))),
    ("udp below range", bytes(Ether() / IP() / UDP(dport=proto.PORT_MIN - 1) / Raw(b"x" * 40))),
    ("udp above range", bytes(Ether() / IP() / UDP(dport=proto.PORT_MAX + 1) / Raw(b"x" * 40))),
    ("arp", bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP())),
    ("ip options", bytes(Ether() / IP(options=b"\x01\x01\x01\x01") / UDP(dport=proto.PORT) / Raw(b"x" * 40))),
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
        ("spoofed result", inc(j, g, 0, 0, good, typ=proto.T_RESULT), 0, "bad_hdr"),
        ("unknown op", inc(j, g, 0, 0, good, op=7), 0, "bad_hdr"),
        ("truncated header", inc(j, g, 0, 0, [], cut=10), 0, "bad_hdr"),
        ("old generation", inc(j, g - 1, 0, 0, good), j, "bad_gen"),
        ("rank beyond world", inc(j, g, 2, 0, good), j, "bad_rank"),
        ("numel beyond packet", inc(j, g, 0, 0, good, numel=3), j, "bad_len"),
        ("numel zero", inc(j, g, 0, 0, good, numel=0), j, "bad_len"),
        ("numel above max", inc(j, g, 0, 0, good, numel=proto.MAX_ELEMS + 1), j, "bad_len"),
        ("payload cut short", inc(j, g, 0, 0, good, cut=4), j, "bad_len"),
    ]


@pytest.mark.parametrize("what,pkt,cjob,reason", bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_packets_dropped_by_reason(dp, what, pkt, cjob, reason):
    dp.set_job(9, offset=OFFSET + 4 * SLOTS, slots=SLOTS, gen=3, world=2)
    before = dp.read_stats(cjob)["drops"]
    slot_before = dp.read_slot(OFFSET + 4 * SLOTS).count
    r = prog_test_run(dp.ingress.fd, pkt)
    assert r.verdict == XDP_DROP
    after = dp.read_stats(cjob)["drops"]
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {reason: 1}
    assert dp.read_slot(OFFSET + 4 * SLOTS).count == slot_before  # nothing aggregated
