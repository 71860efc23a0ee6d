"""Batched UDP I/O: sendmmsg/recvmmsg through ctypes, with the message arrays
built by numpy over rows of a packet buffer, so a window of packets is one
system call and no Python runs per packet.

The struct layouts (x86_64 Linux) are written as numpy dtypes; a test checks
them against ctypes' view of the same structs.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import select
import socket

import numpy as np

_libc = ct.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint, ct.c_int]
_sendmmsg.restype = ct.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint, ct.c_int, ct.c_void_p]
_recvmmsg.restype = ct.c_int

MSG_DONTWAIT = 0x40

IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])
MMSGHDR = np.dtype([
    ("name", "<u8"), ("namelen", "<u4"), ("_p0", "<u4"),
    ("iov", "<u8"), ("iovlen", "<u8"),
    ("control", "<u8"), ("controllen", "<u8"),
    ("flags", "<i4"), ("_p1", "<u4"),
    ("len", "<u4"), ("_p2", "<u4"),
])


class Messages:
    """One mmsghdr per row of `rows` (a 2-D uint8 array that must outlive this)."""

    def __init__(self, rows: np.ndarray, lengths: np.ndarray):
        n = rows.shape[0]
        self.rows = rows
        self.iov = np.zeros(n, IOVEC)
        self.iov["base"] = rows.ctypes.data + np.arange(n, dtype=np.uint64) * rows.strides[0]
        self.iov["len"] = lengths
        self.msgs = np.zeros(n, MMSGHDR)
        self.msgs["iov"] = self.iov.ctypes.data + np.arange(n, dtype=np.uint64) * IOVEC.itemsize
        self.msgs["iovlen"] = 1

    def subset(self, idx: np.ndarray) -> np.ndarray:
        """A contiguous copy of some messages (they still point at the same rows)."""
        return np.ascontiguousarray(self.msgs[idx])


class HeaderAndLanes(Messages):
    """One mmsghdr per packet with two iovecs: its header (a row of hdr) and
    its lanes, read in place from values (contiguous int32): the kernel copies
    the vector once, into the datagrams, and nobody before. hdr and values must
    outlive this."""

    def __init__(self, hdr: np.ndarray, values: np.ndarray, elems: int, numel: np.ndarray):
        n = len(hdr)
        at = np.arange(n, dtype=np.uint64)
        self.rows = (hdr, values)
        self.iov = np.zeros(2 * n, IOVEC)
        self.iov["base"][0::2] = hdr.ctypes.data + at * hdr.strides[0]
        self.iov["len"][0::2] = hdr.dtype.itemsize
        self.iov["base"][1::2] = values.ctypes.data + at * (4 * elems)
        self.iov["len"][1::2] = numel.astype(np.uint64) * 4
        self.msgs = np.zeros(n, MMSGHDR)
        self.msgs["iov"] = self.iov.ctypes.data + at * (2 * IOVEC.itemsize)
        self.msgs["iovlen"] = 2


def _wait_writable(fd: int) -> None:
    p = select.poll()
    p.register(fd, select.POLLOUT)
    p.poll(100)


def send_msgs(fd: int, msgs: np.ndarray, start: int = 0, count: int | None = None) -> None:
    """Sends msgs[start:start+count], all of them (retrying what the socket
    buffer would not take at once)."""
    end = len(msgs) if count is None else start + count
    base = msgs.ctypes.data
    while start < end:
        n = _sendmmsg(fd, base + start * MMSGHDR.itemsize, end - start, 0)
        if n < 0:
            e = ct.get_errno()
            if e in (errno.EAGAIN, errno.EINTR, errno.ENOBUFS):
                _wait_writable(fd)
                continue
            if e == errno.ECONNREFUSED:  # an ICMP error from an earlier datagram
                continue
            raise OSError(e, os.strerror(e))
        start += n


def sockaddr_in(addr: str, port: int) -> np.ndarray:
    """struct sockaddr_in as 16 bytes."""
    b = (socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + socket.inet_aton(addr)
         + bytes(8))
    return np.frombuffer(b, dtype=np.uint8)


def send_rows(fd: int, rows: np.ndarray, names: np.ndarray) -> None:
    """Sends row i of a 2-D uint8 array (whole rows) to names[i] (a 16-byte
    sockaddr_in row each), one sendmmsg."""
    rows = np.ascontiguousarray(rows)
    names = np.ascontiguousarray(names, dtype=np.uint8)
    k = rows.shape[0]
    iov = np.zeros(k, IOVEC)
    iov["base"] = rows.ctypes.data + np.arange(k, dtype=np.uint64) * np.uint64(rows.strides[0])
    iov["len"] = rows.shape[1]
    msgs = np.zeros(k, MMSGHDR)
    msgs["iov"] = iov.ctypes.data + np.arange(k, dtype=np.uint64) * IOVEC.itemsize
    msgs["iovlen"] = 1
    msgs["name"] = names.ctypes.data + np.arange(k, dtype=np.uint64) * 16
    msgs["namelen"] = 16
    send_msgs(fd, msgs)


class Outbox:
    """Sends chosen rows of a 2-D packet buffer to each of a fixed set of
    destinations with one sendmmsg (unconnected socket)."""

    def __init__(self, rows: np.ndarray, dests: list[tuple[str, int]]):
        self.rows = rows
        self.names = np.stack([sockaddr_in(a, p) for a, p in dests])

    def send(self, fd: int, idx: np.ndarray, lens: np.ndarray) -> None:
        m = len(self.names)
        k = idx.size * m
        if not k:
            return
        row = np.repeat(idx.astype(np.uint64), m)
        iov = np.zeros(k, IOVEC)
        iov["base"] = self.rows.ctypes.data + row * np.uint64(self.rows.strides[0])
        iov["len"] = np.repeat(lens.astype(np.uint64), m)
        msgs = np.zeros(k, MMSGHDR)
        msgs["iov"] = iov.ctypes.data + np.arange(k, dtype=np.uint64) * IOVEC.itemsize
        msgs["iovlen"] = 1
        msgs["name"] = self.names.ctypes.data + np.tile(np.arange(m, dtype=np.uint64), idx.size) * 16
        msgs["namelen"] = 16
        send_msgs(fd, msgs)


class Receiver:
    """recvmmsg into a fixed buffer of `slots` rows of `maxlen` bytes; with
    addrs=True also each datagram's source (self.src_ip, self.src_port)."""

    def __init__(self, fd: int, slots: int, maxlen: int, addrs: bool = False):
        self.fd = fd
        self.buf = np.zeros((slots, maxlen), dtype=np.uint8)
        self.m = Messages(self.buf, np.full(slots, maxlen, dtype=np.uint64))
        self.addr = None
        if addrs:
            self.addr = np.zeros((slots, 16), dtype=np.uint8)
            self.m.msgs["name"] = self.addr.ctypes.data + np.arange(slots, dtype=np.uint64) * 16
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    @property
    def src_ip(self) -> np.ndarray:
        """IPv4 sources of the last batch, the address bytes read little-endian."""
        return self.addr[:, 4:8].copy().view("<u4").ravel()

    def recv(self, timeout_s: float) -> int:
        """Waits up to timeout_s for data, then takes what is there (up to the
        number of rows). Returns how many datagrams; their lengths are in
        self.m.msgs["len"][:n] and their bytes in self.buf[:n]."""
        if timeout_s >= 0.005:
            if not self.poll.poll(int(timeout_s * 1000)):
                return 0
        elif not select.select([self.fd], [], [], max(0.0, timeout_s))[0]:  # poll() counts whole ms
            return 0
        if self.addr is not None:
            self.m.msgs["namelen"] = 16
        n = _recvmmsg(self.fd, self.m.msgs.ctypes.data, len(self.m.msgs), MSG_DONTWAIT, None)
        if n < 0:
            e = ct.get_errno()
            if e in (errno.EAGAIN, errno.EINTR, errno.ECONNREFUSED):
                return 0
            raise OSError(e, os.strerror(e))
        return n


# --- UDP GSO sends -------------------------------------------------------------
# One UDP_SEGMENT datagram carries up to GSO_MAX_BYTES of equal-sized packets,
# cut into ordinary datagrams below the socket (by veth here, since the switch
# port runs XDP): the UDP stack runs once per group instead of once per packet.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_BYTES = 65535 - 20 - 8
GSO_MAX_SEGS = 64
CMSG = np.dtype([("len", "<u8"), ("level", "<i4"), ("type", "<i4"), ("data", "<u4"), ("_p", "<u4")])


def segments_per_send(seg_bytes: int) -> int:
    return max(1, min(GSO_MAX_SEGS, GSO_MAX_BYTES // seg_bytes))


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel takes UDP_SEGMENT on this socket."""
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
        return True
    except OSError:
        return False


class GsoOutbox:
    """Sends runs of consecutive rows of a packet buffer (rows of seg bytes, every
    packet full but maybe the buffer's last) as UDP_SEGMENT datagrams of up to
    segments_per_send(seg) packets each, one sendmmsg per call (connected socket)."""

    def __init__(self, rows: np.ndarray, lengths: np.ndarray):
        self.rows = rows
        self.seg = rows.strides[0]
        self.lengths = np.asarray(lengths, dtype=np.uint64)
        self.per = segments_per_send(self.seg)
        self.base = rows.ctypes.data

    def send(self, fd: int, start: int, stop: int) -> None:
        """Packets [start, stop)."""
        if stop <= start:
            return
        firsts = np.arange(start, stop, self.per, dtype=np.uint64)
        k = firsts.size
        lasts = np.minimum(firsts + np.uint64(self.per), np.uint64(stop))
        nbytes = (lasts - firsts - np.uint64(1)) * np.uint64(self.seg) + self.lengths[(lasts - np.uint64(1)).astype(np.int64)]
        iov = np.zeros(k, IOVEC)
        iov["base"] = np.uint64(self.base) + firsts * np.uint64(self.seg)
        iov["len"] = nbytes
        cmsg = np.zeros(k, CMSG)
        cmsg["len"] = 16 + 2
        cmsg["level"], cmsg["type"], cmsg["data"] = SOL_UDP, UDP_SEGMENT, self.seg
        msgs = np.zeros(k, MMSGHDR)
        msgs["iov"] = iov.ctypes.data + np.arange(k, dtype=np.uint64) * IOVEC.itemsize
        msgs["iovlen"] = 1
        msgs["control"] = cmsg.ctypes.data + np.arange(k, dtype=np.uint64) * CMSG.itemsize
        msgs["controllen"] = CMSG.itemsize
        send_msgs(fd, msgs)
