"""Loads a bcc-compiled XDP program with BPF_F_XDP_HAS_FRAGS.

A veth takes an MTU above 3506 only if its XDP program declares that it
handles multi-buffer frames, and the jumbo frames (docs/design.md, "Jumbo
frames") need 64 KB. bcc 0.26 cannot pass program flags, so the bytecode bcc
compiled (its map fds already in it) is loaded here with the bpf(2) syscall.
Every XDP program of the project goes through this: programs that tail-call
each other or share a devmap must agree on the flag, and a frame that fits one
buffer behaves exactly as before.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import struct

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_XDP = 6
BPF_F_XDP_HAS_FRAGS = 1 << 5
_SYS_BPF = 321  # x86_64
_ATTR_SIZE = 144
_LOG_SIZE = 1 << 24

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def _load(insns: int, count: int, license_: int, name: bytes, attach_type: int, log: ct.Array | None) -> int:
    attr = ct.create_string_buffer(_ATTR_SIZE)
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
    # log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16],
    # prog_ifindex, expected_attach_type
    struct.pack_into("IIQQIIQII", attr, 0, BPF_PROG_TYPE_XDP, count, insns, license_,
                     1 if log is not None else 0, len(log) if log is not None else 0,
                     ct.addressof(log) if log is not None else 0, 0, BPF_F_XDP_HAS_FRAGS)
    attr[48:48 + len(name)] = name
    struct.pack_into("II", attr, 64, 0, max(attach_type, 0))
    fd = _libc.syscall(_SYS_BPF, BPF_PROG_LOAD, attr, _ATTR_SIZE)
    return fd if fd >= 0 else -ct.get_errno()


def load_xdp(b, func_name: bytes, attach_type: int = -1):
    """Loads func_name of the bcc module b as a frags-aware XDP program and
    registers it in b.funcs (so b.cleanup() closes it). Returns bcc's Function,
    usable wherever b.load_func's result is."""
    from bcc import BPF, libbcc

    lib = libbcc.lib
    if func_name in b.funcs:
        return b.funcs[func_name]
    start = lib.bpf_function_start(b.module, func_name)
    if not start:
        raise Exception(f"Unknown program {func_name.decode()}")
    size = lib.bpf_function_size(b.module, func_name)
    args = (ct.cast(start, ct.c_void_p).value, size // 8,
            ct.cast(lib.bpf_module_license(b.module), ct.c_void_p).value, func_name[:15], attach_type)
    fd = _load(*args, None)
    if fd in (-errno.EACCES, -errno.EINVAL, -errno.E2BIG):
        log = ct.create_string_buffer(_LOG_SIZE)  # again, for the verifier's reason
        fd = _load(*args, log)
        if fd < 0:
            tail = log.value.decode(errors="replace").strip().splitlines()[-25:]
            raise Exception(f"Failed to load BPF program {func_name.decode()}: {os.strerror(-fd)}\n"
                            + "\n".join(tail))
    if fd < 0:
        if fd == -errno.EPERM:
            raise Exception("Need super-user privileges to run")
        raise Exception(f"Failed to load BPF program {func_name.decode()}: {os.strerror(-fd)}")
    fn = BPF.Function(b, func_name, fd)
    b.funcs[func_name] = fn
    return fn
