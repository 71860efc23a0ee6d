"""The XDP receive path of a worker: results land in an mmapped BPF array
without crossing the socket stack (bpf/host_rx.bpf.c says how), and the agent
sleeps on its UDP socket until a doorbell frame says enough have landed.

One XdpPath per agent process; it needs root, bcc and the host's veth free of
other XDP programs. `XdpPath.open()` raises XdpUnavailable with the reason when
any of that is missing, and the caller falls back to the socket path.
"""
from __future__ import annotations

import ctypes as ct
import mmap
import os
import select
import socket
import struct

import numpy as np

import bpf
from bpf import wire
from bpf.xdp_load import load_xdp

MAX_PKTS = 8192          # packets of one reduction held at once (longer ones go in pieces)
RX_GOT, RX_OVERFLOW, RX_BARE = 1, 2, 4  # rx_state bits, as HOST_RX_* in bpf/host_rx.bpf.c (test_host_rx.py checks them)
BPF_XDP = 37  # enum bpf_attach_type


class XdpUnavailable(RuntimeError):
    pass


def route_to(addr: str) -> str:
    """The interface this namespace uses to reach addr (IPv4)."""
    dst = struct.unpack("<I", socket.inet_aton(addr))[0]
    best = None
    with open("/proc/net/route") as f:
        next(f)
        for line in f:
            fl = line.split()
            net, mask = int(fl[1], 16), int(fl[7], 16)
            if dst & mask == net and (best is None or bin(mask).count("1") > best[0]):
                best = (bin(mask).count("1"), fl[0])
    if best is None:
        raise XdpUnavailable(f"no route to {addr}")
    return best[1]


class HostMaps:
    """bpf/host_rx.bpf.c loaded: the program's fd and numpy views over its
    mmapped maps (the layouts come from bcc's view of the C structs)."""

    def __init__(self, max_pkts: int = MAX_PKTS, jumbo_pkts: int = 0):
        from bcc import BPF

        self.max_pkts, self.jumbo_pkts = max_pkts, jumbo_pkts
        self.b = BPF(src_file=str(bpf.source("host_rx.bpf.c")).encode(),
                     cflags=[f"-I{bpf.source_dir()}", f"-DHOST_MAX_PKTS={max_pkts}",
                             f"-DHOST_JUMBO_PKTS={max(1, jumbo_pkts)}", "-w"])
        self.maps: list[mmap.mmap] = []
        try:
            self.rx_fn = load_xdp(self.b, b"host_rx")
            leaf = self.b[b"rx_ctl"].Leaf
            self.rx_ctl = self._array("rx_ctl", 1, ct.sizeof(leaf), np.dtype(leaf))[0]
            row = ct.sizeof(self.b[b"rx_vec"].Leaf)
            self.rx_vec = self._array("rx_vec", max_pkts, row, np.int32).reshape(max_pkts, -1)
            self.rx_state = self._array("rx_state", max_pkts, 8, np.uint64)
            if jumbo_pkts:
                row = ct.sizeof(self.b[b"rx_jumbo"].Leaf)
                self.rx_jumbo = self._array("rx_jumbo", jumbo_pkts, row, np.int32).reshape(jumbo_pkts, -1)
            # The bell ring buffer: poll() on its fd; consumed by moving the
            # consumer position (page 0) to the producer's (page 1).
            self.bell_fd = self.b[b"bell"].map_fd
            self.bell_cons = mmap.mmap(self.bell_fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE)
            self.bell_prod = mmap.mmap(self.bell_fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ,
                                       offset=mmap.PAGESIZE)
            self.maps += [self.bell_cons, self.bell_prod]
        except BaseException:
            self.close()
            raise

    def _array(self, name: str, entries: int, value_size: int, dtype) -> np.ndarray:
        return mmap_array(self.b, name, entries, value_size, dtype, self.maps)

    def close(self) -> None:
        close_maps(self, ("rx_ctl", "rx_vec", "rx_state", "rx_jumbo"))

    def hush_bell(self) -> None:
        """Consumes every record of the bell (their content does not matter)."""
        self.bell_cons[0:8] = self.bell_prod[0:8]


class XdpPath:
    """Results of one rank's reductions. Per reduction: begin() opens its psn
    range; wait() sleeps until results landed or the timeout; state() shows
    what landed; rx_vec holds the lanes (rx_jumbo those of jumbo results)."""

    def __init__(self, hm: HostMaps, dev: str, doorbell: socket.socket):
        self.hm, self.dev, self.doorbell = hm, dev, doorbell
        self.max_pkts = hm.max_pkts
        self.rx_ctl, self.rx_vec, self.rx_state = hm.rx_ctl, hm.rx_vec, hm.rx_state
        self.jumbo_pkts = hm.jumbo_pkts
        self.rx_jumbo = getattr(hm, "rx_jumbo", None)
        self.rx_ctl["dport"] = socket.htons(doorbell.getsockname()[1])
        self.rx_ctl["npk"] = 0
        self.elems = 0
        self.npk = 0
        self.poll = select.poll()
        self.poll.register(doorbell.fileno(), select.POLLIN)
        self.poll.register(hm.bell_fd, select.POLLIN)
        self._drain = bytearray(65536)
        self.early = None  # where broadcast data that came too soon is kept (Session.early)
        self.link_fd = _xdp_link(hm.rx_fn.fd, socket.if_nametoindex(dev))

    @classmethod
    def open(cls, doorbell: socket.socket, toward: str, jumbo_pkts: int = 0) -> "XdpPath":
        """Loads host_rx and attaches it to the interface that leads to
        `toward` (the switch), or raises XdpUnavailable saying why.
        jumbo_pkts: rows for jumbo results (64 KB each; 0: none)."""
        dev = free_veth(toward, " (another agent on this host?)")
        try:
            hm = HostMaps(jumbo_pkts=jumbo_pkts)
        except Exception as e:
            raise XdpUnavailable(f"cannot load bpf/host_rx.bpf.c: {e}") from None
        try:
            return cls(hm, dev, doorbell)
        except Exception as e:
            hm.close()
            raise XdpUnavailable(f"cannot attach the host XDP program to {dev}: {e}") from None

    def begin(self, *, npk: int, elems: int, last_numel: int, job: int, psn0: int, jumbo: bool = False,
              chain_end: bool = False) -> None:
        """Opens a reduction of npk packets from psn0: results before it are
        stale now, and nothing of an earlier reduction is left in the state.
        jumbo: its results are jumbo frames (chain_end: this rank is the last
        of their chain)."""
        if npk > (self.jumbo_pkts if jumbo else self.max_pkts):
            raise ValueError(f"{npk} packets exceed the XDP path's {self.jumbo_pkts if jumbo else self.max_pkts}")
        r = self.rx_ctl
        r["npk"] = 0  # closed while its state is cleared
        self.rx_state[:npk] = 0
        r["landed"] = r["corrupt"] = r["stray"] = 0
        r["wake_at"] = 1
        r["psn0"], r["job"], r["elems"], r["last_numel"] = psn0, job, elems, last_numel
        r["jumbo"], r["chain_end"] = int(jumbo), int(chain_end)
        r["npk"] = npk
        self.npk, self.elems = npk, elems

    def landed(self) -> int:
        return int(self.rx_ctl["landed"])

    def wait(self, timeout_s: float, wake_at: int) -> None:
        """Sleeps until `wake_at` results have landed in this reduction, or the timeout."""
        r = self.rx_ctl
        r["wake_at"] = wake_at
        if int(r["landed"]) < wake_at:  # read after writing wake_at: the bell cannot be missed
            self.poll.poll(max(1, int(timeout_s * 1000)))
        self.hm.hush_bell()
        while True:
            try:
                n = self.doorbell.recv_into(self._drain, 0, socket.MSG_DONTWAIT)
            except OSError:  # EAGAIN: drained; an ICMP error from an earlier send: nothing to read
                return
            if self.early is not None and is_bcast_data(self._drain, n):
                self.early.append(bytes(self._drain[:n]))

    def state(self) -> np.ndarray:
        return self.rx_state[:self.npk]

    def close(self) -> None:
        if self.link_fd is not None:
            os.close(self.link_fd)  # detaches host_rx
            self.link_fd = None
        for name in ("rx_ctl", "rx_vec", "rx_state"):
            self.__dict__.pop(name, None)
        self.hm.close()


def is_bcast_data(buf, n: int) -> bool:
    """Whether a datagram is a broadcast's data (a RESULT with INC_F_BCAST and lanes)."""
    if n < wire.HDR_LEN:
        return False
    h = wire.parse_header(bytes(buf[:wire.HDR_LEN]))
    return (h["type"] == wire.T_RESULT and
            int(h["flags"]) & (wire.F_BCAST | wire.F_NO_LANES) == wire.F_BCAST)


def free_veth(toward: str, hint: str = "") -> str:
    """The interface towards `toward` (the switch), if a host XDP program can
    go there: root, bcc, and no XDP program on it yet; else XdpUnavailable."""
    if os.geteuid() != 0:
        raise XdpUnavailable("needs root (BPF programs, XDP attach)")
    try:
        import bcc  # noqa: F401  (only whether it is there)
    except ImportError as e:
        raise XdpUnavailable(f"bcc is not installed ({e})") from None
    dev = route_to(toward)
    if _has_xdp(dev):
        raise XdpUnavailable(f"{dev} already runs an XDP program{hint}")
    return dev


def close_maps(obj, views: tuple) -> None:
    """Drops obj's numpy views (an mmap with exports cannot close), closes its
    mmaps (obj.maps) and its bcc module (obj.b)."""
    for name in views:
        obj.__dict__.pop(name, None)
    for m in obj.maps:
        try:
            m.close()
        except BufferError:
            pass
    obj.maps = []
    obj.b.cleanup()


def mmap_array(b, name: str, entries: int, value_size: int, dtype, maps: list) -> np.ndarray:
    """A numpy view over BPF_F_MMAPABLE array `name` of bcc module b; the mmap
    goes into maps (close it after dropping every view)."""
    table = b[name.encode()]
    m = mmap.mmap(table.map_fd, entries * ((value_size + 7) & ~7), mmap.MAP_SHARED,
                  mmap.PROT_READ | mmap.PROT_WRITE)
    maps.append(m)
    return np.frombuffer(m, dtype=dtype, count=entries * (value_size // np.dtype(dtype).itemsize))


def _xdp_link(prog_fd: int, ifindex: int) -> int:
    """Attaches an XDP program through a BPF link: it never replaces a program
    already there (another agent's, another tool's: EBUSY), and it goes away
    with this process, also when the process is killed."""
    from bcc import libbcc

    fn = libbcc.lib.bpf_link_create
    fn.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    fn.restype = ct.c_int
    fd = fn(prog_fd, ifindex, BPF_XDP, None)
    if fd < 0:
        raise OSError(-fd, f"XDP link: {os.strerror(-fd)}")
    return fd


def _has_xdp(dev: str) -> bool:
    try:
        from pyroute2 import IPRoute
    except ImportError:
        return False  # the attach below still refuses to replace a program
    with IPRoute() as ipr:
        links = ipr.link("get", ifname=dev)
        xdp = links[0].get_attr("IFLA_XDP") if links else None
        return bool(xdp and (xdp.get_attr("IFLA_XDP_PROG_ID") or 0))
