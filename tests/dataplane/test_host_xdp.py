"""The host side of the XDP data path (bpf/host_xdp.bpf.c) under
BPF_PROG_TEST_RUN: what host_tx writes into a frame, and what host_rx does
with results, other traffic and damaged frames."""
import socket
import struct

import numpy as np
import pytest

from bpf import wire
from bpf.testrun import XDP_DROP, XDP_PASS, XDP_TX, prog_test_run

SRC, DST = ("10.9.1.2", 40001), ("10.9.1.1", wire.PORT)
SRC_MAC, DST_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
ELEMS = 5


@pytest.fixture(scope="module")
def hm(root):
    from hostagent.xdp_path import HostMaps

    m = HostMaps(max_pkts=64)
    yield m
    m.close()


def _tx_setup(hm, values, *, npk, last, gen=3, hash_size=0):
    t = hm.tx_ctl
    t["saddr"] = struct.unpack("<I", socket.inet_aton(SRC[0]))[0]
    t["daddr"] = struct.unpack("<I", socket.inet_aton(DST[0]))[0]
    t["sport"], t["dport"] = socket.htons(SRC[1]), socket.htons(DST[1])
    t["src_mac"], t["dst_mac"] = np.frombuffer(SRC_MAC, np.uint8), np.frombuffer(DST_MAC, np.uint8)
    t["psn0"], t["npk"], t["job"], t["rank"], t["op"], t["gen"] = 2**32 - 1, npk, 7, 2, wire.OP_SUM, gen
    t["elems"], t["last_numel"] = ELEMS, last
    t["hash_off"], t["hash_size"] = (100, hash_size) if hash_size else (0, 0)
    hm.tx_vec[:npk, :ELEMS] = values
    hm.tx_lsum[:npk] = values.astype(np.int32).view(np.uint32).sum(axis=1, dtype=np.uint32)


def _run_tx(hm, *, first=0, lst=None, flags=0):
    t = hm.tx_ctl
    t["runs"], t["first"], t["flags"] = 0, first, flags
    t["list_len"] = 0 if lst is None else len(lst)
    if lst is not None:
        hm.tx_list[:len(lst)] = lst
    frame = bytes(14 + 20 + 8 + wire.HDR_LEN + 4 * ELEMS)
    return prog_test_run(hm.tx_fn.fd, frame)


def _split(frame: bytes):
    eth, ip, udp, inc = frame[:14], frame[14:34], frame[34:42], frame[42:]
    return eth, ip, udp, inc


@pytest.mark.parametrize("hash_size", [0, 50])
def test_tx_writes_a_whole_data_packet(hm, hash_size):
    vals = np.arange(3 * ELEMS, dtype=np.int32).reshape(3, ELEMS) * -7 + 1
    vals[2, 2:] = 0
    _tx_setup(hm, vals, npk=3, last=2, hash_size=hash_size)
    for i in range(3):
        r = _run_tx(hm, first=i)
        assert r.verdict == XDP_TX
        numel = 2 if i == 2 else ELEMS
        assert len(r.data) == 42 + wire.HDR_LEN + 4 * numel
        eth, ip, udp, inc = _split(r.data)
        assert eth[:6] == DST_MAC and eth[6:12] == SRC_MAC and eth[12:14] == b"\x08\x00"
        assert socket.inet_ntoa(ip[12:16]) == SRC[0] and socket.inet_ntoa(ip[16:20]) == DST[0]
        assert ip[9] == socket.IPPROTO_UDP and struct.unpack("!H", ip[2:4])[0] == len(r.data) - 14
        words = struct.unpack("!10H", ip)
        assert (sum(words) + (sum(words) >> 16)) & 0xFFFF == 0xFFFF  # IP checksum valid
        assert struct.unpack("!HHH", udp[:6]) == (SRC[1], DST[1], 8 + len(inc))
        h = wire.parse_header(inc[:wire.HDR_LEN])
        assert (h["version"], h["type"], h["job"], h["gen"], h["rank"], h["numel"]) == (
            wire.VERSION, wire.T_DATA, 7, 3, 2, numel)
        psn = (2**32 - 1 + i) & 0xFFFFFFFF
        assert h["psn"] == psn
        want_slot = int(wire.hash_slots(7, np.array([psn]), 100, 50)[0]) if hash_size else 0
        assert h["slot"] == want_slot
        assert np.array_equal(np.frombuffer(inc[wire.HDR_LEN:], "<i4"), vals[i, :numel])
        row = np.frombuffer(inc, np.uint8)[None, :]
        assert wire.csum_ok(row, np.array([len(inc)]))[0]


def test_tx_list_mode_resends_flagged(hm):
    vals = np.ones((4, ELEMS), dtype=np.int32)
    _tx_setup(hm, vals, npk=4, last=ELEMS)
    r = _run_tx(hm, lst=[2], flags=wire.F_RETRANS)
    h = wire.parse_header(_split(r.data)[3][:wire.HDR_LEN])
    assert r.verdict == XDP_TX and h["psn"] == 1 and h["flags"] == wire.F_RETRANS
    hm.tx_ctl["runs"] = 1  # past the list's end: nothing to send
    frame = bytes(14 + 20 + 8 + wire.HDR_LEN + 4 * ELEMS)
    assert prog_test_run(hm.tx_fn.fd, frame).verdict == XDP_DROP


def result_frame(psn: int, lanes, *, job=7, gen=3, dport=SRC[1], flags=0, corrupt=False) -> bytes:
    buf, sizes = wire.build_packets(np.asarray(lanes, np.int32), len(lanes), job=job, gen=gen, rank=0, psn0=psn)
    buf["hdr"]["type"] = wire.T_RESULT
    buf["hdr"]["flags"] = flags
    wire.seal(buf, slice(None), wire.lane_sums(buf))
    inc = bytearray(buf.tobytes()[: int(sizes[0])])
    if corrupt:
        inc[-1] ^= 0x10
    udp = struct.pack("!HHHH", wire.PORT, dport, 8 + len(inc), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(inc), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(DST[0]), socket.inet_aton(SRC[0]))
    return SRC_MAC + DST_MAC + b"\x08\x00" + ip + udp + bytes(inc)


def _rx_setup(hm, npk=4, last=3, wake_at=0):
    r = hm.rx_ctl
    r["dport"], r["job"], r["psn0"], r["npk"], r["elems"], r["last_numel"] = socket.htons(SRC[1]), 7, 10, npk, ELEMS, last
    r["landed"] = r["corrupt"] = r["stray"] = 0
    r["wake_at"] = wake_at
    hm.rx_state[:npk] = 0
    hm.rx_vec[:npk] = 0


def test_rx_lands_results_and_rings_once(hm):
    _rx_setup(hm, wake_at=2)
    lanes = [5, -6, 7, 8, 9]
    assert prog_test_run(hm.rx_fn.fd, result_frame(11, lanes)).verdict == XDP_DROP
    assert np.array_equal(hm.rx_vec[1, :ELEMS], lanes)
    assert hm.rx_state[1] == 1 | (3 << 16)
    # The result that makes landed reach wake_at goes up to the socket: the doorbell.
    assert prog_test_run(hm.rx_fn.fd, result_frame(13, [1, 2, 3], flags=wire.F_OVERFLOW)).verdict == XDP_PASS
    assert hm.rx_state[3] == 1 | 2 | (3 << 16) and int(hm.rx_ctl["landed"]) == 2
    assert prog_test_run(hm.rx_fn.fd, result_frame(10, lanes)).verdict == XDP_DROP


def test_rx_drops_damaged_and_stray_results_and_passes_the_rest(hm):
    _rx_setup(hm)
    assert prog_test_run(hm.rx_fn.fd, result_frame(11, [1, 2, 3, 4, 5], corrupt=True)).verdict == XDP_DROP
    assert int(hm.rx_ctl["corrupt"]) == 1 and hm.rx_state[1] == 0
    assert prog_test_run(hm.rx_fn.fd, result_frame(9, [1, 2, 3, 4, 5])).verdict == XDP_DROP  # before psn0
    assert prog_test_run(hm.rx_fn.fd, result_frame(14, [1, 2, 3, 4, 5])).verdict == XDP_DROP  # past npk
    assert int(hm.rx_ctl["stray"]) == 2
    assert prog_test_run(hm.rx_fn.fd, result_frame(11, [1, 2, 3, 4, 5], dport=999)).verdict == XDP_PASS
    assert prog_test_run(hm.rx_fn.fd, result_frame(11, [1, 2, 3, 4, 5], job=8)).verdict == XDP_PASS
    assert prog_test_run(hm.rx_fn.fd, result_frame(11, [1, 2, 3])).verdict == XDP_PASS  # wrong numel
    assert int(hm.rx_ctl["landed"]) == 0 and not hm.rx_state[:4].any()
