"""BPF_PROG_TEST_RUN through libbpf (inside libbcc): run a loaded XDP program on
one packet in the kernel, without traffic, and get the verdict and output packet."""
from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICT_NAMES = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


class _Opts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


@dataclass
class RunResult:
    verdict: int
    data: bytes
    duration_ns: int

    @property
    def verdict_name(self) -> str:
        return VERDICT_NAMES.get(self.verdict, str(self.verdict))


class _XdpMd(ct.Structure):
    _fields_ = [(n, ct.c_uint32) for n in
                ("data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1, ingress_ifindex: int = 0) -> RunResult:
    """ingress_ifindex must name a device of this namespace (1 = lo) or be 0."""
    from bcc import libbcc

    fn = libbcc.lib.bpf_prog_test_run_opts
    fn.argtypes = [ct.c_int, ct.POINTER(_Opts)]
    fn.restype = ct.c_int
    inbuf = ct.create_string_buffer(bytes(packet), len(packet))
    outbuf = ct.create_string_buffer(len(packet) + 512)
    o = _Opts()
    o.sz = ct.sizeof(_Opts)
    o.data_in = ct.cast(inbuf, ct.c_void_p)
    o.data_size_in = len(packet)
    o.data_out = ct.cast(outbuf, ct.c_void_p)
    o.data_size_out = len(outbuf)
    o.repeat = repeat
    if ingress_ifindex:
        md = _XdpMd(data_end=len(packet), ingress_ifindex=ingress_ifindex)
        o.ctx_in = ct.cast(ct.pointer(md), ct.c_void_p)
        o.ctx_size_in = ct.sizeof(md)
    rc = fn(prog_fd, ct.byref(o))
    if rc != 0:
        raise OSError(-rc, f"BPF_PROG_TEST_RUN failed: {rc}")
    return RunResult(o.retval, outbuf.raw[: o.data_size_out], o.duration)

