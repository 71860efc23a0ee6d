import numpy as np
import pytest

from bpf import wire


def test_constants_come_from_the_header():
    text = wire.HEADER_PATH.read_text()
    assert f"#define INC_MAX_ELEMS {wire.MAX_ELEMS}" in text
    assert wire.DROP_REASONS[:3] == ["bad_hdr", "bad_len", "no_job"]
    assert len(wire.DROP_REASONS) == wire.DROP__COUNT


@pytest.mark.parametrize("n,elems", [(1, 800), (800, 800), (801, 800), (2501, 362), (7, 3)])
def test_build_packets_round_trip(n, elems):
    x = np.arange(n, dtype=np.int32) * 7 - 3
    buf, sizes = wire.build_packets(x, elems, job=12, gen=3, rank=2, psn0=2**32 - 2)
    npk = -(-n // elems)
    assert len(buf) == len(sizes) == npk
    got = []
    for i in range(npk):
        pkt = buf[i : i + 1].tobytes()[: sizes[i]]
        h = wire.HDR_STRUCT.unpack_from(pkt)
        version, typ, flags, op, job, gen, psn, slot, rank, numel, _, _ = h
        assert (version, typ, flags, op, job, gen, rank) == (wire.VERSION, wire.T_DATA, 0, wire.OP_SUM, 12, 3, 2)
        assert psn == (2**32 - 2 + i) & 0xFFFFFFFF  # wraps
        assert sizes[i] == wire.HDR_LEN + 4 * numel
        got.append(np.frombuffer(pkt, "<i4", numel, wire.HDR_LEN))
    assert np.array_equal(np.concatenate(got), x)


def test_elems_for_mtu():
    assert wire.elems_for_mtu(1500) == (1500 - 28 - wire.HDR_LEN) // 4
    assert wire.elems_for_mtu(9000) == wire.MAX_ELEMS
    assert wire.elems_for_mtu(40) == 0


def test_batchio_structs_match_the_c_layout():
    """The numpy dtypes batchio hands to sendmmsg/recvmmsg are struct iovec and
    struct mmsghdr as the C library sees them."""
    import ctypes as ct

    from hostagent import batchio

    class IOV(ct.Structure):
        _fields_ = [("base", ct.c_void_p), ("len", ct.c_size_t)]

    class MSG(ct.Structure):
        _fields_ = [("name", ct.c_void_p), ("namelen", ct.c_uint32), ("iov", ct.c_void_p),
                    ("iovlen", ct.c_size_t), ("control", ct.c_void_p), ("controllen", ct.c_size_t),
                    ("flags", ct.c_int)]

    class MMSG(ct.Structure):
        _fields_ = [("hdr", MSG), ("len", ct.c_uint)]

    assert batchio.IOVEC.itemsize == ct.sizeof(IOV)
    assert batchio.MMSGHDR.itemsize == ct.sizeof(MMSG)
    for name, c_name in (("iov", "iov"), ("iovlen", "iovlen"), ("control", "control"), ("flags", "flags")):
        assert batchio.MMSGHDR.fields[name][1] == getattr(MSG, c_name).offset
    assert batchio.MMSGHDR.fields["len"][1] == MMSG.len.offset


def test_batchio_round_trip_on_loopback():
    import socket

    from hostagent import batchio

    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.bind(("127.0.0.1", 0))
    tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx_sock.connect(rx_sock.getsockname())
    rows = np.arange(50 * 64, dtype=np.uint32).astype(np.uint8).reshape(50, 64)
    lengths = np.arange(1, 51, dtype=np.uint64)
    m = batchio.Messages(rows, lengths)
    batchio.send_msgs(tx_sock.fileno(), m.msgs, 10, 30)      # rows 10..39 in one call
    batchio.send_msgs(tx_sock.fileno(), m.subset(np.array([3, 7])))
    rx = batchio.Receiver(rx_sock.fileno(), 64, 128)
    got = []
    while len(got) < 32:
        k = rx.recv(1.0)
        assert k > 0
        got += [bytes(rx.buf[i, : rx.m.msgs["len"][i]]) for i in range(k)]
    want = [bytes(rows[i, : i + 1]) for i in list(range(10, 40)) + [3, 7]]
    assert got == want
    assert rx.recv(0.05) == 0
    rx_sock.close()
    tx_sock.close()


@pytest.mark.parametrize("start,stop", [(0, 1), (0, 45), (7, 45)])
def test_gso_outbox_sends_each_packet_once_in_order(start, stop):
    """UDP_SEGMENT datagrams of up to segments_per_send() packets, the last
    packet of the buffer shorter: the receiver gets exactly the packets."""
    import socket

    from hostagent import batchio

    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx_sock.bind(("127.0.0.1", 0))
    tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx_sock.connect(rx_sock.getsockname())
    assert batchio.gso_supported(tx_sock)
    seg = 3232
    rows = (np.arange(45 * seg, dtype=np.uint32) % 251).astype(np.uint8).reshape(45, seg)
    rows[:, :4] = np.arange(45, dtype="<u4").view(np.uint8).reshape(45, 4)
    lengths = np.full(45, seg, dtype=np.uint64)
    lengths[-1] = 100
    assert batchio.segments_per_send(seg) == 20
    batchio.GsoOutbox(rows, lengths).send(tx_sock.fileno(), start, stop)
    rx = batchio.Receiver(rx_sock.fileno(), 64, seg + 64)
    got = []
    while len(got) < stop - start:
        k = rx.recv(1.0)
        assert k > 0
        got += [bytes(rx.buf[i, : rx.m.msgs["len"][i]]) for i in range(k)]
    assert got == [bytes(rows[i, : int(lengths[i])]) for i in range(start, stop)]
    assert rx.recv(0.05) == 0
    rx_sock.close()
    tx_sock.close()


def test_fill_packets_marks_who_wants_the_lanes():
    values = np.arange(2500, dtype=np.int32)
    buf = np.empty(4, dtype=wire.packet_dtype(800))
    masks = np.array([1, 2, 6, 8], dtype=np.uint64)
    wire.fill_packets(buf, values, job=3, gen=1, rank=0, psn0=0, select=masks)
    assert np.array_equal(buf["hdr"]["bitmap"], masks) and np.all(buf["hdr"]["flags"] == wire.F_SELECT)
    wire.fill_packets(buf, values, job=3, gen=1, rank=0, psn0=0)  # a reused buffer: nothing left of it
    assert not buf["hdr"]["bitmap"].any() and not buf["hdr"]["flags"].any()
    rows = buf.view(np.uint8).reshape(4, -1)
    sizes = wire.HDR_LEN + 4 * buf["hdr"]["numel"].astype(np.int64)
    assert wire.csum_ok(rows[:4], sizes).all()  # sealed with the new header
