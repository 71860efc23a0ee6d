"""The parameter server's XDP fast path (hash mode): complete aggregates are
turned into results, cached and sent back on the PS's veth, without the
socket stack (bpf/ps_fast.bpf.c says how). The result cache is shared: the
program and the PS's Merger (ps_merge.py) write into the same mmapped rows,
so user space answers resends of results it never saw.

`PsFastPath.open()` raises XdpUnavailable with the reason when root, bcc or a
free veth is missing; the PS then serves everything from its socket.
"""
from __future__ import annotations

import ctypes as ct
import os
import socket

import numpy as np

import bpf
from bpf import wire
from bpf.xdp_load import load_xdp

from .xdp_path import XdpUnavailable, _xdp_link, close_maps, free_veth, mmap_array

ROW_BYTES = 4096  # PS_ROW_BYTES in bpf/ps_fast.bpf.c


class PsFastPath:
    """ps_fast loaded and attached. rows (ring x ROW_BYTES bytes), tag and
    length (ring each) are the result cache; ctl the control word."""

    def __init__(self, ring: int):
        from bcc import BPF

        self.ring, self.dev = ring, None
        self.maps: list = []
        self.link_fd: int | None = None
        self.b = BPF(src_file=str(bpf.source("ps_fast.bpf.c")).encode(),
                     cflags=[f"-I{bpf.source_dir()}", f"-DPS_RING={ring}", "-w"])
        try:
            self.fn = load_xdp(self.b, b"ps_fast")
            leaf = self.b[b"ps_ctl"].Leaf
            self.ctl = self._array("ps_ctl", 1, ct.sizeof(leaf), np.dtype(leaf))[0]
            self.rows = self._array("ps_rows", ring, ROW_BYTES, np.uint8).reshape(ring, ROW_BYTES)
            done = self._array("ps_done", ring, 16, np.int64).reshape(ring, 2)
            self.tag, self.length = done[:, 0], done[:, 1]
            self.tag[:] = -1
            self.ctl["dport"] = 0
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, ring: int, toward: str) -> "PsFastPath":
        """Compiles and loads ps_fast (about a second: before the PS registers,
        so that no aggregate waits on it) and attaches it to the interface that
        leads to `toward` (the switch), or raises XdpUnavailable saying why."""
        dev = free_veth(toward)
        try:
            fp = cls(ring)
        except Exception as e:
            raise XdpUnavailable(f"cannot load bpf/ps_fast.bpf.c: {e}") from None
        try:
            fp.link_fd = _xdp_link(fp.fn.fd, socket.if_nametoindex(dev))
        except OSError as e:
            fp.close()
            raise XdpUnavailable(f"cannot attach bpf/ps_fast.bpf.c to {dev}: {e}") from None
        fp.dev = dev
        return fp

    def start(self, *, port: int, job: int, gen: int, world: int) -> None:
        """Takes complete aggregates of this job from now on (the cache must be
        in use by the Merger before)."""
        c = self.ctl
        c["job"], c["gen"], c["all_bits"] = job, gen, (1 << world) - 1
        c["dport"] = socket.htons(port)

    @property
    def results(self) -> int:
        return int(self.ctl["fast"])

    def _array(self, name: str, entries: int, value_size: int, dtype) -> np.ndarray:
        return mmap_array(self.b, name, entries, value_size, dtype, self.maps)

    def close(self) -> None:
        if self.link_fd is not None:
            os.close(self.link_fd)  # detaches ps_fast
            self.link_fd = None
        close_maps(self, ("ctl", "rows", "tag", "length"))


def result_row_view(fp: PsFastPath) -> np.ndarray:
    """The cache rows as the Merger indexes them: header and MAX_ELEMS lanes."""
    return fp.rows[:, :wire.HDR_LEN + 4 * wire.MAX_ELEMS]
