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


class Receiver:
    """recvmmsg into a fixed buffer of `slots` rows of `maxlen` bytes."""

    def __init__(self, fd: int, slots: int, maxlen: int):
        self.fd = fd
        self.buf = np.zeros((slots, maxlen), dtype=np.uint8)
        self.m = Messages(self.buf, np.full(slots, maxlen, dtype=np.uint64))
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def recv(self, timeout_s: float) -> int:
        """Waits up to timeout_s for data, then takes what is there (up to the
        number of rows). Returns how many datagrams; their lengths are in
        self.m.msgs["len"][:n] and their bytes in self.buf[:n]."""
        if not self.poll.poll(max(0, int(timeout_s * 1000))):
            return 0
        n = _recvmmsg(self.fd, self.m.msgs.ctypes.data, len(self.m.msgs), MSG_DONTWAIT, None)
        if n < 0:
            e = ct.get_errno()
            if e in (errno.EAGAIN, errno.EINTR, errno.ECONNREFUSED):
                return 0
            raise OSError(e, os.strerror(e))
        return n
