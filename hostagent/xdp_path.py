"""The XDP data path of a worker: contributions leave through BPF_PROG_TEST_RUN
in live-frames mode and results land in an mmapped BPF array, so no packet
crosses the socket stack (bpf/host_xdp.bpf.c says how).

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
from bpf import testrun, wire

MAX_PKTS = 8192          # packets of one reduction held at once (longer ones go in pieces)
RX_GOT, RX_OVERFLOW = 1, 2
FRAME_HDRS = 14 + 20 + 8


class XdpUnavailable(RuntimeError):
    pass


def route_to(addr: str) -> tuple[str, str]:
    """(interface, next hop) this namespace uses to reach addr (IPv4)."""
    dst = struct.unpack("<I", socket.inet_aton(addr))[0]
    best = None
    with open("/proc/net/route") as f:
        next(f)
        for line in f:
            fl = line.split()
            net, gw, mask = (int(fl[i], 16) for i in (1, 2, 7))
            if dst & mask == net and (best is None or bin(mask).count("1") > best[0]):
                best = (bin(mask).count("1"), fl[0], gw)
    if best is None:
        raise XdpUnavailable(f"no route to {addr}")
    _, dev, gw = best
    return dev, socket.inet_ntoa(struct.pack("<I", gw)) if gw else addr


def neighbour_mac(addr: str, dev: str) -> bytes:
    with open("/proc/net/arp") as f:
        next(f)
        for line in f:
            fl = line.split()
            if fl[0] == addr and fl[5] == dev and int(fl[2], 16) & 2:
                return bytes.fromhex(fl[3].replace(":", ""))
    raise XdpUnavailable(f"no neighbour entry for {addr} on {dev}")


def _mmap_array(table, entries: int, value_size: int) -> mmap.mmap:
    return mmap.mmap(table.map_fd, entries * ((value_size + 7) & ~7), mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE)


class HostMaps:
    """bpf/host_xdp.bpf.c loaded, its two programs' fds and numpy views over
    its mmapped maps (the layouts come from bcc's view of the C structs)."""

    def __init__(self, max_pkts: int = MAX_PKTS):
        from bcc import BPF

        self.max_pkts = max_pkts
        self.b = BPF(src_file=str(bpf.source("host_xdp.bpf.c")).encode(),
                     cflags=[f"-I{bpf.source_dir()}", f"-DHOST_MAX_PKTS={max_pkts}", "-w"])
        self.maps: list[mmap.mmap] = []
        try:
            self.tx_fn = self.b.load_func("host_tx", BPF.XDP)
            self.rx_fn = self.b.load_func("host_rx", BPF.XDP)
            self.tx_ctl = self._ctl("tx_ctl")
            self.rx_ctl = self._ctl("rx_ctl")
            row = ct.sizeof(self.b[b"tx_vec"].Leaf)
            self.tx_vec = self._array("tx_vec", max_pkts, row, np.int32).reshape(max_pkts, -1)
            self.rx_vec = self._array("rx_vec", max_pkts, row, np.int32).reshape(max_pkts, -1)
            self.tx_lsum = self._array("tx_lsum", max_pkts, 8, np.uint64)
            self.tx_list = self._array("tx_list", max_pkts, 8, np.uint64)
            self.rx_state = self._array("rx_state", max_pkts, 8, np.uint64)
        except BaseException:
            self.close()
            raise

    def _ctl(self, name: str) -> np.void:
        leaf = self.b[name.encode()].Leaf
        return self._array(name, 1, ct.sizeof(leaf), np.dtype(leaf))[0]

    def _array(self, name: str, entries: int, value_size: int, dtype) -> np.ndarray:
        m = _mmap_array(self.b[name.encode()], entries, value_size)
        self.maps.append(m)
        return np.frombuffer(m, dtype=dtype, count=entries * (value_size // np.dtype(dtype).itemsize))

    def close(self) -> None:
        for name in ("tx_ctl", "rx_ctl", "tx_vec", "rx_vec", "tx_lsum", "tx_list", "rx_state"):
            self.__dict__.pop(name, None)  # views first: an mmap with exports cannot close
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass
        self.maps = []
        self.b.cleanup()


class XdpPath:
    """Send and receive of one rank's reductions. Per reduction: begin() puts
    the vector into tx_vec and opens the psn range for results; send() and
    resend() emit packets; wait() sleeps until results landed or the timeout;
    state() shows what landed; result() reads the lanes."""

    def __init__(self, hm: HostMaps, dev: str, doorbell: socket.socket, *, src: tuple[str, int],
                 dst: tuple[str, int], src_mac: bytes, dst_mac: bytes):
        self.hm, self.dev, self.doorbell = hm, dev, doorbell
        self.ifindex = socket.if_nametoindex(dev)
        self.max_pkts = hm.max_pkts
        self.tx_ctl, self.rx_ctl = hm.tx_ctl, hm.rx_ctl
        self.tx_vec, self.rx_vec, self.tx_lsum = hm.tx_vec, hm.rx_vec, hm.tx_lsum
        self.tx_list, self.rx_state = hm.tx_list, hm.rx_state
        t = self.tx_ctl
        t["saddr"] = struct.unpack("<I", socket.inet_aton(src[0]))[0]
        t["daddr"] = struct.unpack("<I", socket.inet_aton(dst[0]))[0]
        t["sport"] = socket.htons(src[1])
        t["dport"] = socket.htons(dst[1])
        t["src_mac"] = np.frombuffer(src_mac, np.uint8)
        t["dst_mac"] = np.frombuffer(dst_mac, np.uint8)
        self.rx_ctl["dport"] = socket.htons(src[1])
        self.rx_ctl["npk"] = 0
        self.frame = None
        self.elems = 0
        self.npk = 0
        self.poll = select.poll()
        self.poll.register(doorbell.fileno(), select.POLLIN)
        self._drain = bytearray(65536)
        hm.b.attach_xdp(dev, hm.rx_fn, 0)
        self.attached = True

    @classmethod
    def open(cls, doorbell: socket.socket, dst: tuple[str, int]) -> "XdpPath":
        """An XdpPath for the socket's address towards dst, or XdpUnavailable."""
        if os.geteuid() != 0:
            raise XdpUnavailable("needs root (BPF programs, XDP attach)")
        try:
            import bcc  # noqa: F401
        except ImportError as e:
            raise XdpUnavailable(f"bcc is not installed ({e})") from None
        dev, hop = route_to(dst[0])
        if _has_xdp(dev):
            raise XdpUnavailable(f"{dev} already runs an XDP program (another agent on this host?)")
        src_addr = doorbell.getsockname()
        if src_addr[0] == "0.0.0.0":
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.connect(dst)
            src_addr = (probe.getsockname()[0], src_addr[1])
            probe.close()
        with open(f"/sys/class/net/{dev}/address") as f:
            src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
        dst_mac = neighbour_mac(hop, dev)
        try:
            hm = HostMaps()
        except Exception as e:
            raise XdpUnavailable(f"cannot load bpf/host_xdp.bpf.c: {e}") from None
        try:
            return cls(hm, dev, doorbell, src=src_addr, dst=dst, src_mac=src_mac, dst_mac=dst_mac)
        except Exception as e:
            hm.close()
            raise XdpUnavailable(f"cannot attach the host XDP program to {dev}: {e}") from None

    def begin(self, values: np.ndarray, *, elems: int, job: int, gen: int, rank: int, psn0: int, op: int,
              hash_region: tuple[int, int] | None) -> int:
        """Loads one reduction (at most MAX_PKTS packets); returns its packets."""
        n = values.size
        npk = max(1, -(-n // elems))
        if npk > self.max_pkts:
            raise ValueError(f"{npk} packets exceed the XDP path's {self.max_pkts}")
        tx = self.tx_vec[:npk, :elems]
        full = (npk - 1) * elems
        tx[:npk - 1] = values[:full].reshape(npk - 1, elems)
        last = n - full if n else 1
        tx[npk - 1, :last] = values[full:] if n else 0
        tx[npk - 1, last:] = 0
        self.tx_lsum[:npk] = tx.view(np.uint32).sum(axis=1, dtype=np.uint32)  # the csum wants it mod 2^32
        if elems != self.elems:
            self.frame = testrun.LiveFrames(self.hm.tx_fn.fd, bytes(FRAME_HDRS + wire.HDR_LEN + 4 * elems), self.ifindex)
            self.elems = elems
        t = self.tx_ctl
        t["psn0"], t["npk"], t["job"], t["rank"], t["op"] = psn0, npk, job, rank, op
        t["elems"], t["last_numel"] = elems, last
        t["hash_off"], t["hash_size"] = hash_region if hash_region else (0, 0)
        self.rx_state[:npk] = 0
        r = self.rx_ctl
        r["psn0"], r["npk"], r["job"], r["elems"], r["last_numel"] = psn0, npk, job, elems, last
        r["landed"] = r["corrupt"] = r["stray"] = 0
        r["wake_at"] = 1
        self.npk = npk
        return npk

    def send(self, start: int, stop: int, gen: int, flags: int = 0) -> None:
        t = self.tx_ctl
        t["runs"], t["first"], t["list_len"], t["gen"], t["flags"] = 0, start, 0, gen, flags
        self.frame.run(stop - start)

    def resend(self, idx: np.ndarray, gens: np.ndarray) -> None:
        """Packets idx again, flagged as retransmissions, each with the
        generation it was first sent with."""
        for g in np.unique(gens):
            sel = idx[gens == g]
            self.tx_list[:sel.size] = sel
            t = self.tx_ctl
            t["runs"], t["first"], t["list_len"], t["gen"], t["flags"] = 0, 0, sel.size, int(g), wire.F_RETRANS
            self.frame.run(int(sel.size))

    def counters(self) -> dict:
        r = self.rx_ctl
        return {"landed": int(r["landed"]), "corrupt": int(r["corrupt"]), "stray": int(r["stray"])}

    def landed(self) -> int:
        return int(self.rx_ctl["landed"])

    def wait(self, timeout_s: float, wake_at: int) -> None:
        """Sleeps until `wake_at` results have landed in this reduction, or the timeout."""
        r = self.rx_ctl
        r["wake_at"] = wake_at
        if int(r["landed"]) < wake_at:  # read after writing wake_at: the ring cannot be missed
            self.poll.poll(max(1, int(timeout_s * 1000)))
        self._drain_doorbell()

    def _drain_doorbell(self) -> None:
        while True:
            try:
                self.doorbell.recv_into(self._drain, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def state(self) -> np.ndarray:
        return self.rx_state[:self.npk]

    def result(self, n: int) -> np.ndarray:
        """The first n result lanes, in order (a copy)."""
        out = np.empty(n, dtype=np.int32)
        full = (self.npk - 1) * self.elems
        out[:full] = self.rx_vec[:self.npk - 1, :self.elems].reshape(-1)
        out[full:] = self.rx_vec[self.npk - 1, :n - full]
        return out

    def close(self) -> None:
        if self.attached:
            try:
                self.hm.b.remove_xdp(self.dev, 0)
            except Exception:
                pass
            self.attached = False
        for name in ("tx_ctl", "rx_ctl", "tx_vec", "rx_vec", "tx_lsum", "tx_list", "rx_state"):
            self.__dict__.pop(name, None)
        self.hm.close()


def _has_xdp(dev: str) -> bool:
    try:
        from pyroute2 import IPRoute
    except ImportError:
        return False
    with IPRoute() as ipr:
        links = ipr.link("get", ifname=dev)
        xdp = links[0].get_attr("IFLA_XDP") if links else None
        return bool(xdp and (xdp.get_attr("IFLA_XDP_PROG_ID") or 0))
