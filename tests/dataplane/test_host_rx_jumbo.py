"""host_rx's jumbo branch (bpf/host_rx.bpf.c, host_rx_jumbo) under
BPF_PROG_TEST_RUN with real 64 KB multi-buffer frames: a result lands in its
rx_jumbo row and goes back to the switch for the next rank, or ends here; a
damaged one goes nowhere; one outside the reduction still goes on; the bell
rings when the agent's mark is reached."""
import socket
import struct

import numpy as np
import pytest

from bpf import wire
from bpf.testrun import XDP_DROP, XDP_PASS, XDP_TX, prog_test_run
from hostagent.xdp_path import RX_GOT, RX_OVERFLOW

HOST, SWITCH = ("10.9.1.2", 40001), ("10.9.1.1", wire.PORT)
HOST_MAC, SW_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
E, SUBS = wire.JUMBO_ELEMS, wire.JUMBO_SUBS
PSN0 = 100


@pytest.fixture(scope="module")
def hm(root):
    from hostagent.xdp_path import HostMaps

    m = HostMaps(max_pkts=64, jumbo_pkts=4)
    yield m
    m.close()


def jresult(psn: int, lanes, *, job=7, gen=3, flags=0, flip_byte=None) -> bytes:
    """A jumbo result as the switch sends it to this host."""
    lanes = np.asarray(lanes, np.int32)
    h = np.zeros(1, wire.HDR_DTYPE)
    h[0] = (wire.VERSION, wire.T_JRESULT, flags, wire.OP_SUM, job, gen, psn, 0, 1, lanes.size, 0, 0)
    inc = bytearray(wire.seal_bytes(h.tobytes() + lanes.tobytes()))
    if flip_byte is not None:
        inc[flip_byte] ^= 0x10
    udp = struct.pack("!HHHH", SWITCH[1], HOST[1], 8 + len(inc), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(inc), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(SWITCH[0]), socket.inet_aton(HOST[0]))
    return HOST_MAC + SW_MAC + b"\x08\x00" + ip + udp + bytes(inc)


def setup(hm, *, npk=3, last=E // 2, wake_at=0, chain_end=0):
    r = hm.rx_ctl
    r["npk"] = 0
    r["dport"], r["job"], r["psn0"], r["elems"], r["last_numel"] = socket.htons(HOST[1]), 7, PSN0, E, last
    r["landed"] = r["corrupt"] = r["stray"] = 0
    r["wake_at"], r["jumbo"], r["chain_end"] = wake_at, 1, chain_end
    hm.rx_state[:npk] = 0
    hm.rx_jumbo[:npk] = 0
    r["npk"] = npk


def bell_records(hm) -> int:
    """Bytes produced into the bell ring buffer so far, minus those consumed."""
    prod = struct.unpack("<Q", hm.bell_prod[0:8])[0]
    cons = struct.unpack("<Q", hm.bell_cons[0:8])[0]
    return prod - cons


def lanes(seed: int, n: int = E) -> np.ndarray:
    return np.random.default_rng(seed).integers(-(2**30), 2**30, n, dtype=np.int32)


def test_a_result_lands_and_goes_back_to_the_switch(hm):
    setup(hm, wake_at=2)
    hm.hush_bell()
    a = lanes(1)
    r = prog_test_run(hm.rx_fn.fd, jresult(PSN0 + SUBS, a))
    assert r.verdict == XDP_TX
    assert np.array_equal(hm.rx_jumbo[1], a) and hm.rx_state[1] == RX_GOT | (3 << 16)
    # Sent back from this host's address and port, so the switch's source check passes.
    ip = r.data[14:34]
    assert socket.inet_ntoa(ip[12:16]) == HOST[0] and socket.inet_ntoa(ip[16:20]) == SWITCH[0]
    assert struct.unpack("!HH", r.data[34:38]) == (HOST[1], SWITCH[1])
    assert r.data[42:] == jresult(PSN0 + SUBS, a)[42:]  # the INC part untouched
    assert bell_records(hm) == 0
    # The short last frame, overflow flagged: the agent's mark is reached, the bell rings.
    b = lanes(2, E // 2)
    assert prog_test_run(hm.rx_fn.fd, jresult(PSN0 + 2 * SUBS, b, flags=wire.F_OVERFLOW)).verdict == XDP_TX
    assert np.array_equal(hm.rx_jumbo[2, :E // 2], b) and hm.rx_state[2] == RX_GOT | RX_OVERFLOW | (3 << 16)
    assert int(hm.rx_ctl["landed"]) == 2 and bell_records(hm) > 0
    hm.hush_bell()
    assert bell_records(hm) == 0


def test_the_chain_ends_at_the_last_rank_and_at_a_resend_answer(hm):
    setup(hm, chain_end=1)
    assert prog_test_run(hm.rx_fn.fd, jresult(PSN0, lanes(3))).verdict == XDP_DROP
    assert hm.rx_state[0] & RX_GOT
    setup(hm)
    r = prog_test_run(hm.rx_fn.fd, jresult(PSN0, lanes(4), flags=wire.F_RETRANS))
    assert r.verdict == XDP_DROP and hm.rx_state[0] & RX_GOT


def test_damaged_results_stop_and_strays_go_on(hm):
    setup(hm)
    bad = jresult(PSN0, lanes(5), flip_byte=wire.HDR_LEN + 4 * 12345)
    assert prog_test_run(hm.rx_fn.fd, bad).verdict == XDP_DROP  # not passed on to the next rank either
    assert int(hm.rx_ctl["corrupt"]) == 1 and hm.rx_state[0] == 0
    # Outside this reduction (before psn0, past npk, not on a frame boundary, wrong
    # length): not landed, but the ranks after this one may still need it.
    for psn, n in ((PSN0 - SUBS, E), (PSN0 + 3 * SUBS, E), (PSN0 + 1, E), (PSN0, E - 1)):
        assert prog_test_run(hm.rx_fn.fd, jresult(psn, lanes(6, n))).verdict == XDP_TX
    assert int(hm.rx_ctl["stray"]) == 4 and int(hm.rx_ctl["landed"]) == 0 and not hm.rx_state[:3].any()
    # Another job's result, or this one's while the agent is not in a jumbo reduce.
    assert prog_test_run(hm.rx_fn.fd, jresult(PSN0, lanes(7), job=8)).verdict == XDP_PASS
    hm.rx_ctl["jumbo"] = 0
    assert prog_test_run(hm.rx_fn.fd, jresult(PSN0, lanes(7))).verdict == XDP_TX
    assert int(hm.rx_ctl["landed"]) == 0
