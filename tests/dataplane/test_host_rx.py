"""The host's XDP receive program (bpf/host_rx.bpf.c) under BPF_PROG_TEST_RUN:
what it does with results, other traffic and damaged frames, and what it
leaves in the maps the agent reads."""
import socket
import struct

import numpy as np
import pytest

from bpf import wire
from bpf.testrun import XDP_DROP, XDP_PASS, prog_test_run
from hostagent.xdp_path import RX_BARE, RX_GOT, RX_OVERFLOW

SRC, DST = ("10.9.1.2", 40001), ("10.9.1.1", wire.PORT)
SRC_MAC, DST_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
ELEMS = 5



@pytest.fixture(scope="module")
def hm(root):
    from hostagent.xdp_path import HostMaps

    m = HostMaps(max_pkts=64)
    yield m
    m.close()


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
    assert hm.rx_state[1] == RX_GOT | (3 << 16)  # the agent's reading of the C program's bits
    # The result that makes landed reach wake_at goes up to the socket: the doorbell.
    assert prog_test_run(hm.rx_fn.fd, result_frame(13, [1, 2, 3], flags=wire.F_OVERFLOW)).verdict == XDP_PASS
    assert hm.rx_state[3] == RX_GOT | RX_OVERFLOW | (3 << 16) and int(hm.rx_ctl["landed"]) == 2
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


def test_rx_counts_a_result_without_lanes_and_copies_nothing(hm):
    """INC_F_NO_LANES: the psn is complete, its lanes went to other ranks (a
    reduce to a root, another rank's shard): counted as landed, row untouched."""
    _rx_setup(hm)
    hm.rx_vec[2, :ELEMS] = 77
    bare = bytearray(result_frame(12, [1, 2, 3, 4, 5], flags=wire.F_NO_LANES))
    inc = bare[42:42 + wire.HDR_LEN]  # the header alone, numel 0, sealed again
    inc[wire.HDR_DTYPE.fields["numel"][1]:wire.HDR_DTYPE.fields["numel"][1] + 2] = b"\0\0"
    frame = bytes(bare[:42]) + wire.seal_bytes(bytes(inc))
    assert prog_test_run(hm.rx_fn.fd, frame).verdict == XDP_DROP
    assert hm.rx_state[2] == RX_GOT | RX_BARE | (3 << 16) and int(hm.rx_ctl["landed"]) == 1
    assert np.all(hm.rx_vec[2, :ELEMS] == 77)
    # without the flag, a result with no lanes is not one of ours: passed on, not counted
    inc[wire.HDR_DTYPE.fields["flags"][1]] = 0
    assert prog_test_run(hm.rx_fn.fd, bytes(bare[:42]) + wire.seal_bytes(bytes(inc))).verdict == XDP_PASS
    assert int(hm.rx_ctl["landed"]) == 1


def test_rx_a_broadcasts_lanes_and_its_completion_both_count(hm):
    """A broadcast (INC_F_BCAST) brings a psn's lanes and later its header-only
    completion: the state keeps both (GOT from the lanes, BARE from the
    completion) in either order, and the lanes land."""
    _rx_setup(hm)

    def completion(psn):
        f = bytearray(result_frame(psn, [0], flags=wire.F_BCAST | wire.F_NO_LANES))
        inc = f[42:42 + wire.HDR_LEN]
        inc[wire.HDR_DTYPE.fields["numel"][1]:wire.HDR_DTYPE.fields["numel"][1] + 2] = b"\0\0"
        return bytes(f[:42]) + wire.seal_bytes(bytes(inc))

    lanes = [9, 8, 7, 6, 5]
    assert prog_test_run(hm.rx_fn.fd, result_frame(10, lanes, flags=wire.F_BCAST)).verdict == XDP_DROP
    assert hm.rx_state[0] == RX_GOT | (3 << 16)
    assert prog_test_run(hm.rx_fn.fd, completion(10)).verdict == XDP_DROP
    assert hm.rx_state[0] == RX_GOT | RX_BARE | (3 << 16) and np.array_equal(hm.rx_vec[0, :ELEMS], lanes)
    assert prog_test_run(hm.rx_fn.fd, completion(11)).verdict == XDP_DROP  # the other order
    assert prog_test_run(hm.rx_fn.fd, result_frame(11, lanes[::-1], flags=wire.F_BCAST)).verdict == XDP_DROP
    assert hm.rx_state[1] == RX_GOT | RX_BARE | (3 << 16) and np.array_equal(hm.rx_vec[1, :ELEMS], lanes[::-1])
    assert int(hm.rx_ctl["landed"]) == 4
    # a broadcast's data past the reduction (this rank has not opened it yet) goes up
    # to the socket for the agent to keep; any other result there is a stray
    assert prog_test_run(hm.rx_fn.fd, result_frame(15, lanes, flags=wire.F_BCAST)).verdict == XDP_PASS
    assert prog_test_run(hm.rx_fn.fd, result_frame(15, lanes)).verdict == XDP_DROP
    assert int(hm.rx_ctl["stray"]) == 1 and int(hm.rx_ctl["landed"]) == 4
