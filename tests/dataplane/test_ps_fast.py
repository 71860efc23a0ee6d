"""The parameter server's XDP fast path (bpf/ps_fast.bpf.c) under
BPF_PROG_TEST_RUN: a complete aggregate leaves as the result, sent back the
way it came and cached where the PS's user space reads it; everything else
goes on to the PS's socket untouched."""
import socket
import struct

import numpy as np
import pytest

from bpf import wire
from bpf.testrun import XDP_PASS, XDP_TX, prog_test_run
from hostagent.ps_merge import RING, Merger

SWITCH, PS = ("10.9.5.1", wire.PORT), ("10.9.5.2", 40123)
SW_MAC, PS_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
JOB, GEN, WORLD = 9, 4, 3
FRAME_HDRS = 14 + 20 + 8


@pytest.fixture(scope="module")
def fp(root):
    from hostagent.ps_xdp import PsFastPath

    f = PsFastPath(RING)  # loaded, not attached: run with BPF_PROG_TEST_RUN
    yield f
    f.close()


@pytest.fixture
def armed(fp):
    fp.tag[:] = -1
    fp.ctl["fast"] = 0
    fp.start(port=PS[1], job=JOB, gen=GEN, world=WORLD)
    return fp


def aggregate(psn: int, lanes, *, bitmap=(1 << WORLD) - 1, job=JOB, gen=GEN, flags=wire.F_AGGREGATE,
              dport=PS[1], corrupt=False) -> bytes:
    buf, sizes = wire.build_packets(np.asarray(lanes, np.int32), len(lanes), job=job, gen=gen, rank=2,
                                    psn0=psn)
    buf["hdr"]["flags"] = flags
    buf["hdr"]["bitmap"] = bitmap
    buf["hdr"]["slot"] = 77
    wire.seal(buf, slice(None), wire.lane_sums(buf))
    inc = bytearray(buf.tobytes()[: int(sizes[0])])
    if corrupt:
        inc[-1] ^= 0x04
    udp = struct.pack("!HHHH", SWITCH[1], dport, 8 + len(inc), 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(inc), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(SWITCH[0]), socket.inet_aton(PS[0]))
    return PS_MAC + SW_MAC + b"\x08\x00" + ip + udp + bytes(inc)


def test_complete_aggregate_is_answered_and_cached(armed):
    lanes = [3, -4, 2**31 - 1, 0, 17]
    r = prog_test_run(armed.fn.fd, aggregate(100, lanes, flags=wire.F_AGGREGATE | wire.F_OVERFLOW))
    assert r.verdict == XDP_TX
    out = r.data
    assert out[0:6] == SW_MAC and out[6:12] == PS_MAC  # back to the switch
    assert out[26:30] == socket.inet_aton(PS[0]) and out[30:34] == socket.inet_aton(SWITCH[0])
    assert struct.unpack("!HH", out[34:38]) == (PS[1], SWITCH[1])
    inc = out[FRAME_HDRS:]
    h = wire.parse_header(inc)
    assert (h["type"], h["flags"], h["psn"], h["job"], h["gen"], h["slot"], h["numel"]) == \
        (wire.T_RESULT, wire.F_OVERFLOW, 100, JOB, GEN, 77, 5)
    assert list(np.frombuffer(inc[wire.HDR_LEN:], "<i4")) == lanes
    assert wire.csum_ok(np.frombuffer(inc, np.uint8)[None, :], np.array([len(inc)]))[0]
    d = 100 % RING
    assert armed.tag[d] == 100 and armed.length[d] == len(inc)
    assert bytes(armed.rows[d, :len(inc)]) == inc  # the cache holds the packet as sent
    assert armed.results == 1


def test_everything_else_goes_to_the_socket_untouched(armed):
    lanes = [1, 2, 3]
    cases = [
        aggregate(5, lanes, bitmap=0b011),              # partial: user space merges it
        aggregate(5, lanes, flags=0),                   # a single contribution (collision)
        aggregate(5, lanes, job=JOB + 1),               # another job
        aggregate(5, lanes, gen=GEN + 1),               # another registration
        aggregate(5, lanes, corrupt=True),              # csum: user space counts and drops it
        aggregate(5, lanes, dport=PS[1] + 1),           # not the PS's port
    ]
    for frame in cases:
        r = prog_test_run(armed.fn.fd, frame)
        assert r.verdict == XDP_PASS and r.data == frame
    assert armed.tag[5] == -1 and armed.results == 0


def test_a_cached_psn_is_left_to_user_space(armed):
    frame = aggregate(6, [1, 2])
    assert prog_test_run(armed.fn.fd, frame).verdict == XDP_TX
    again = aggregate(6, [1, 2], flags=wire.F_AGGREGATE | wire.F_RETRANS)
    r = prog_test_run(armed.fn.fd, again)
    assert r.verdict == XDP_PASS and r.data == again and armed.results == 1


def test_off_until_started(fp):
    fp.ctl["dport"] = 0
    frame = aggregate(7, [1])
    assert prog_test_run(fp.fn.fd, frame).verdict == XDP_PASS


def test_user_space_answers_a_resend_from_the_shared_cache(armed):
    """A worker lost the result the fast path sent: its resend reaches user
    space, which must answer from the row the program cached, not wait for
    the other ranks."""
    from hostagent.ps_xdp import result_row_view

    assert prog_test_run(armed.fn.fd, aggregate(9, [4, 5, 6])).verdict == XDP_TX
    m = Merger(JOB, GEN, WORLD, "hash", cache=(result_row_view(armed), armed.tag, armed.length))
    single = np.frombuffer(aggregate(9, [1, 1, 1], flags=wire.F_RETRANS)[FRAME_HDRS:], np.uint8)
    rows = np.zeros((1, wire.HDR_LEN + 4 * wire.MAX_ELEMS), np.uint8)
    rows[0, :single.size] = single
    out = m.feed(rows, np.array([single.size]))
    assert list(out) == [9 % RING] and m.stats.results_resent == 1 and not m.pending
    row = m.done_rows[out[0], :int(m.done_len[out[0]])]
    assert list(row[wire.HDR_LEN:].view("<i4")) == [4, 5, 6]
