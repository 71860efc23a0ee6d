"""Link impairments (loss, duplication, corruption, reordering, delay, jitter,
rate) at the host end of a lab link.

This kernel has no netem, no gact and no fq, so they are built from what it
has (bpf/impair.bpf.c explains the BPF side):

* loss, dup, corrupt -- bpf/impair.bpf.c as a tc classifier (clsact, direct
             action) on host eth0, egress and ingress: random drop; a copy
             sent again with bpf_clone_redirect(); one random bit of the UDP
             payload flipped (the INC header's csum must catch it);
* reorder -- the same egress program moves a fraction of IPv4 UDP packets into
             a slow HTB class (1:20); packets behind them in the fast class
             (1:10) overtake them. With a delay line, those packets are held
             REORDER_EXTRA_MS longer in it instead;
* delay, jitter -- a delay line on IFB device DELAY_IFB (fixed ifindex
             DELAY_IFINDEX): u32 + mirred after the classifier send each IPv4
             packet there, into an HTB class of its own that a primer packet,
             sent just before it, has emptied of tokens for exactly the
             packet's delay (uniform in [delay - jitter, delay + jitter],
             at least 0);
* rate    -- host->switch: HTB class 1:10 on eth0. switch->host: the ingress
             side of eth0 redirects (u32 + mirred) to an IFB device shaped by
             HTB. Shaping has to sit at the host because the switch forwards
             with XDP_REDIRECT, which bypasses the switch port's qdisc.

Loss, dup, corrupt and reorder hit IPv4 UDP only, so ARP, ping, TCP (ssh,
control APIs) keep working. Delay and jitter apply to all IPv4 (ping shows
them), rate to all traffic. Rate cannot be combined with delay or jitter:
switch->host traffic can pass through only one IFB, and the primers would
count against the rate.

Counters (packets seen, lost, copied, corrupted, reordered, held, and the
total delay) live in the programs' `stats` map: read_counters() finds it
through the filter on a host's eth0, so nothing is pinned and nothing is left
behind when the namespaces go.

This file is longer than most (~480 lines) because each fault is a few tc
commands whose order matters across the others (clsact before HTB, IFB before
mirred, the primer before the delay line); kept together they read as one plan.
"""

from __future__ import annotations

import ctypes as ct
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import bpf

from . import nsutil
from .errors import LabConfigError, LabError
from .plan import parse_rate

BPF_SOURCE = bpf.source("impair.bpf.c")

UNLIMITED_BPS = 100 * 10**9  # "no --rate": HTB still needs a rate for class 1:10
REORDER_SLOW_BPS = 20 * 10**6  # delays a 3 KB frame by ~1.2 ms
# tc writes class ids in hex: class "1:20" is TC_H_MAKE(1 << 16, 0x20), not minor 20.
SLOW_CLASSID = (1 << 16) | 0x20
# Leaf queues long enough that a local sender is pushed back by its socket
# buffer (it blocks) before a queue overflows, so shaping never adds loss.
QUEUE_LIMIT = 10000
IFB = "ifb0"
ETH_OVERHEAD = 14

# The delay line (see bpf/impair.bpf.c).
DELAY_IFB = "ifbd"
DELAY_IFINDEX = 4000      # the same in every host namespace: the program is shared
DELAY_MAJOR = 2           # HTB handle 2:, classes 2:1 .. 2:DELAY_CLASSES (hex minors)
DELAY_CLASSES = 1024      # a class per packet in the line at once
PRIMER_MIN, PRIMER_MAX = 64, 8192  # primer bytes: the delay's resolution is max/min
REORDER_EXTRA_MS = 2.0
MAX_DELAY_MS = 1000.0

# Counter names, in the order of the enum in bpf/impair.bpf.c.
COUNTERS = ("udp", "lost", "dup", "corrupt", "reorder", "delayed", "delay_us_sum",
            "undelayed", "primer_err")
DIRS = ("egress", "ingress")


def _pct_ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) \
        and 0 <= v <= 100


def _ms_ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) \
        and 0 < v <= MAX_DELAY_MS


@dataclass(frozen=True)
class Impairments:
    loss_pct: float = 0.0
    reorder_pct: float = 0.0
    rate: str | None = None
    delay_ms: float | None = None
    dup_pct: float = 0.0
    corrupt_pct: float = 0.0
    jitter_ms: float | None = None

    def __post_init__(self):
        for what, v in (("loss", self.loss_pct), ("reorder", self.reorder_pct),
                        ("dup", self.dup_pct), ("corrupt", self.corrupt_pct)):
            if not _pct_ok(v):
                raise LabConfigError(f"{what} must be a percentage between 0 and 100 (got {v!r})")
        if self.rate is not None:
            parse_rate(self.rate)
        for what, v in (("delay", self.delay_ms), ("jitter", self.jitter_ms)):
            if v is not None and not _ms_ok(v):
                raise LabConfigError(
                    f"{what} must be more than 0 and at most {MAX_DELAY_MS:g} ms (got {v!r})")
        if self.rate is not None and self.delay_line:
            raise LabConfigError(
                "--delay/--jitter cannot be combined with --rate: switch->host traffic can pass "
                "through one IFB only (this kernel has no netem to do both in one qdisc)")

    @property
    def rate_bps(self) -> int | None:
        return None if self.rate is None else parse_rate(self.rate)

    @property
    def delay_line(self) -> bool:
        return self.delay_ms is not None or self.jitter_ms is not None

    @property
    def delay_max_ms(self) -> float:
        """Longest time the delay line holds a packet."""
        return ((self.delay_ms or 0.0) + (self.jitter_ms or 0.0)
                + (REORDER_EXTRA_MS if self.reorder_pct > 0 else 0.0))

    @property
    def delay_bps(self) -> int:
        """Rate of the delay line's classes, bytes/s: a PRIMER_MAX primer holds delay_max_ms."""
        return max(1, round(PRIMER_MAX / (self.delay_max_ms / 1000)))

    @property
    def egress_bpf(self) -> bool:
        return (self.loss_pct > 0 or self.reorder_pct > 0 or self.dup_pct > 0
                or self.corrupt_pct > 0 or self.delay_line)

    @property
    def ingress_bpf(self) -> bool:
        return self.loss_pct > 0 or self.dup_pct > 0 or self.corrupt_pct > 0 or self.delay_line

    @property
    def shape_egress(self) -> bool:
        return self.rate is not None or (self.reorder_pct > 0 and not self.delay_line)

    @property
    def shape_ingress(self) -> bool:
        return self.rate is not None

    @property
    def any(self) -> bool:
        return self.egress_bpf or self.shape_egress

    def as_state(self) -> dict:
        """The state file's "impair": the first four keys always, the others when set."""
        st = {"loss_pct": float(self.loss_pct), "reorder_pct": float(self.reorder_pct),
              "rate": self.rate, "delay_ms": self.delay_ms}
        if self.dup_pct:
            st["dup_pct"] = float(self.dup_pct)
        if self.corrupt_pct:
            st["corrupt_pct"] = float(self.corrupt_pct)
        if self.jitter_ms is not None:
            st["jitter_ms"] = self.jitter_ms
        return st

    @classmethod
    def from_state(cls, st: dict) -> "Impairments":
        return cls(st.get("loss_pct", 0.0), st.get("reorder_pct", 0.0), st.get("rate"),
                   st.get("delay_ms"), st.get("dup_pct", 0.0), st.get("corrupt_pct", 0.0),
                   st.get("jitter_ms"))

    def describe(self) -> str:
        parts = []
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}% each direction (IPv4 UDP only)")
        if self.dup_pct:
            parts.append(f"dup {self.dup_pct:g}% each direction (IPv4 UDP only)")
        if self.corrupt_pct:
            parts.append(f"corrupt {self.corrupt_pct:g}% each direction (one bit of the IPv4 UDP "
                         "payload)")
        if self.reorder_pct:
            how = (f"held {REORDER_EXTRA_MS:g} ms longer" if self.delay_line
                   else "through a slow class")
            parts.append(f"reorder {self.reorder_pct:g}% host->switch, {how} (IPv4 UDP only)")
        if self.rate:
            parts.append(f"rate {self.rate} each direction")
        if self.delay_line:
            d, j = self.delay_ms or 0.0, self.jitter_ms or 0.0
            if j:
                parts.append(f"delay {max(0.0, d - j):g}..{d + j:g} ms uniform each direction "
                             "(IPv4)")
            else:
                parts.append(f"delay {d:g} ms each direction (IPv4)")
        return ", ".join(parts) or "none"


class Programs:
    """The compiled impair programs; one compilation serves every host link.

    Keep this object alive until the filters are attached. Afterwards the
    filters hold the programs, so they outlive this process (nothing pinned).
    """

    def __init__(self, imp: Impairments):
        self.egress = self.ingress = self.primer = None
        self._bpf = None
        if not imp.egress_bpf:
            return
        try:
            from bcc import BPF
        except ImportError:
            raise LabError("--loss/--dup/--corrupt/--reorder/--delay/--jitter need bcc "
                           "(Debian package python3-bpfcc)") from None
        if not BPF_SOURCE.exists():
            raise LabError(f"BPF source not found: {BPF_SOURCE}")
        cflags = [f"-DLOSS_PPM={round(imp.loss_pct * 10_000)}",
                  f"-DREORDER_PPM={round(imp.reorder_pct * 10_000)}",
                  f"-DDUP_PPM={round(imp.dup_pct * 10_000)}",
                  f"-DCORRUPT_PPM={round(imp.corrupt_pct * 10_000)}",
                  f"-DSLOW_CLASSID={SLOW_CLASSID:#x}"]
        if imp.delay_line:
            cflags += [f"-DDELAY_NS={round((imp.delay_ms or 0) * 1e6)}ull",
                       f"-DJITTER_NS={round((imp.jitter_ms or 0) * 1e6)}ull",
                       f"-DREORDER_EXTRA_NS={round(REORDER_EXTRA_MS * 1e6)}ull",
                       f"-DDELAY_IFINDEX={DELAY_IFINDEX}", f"-DDELAY_MAJOR={DELAY_MAJOR:#x}",
                       f"-DDELAY_CLASSES={DELAY_CLASSES}", f"-DDELAY_BPS={imp.delay_bps}ull",
                       f"-DPRIMER_MIN={PRIMER_MIN}", f"-DPRIMER_MAX={PRIMER_MAX}"]
        try:
            self._bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
            self.egress = self._bpf.load_func(b"impair_egress", BPF.SCHED_CLS)
            if imp.ingress_bpf:
                self.ingress = self._bpf.load_func(b"impair_ingress", BPF.SCHED_CLS)
            if imp.delay_line:
                self.primer = self._bpf.load_func(b"impair_primer", BPF.SCHED_CLS)
        except Exception as e:  # bcc raises bare Exception for compile/verifier errors
            raise LabError(f"cannot load {BPF_SOURCE.name}: {e}") from None

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def _tc(ns: str, *args: str) -> None:
    nsutil.run_checked(["tc", "-n", ns, *args], f"tc {' '.join(args)} (in {ns})")


def _leaf(imp: Impairments) -> list[str]:
    return ["pfifo", "limit", str(QUEUE_LIMIT)]


def _htb_class(ns, dev, parent, classid, bps, burst, quantum):
    _tc(ns, "class", "add", "dev", dev, "parent", parent, "classid", classid, "htb",
        "rate", f"{bps}bit", "ceil", f"{bps}bit", "burst", f"{burst}b", "cburst", f"{burst}b",
        "quantum", str(quantum))


def _htb(ns: str, dev: str, mtu: int, imp: Impairments, slow_class: bool) -> None:
    """root 1: htb default 10; 1:1 caps the total; 1:10 fast; 1:20 slow (reordering)."""
    frame = mtu + ETH_OVERHEAD
    bps = imp.rate_bps or UNLIMITED_BPS
    burst = max(4 * frame, bps // 8 // 1000)  # ~1 ms at rate, at least a few frames
    quantum = 2 * frame  # explicit: the r2q default is out of range at high rates
    _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
    _htb_class(ns, dev, "1:", "1:1", bps, burst, quantum)
    _htb_class(ns, dev, "1:1", "1:10", bps, burst, quantum)
    _tc(ns, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", *_leaf(imp))
    if slow_class:
        # No burst: apart from the first one after an idle period, every slow
        # packet waits for its own serialization time at the slow rate, small
        # packets included, while the fast class sends what came after it.
        slow = min(REORDER_SLOW_BPS, bps // 4)
        _htb_class(ns, dev, "1:1", "1:20", slow, 1, quantum)
        _tc(ns, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", *_leaf(imp))


def _ifb(ns: str, name: str, *extra: str) -> None:
    # GRO can hand ingress tc aggregates larger than the MTU, so an IFB gets
    # the largest MTU; it never sends anything onto a wire.
    nsutil.run_checked(["ip", "-n", ns, "link", "add", name, *extra, "mtu", "65535",
                        "txqueuelen", str(QUEUE_LIMIT), "type", "ifb"], f"create {name} in {ns}")
    nsutil.run_checked(["ip", "-n", ns, "link", "set", name, "up"])


def _redirect_to(ns: str, ifname: str, hook: str, ifb: str) -> None:
    # prio 2: after the impair program, which passes on with TC_ACT_UNSPEC
    _tc(ns, "filter", "add", "dev", ifname, hook, "prio", "2", "protocol", "all",
        "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb)


def _attach(ipr, idx: int, fn, parent: str) -> None:
    ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name=fn.name.decode(),
           parent=parent, classid=1, direct_action=True, prio=1)


def _delay_line(ns: str, mtu: int, imp: Impairments, progs: Programs) -> None:
    """IFB DELAY_IFB: HTB 2: with a parent class 2:ffff that always lends, and
    under it the ring of DELAY_CLASSES classes that hold the packets
    (unclassified packets go straight through: HTB's direct queue);
    impair_primer on its egress hook.

    A ring class has ceil delay_bps (the primer's cost is the delay) and a
    rate of 1 byte/s, so it is never "can send" on its own and HTB serves all
    of them through the parent, round robin in class id order, resuming after
    the last class served: the order in which the program handed out the
    classes, so packets with the same delay never overtake each other, also
    across the ring's wrap. (Served from the root row instead, HTB starts over
    at the lowest class id whenever no class above the last one is waiting.)
    A huge quantum keeps HTB's DRR from moving the round-robin position.
    """
    _ifb(ns, DELAY_IFB, "index", str(DELAY_IFINDEX))
    bits = imp.delay_bps * 8
    frame = mtu + ETH_OVERHEAD
    dev, major = DELAY_IFB, f"{DELAY_MAJOR:x}"
    # The stab makes HTB account a packet's length as it is when it reaches the
    # qdisc, after impair_primer cut it; without one, the length at the start of
    # dev_queue_xmit counts. tc sends no stab for "overhead 0", hence -1 byte.
    lines = [f"qdisc add dev {dev} root handle {major}: stab overhead -1 "
             f"htb default 0 direct_qlen {QUEUE_LIMIT}",
             f"class add dev {dev} parent {major}: classid {major}:ffff htb rate {UNLIMITED_BPS}bit "
             f"ceil {UNLIMITED_BPS}bit burst {64 * frame}b cburst {64 * frame}b quantum {2 * frame}"]
    lines += [f"class add dev {dev} parent {major}:ffff classid {major}:{k:x} htb rate 8bit "
              f"ceil {bits}bit burst 1b cburst 1b quantum {1 << 30}"
              for k in range(1, DELAY_CLASSES + 1)]
    lines.append(f"qdisc add dev {dev} clsact")
    proc = subprocess.run(["tc", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"tc: cannot build the delay line in {ns}: {msg[-1] if msg else proc.returncode}")
    with nsutil.iproute(ns) as ipr:
        _attach(ipr, DELAY_IFINDEX, progs.primer, "ffff:fff3")
    _warm_up(ns)


# Two frames per ring class, sent with AF_PACKET on the IFB (SO_PRIORITY picks
# the class). The first is the class's one service "on its own" (it then owes
# 60 s at 1 byte/s: HTB's cap), the second its first through the parent, where
# HTB's DRR moves the round-robin position once, for a class's first packet;
# after this, HTB's position only follows the packets. The IFB drops both
# (skb_iif 0); the script returns when all are dropped.
_WARM_UP = r"""
import socket, sys, time
dev, major, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def dropped():
    with open(f"/sys/class/net/{dev}/statistics/rx_dropped") as f:
        return int(f.read())
base = dropped()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
frame = b"\xff" * 6 + b"\x02" + b"\x00" * 5 + b"\x88\xb5" + bytes(46)
for k in range(1, n + 1):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, (major << 16) | k)
    s.send(frame)
    s.send(frame)
deadline = time.monotonic() + timeout
while dropped() - base < 2 * n:
    if time.monotonic() > deadline:
        sys.exit(f"delay line warm-up: {dropped() - base} of {2 * n} frames through")
    time.sleep(0.005)
"""


def _warm_up(ns: str, timeout: float = 10.0) -> None:
    nsutil.check(ns, [sys.executable, "-c", _WARM_UP, DELAY_IFB, str(DELAY_MAJOR),
                      str(DELAY_CLASSES), str(timeout)], "warm up the delay line")


def apply(ns: str, ifname: str, mtu: int, imp: Impairments, progs: Programs) -> None:
    """Install the impairments on interface `ifname` in host namespace `ns`."""
    if not imp.any:
        return
    if imp.shape_egress:
        _htb(ns, ifname, mtu, imp, slow_class=imp.reorder_pct > 0 and not imp.delay_line)
    if imp.delay_line:
        _delay_line(ns, mtu, imp, progs)
    if imp.egress_bpf or imp.shape_ingress:
        _tc(ns, "qdisc", "add", "dev", ifname, "clsact")
    if progs.egress is not None or progs.ingress is not None:
        with nsutil.iproute(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            for fn, parent in ((progs.egress, "ffff:fff3"), (progs.ingress, "ffff:fff2")):
                if fn is not None:
                    _attach(ipr, idx, fn, parent)
    if imp.shape_ingress:
        _ifb(ns, IFB)
        _htb(ns, IFB, mtu, imp, slow_class=False)
        _redirect_to(ns, ifname, "ingress", IFB)
    if imp.delay_line:
        for hook in ("egress", "ingress"):
            _redirect_to(ns, ifname, hook, DELAY_IFB)


# --- counters ----------------------------------------------------------------

class _ProgInfo(ct.Structure):
    # the head of struct bpf_prog_info (include/uapi/linux/bpf.h), up to map_ids
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64)]


class _MapInfo(ct.Structure):
    # the head of struct bpf_map_info, up to name
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16)]


def _prog_id(ns: str, ifname: str) -> int | None:
    """Id of the impair program on ifname's egress hook, None if there is none."""
    try:
        out = subprocess.run(["tc", "-n", ns, "-j", "filter", "show", "dev", ifname, "egress"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for f in json.loads(out or "[]"):
        opts = f.get("options") or {}
        if f.get("kind") == "bpf" and str(opts.get("bpf_name", "")).startswith("impair_"):
            prog = opts.get("prog") or {}
            if "id" in prog:
                return int(prog["id"])
    return None


def _stats_map_fd(lib, prog_id: int) -> int:
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise LabError(f"cannot open BPF program {prog_id} (root needed)")
    try:
        ids = (ct.c_uint32 * 8)()
        info = _ProgInfo(nr_map_ids=8, map_ids=ct.addressof(ids))
        size = ct.c_uint32(ct.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
            raise LabError(f"cannot read BPF program {prog_id}'s maps")
        for mid in ids[:min(info.nr_map_ids, 8)]:
            mfd = lib.bpf_map_get_fd_by_id(mid)
            if mfd < 0:
                continue
            minfo = _MapInfo()
            msize = ct.c_uint32(ct.sizeof(minfo))
            if lib.bpf_obj_get_info_by_fd(mfd, ct.byref(minfo), ct.byref(msize)) == 0 \
                    and minfo.name == b"stats":
                return mfd
            os.close(mfd)
    finally:
        os.close(fd)
    raise LabError(f"BPF program {prog_id} has no stats map")


def read_counters(state: dict) -> dict:
    """The impair programs' counters per host: {host: {"egress": {...}, "ingress": {...}}}.

    Empty when the lab has no impair program. Needs root (bpf syscalls)."""
    hosts = state["hosts"]
    prog = next((p for h in hosts if (p := _prog_id(h["netns"], h["ifname"])) is not None), None)
    if prog is None:
        return {}
    from bcc import libbcc
    lib = libbcc.lib
    fd = _stats_map_fd(lib, prog)
    try:
        out = {}
        key, val = ct.c_uint32(), ct.c_uint64()
        for h in hosts:
            octet = int(h["addr"].split(".")[2])
            per = {}
            for d, dname in enumerate(DIRS):
                vals = {}
                for c, cname in enumerate(COUNTERS):
                    key.value = (octet * 2 + d) * len(COUNTERS) + c
                    if lib.bpf_lookup_elem(fd, ct.byref(key), ct.byref(val)) != 0:
                        raise LabError("cannot read the impair counters")
                    vals[cname] = val.value
                per[dname] = vals
            out[h["name"]] = per
        return out
    finally:
        os.close(fd)
