"""Link impairments (loss, reordering, rate, delay) at the host end of a lab link.

This kernel has no netem and no gact, so they are built from what it has:

* loss    -- bpf/impair.bpf.c as a tc classifier (clsact, direct action) on
             host eth0, egress and ingress, dropping IPv4 UDP at random;
* reorder -- the same egress program moves a fraction of IPv4 UDP packets into
             a slow HTB class (1:20); packets behind them in the fast class
             (1:10) overtake them;
* rate    -- host->switch: HTB class 1:10 on eth0. switch->host: the ingress
             side of eth0 redirects (u32 + mirred) to an IFB device shaped by
             HTB. Shaping has to sit at the host because the switch forwards
             with XDP_REDIRECT, which bypasses the switch port's qdisc;
* delay   -- only with netem (a leaf qdisc under the HTB classes); on a kernel
             without it `up` refuses --delay before creating anything.

Only IPv4 UDP suffers loss and reordering, so ARP, ping, TCP (ssh, control
APIs) keep working. Rate and delay apply to all traffic.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import nsutil
from .errors import LabConfigError, LabError
from .plan import parse_rate

BPF_SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "impair.bpf.c"

UNLIMITED_BPS = 100 * 10**9  # "no --rate": HTB still needs a rate for class 1:10
REORDER_SLOW_BPS = 20 * 10**6  # delays a 3 KB frame by ~1.2 ms
# tc writes class ids in hex: class "1:20" is TC_H_MAKE(1 << 16, 0x20), not minor 20.
SLOW_CLASSID = (1 << 16) | 0x20
# Leaf queues long enough that a local sender is pushed back by its socket
# buffer (it blocks) before a queue overflows, so shaping never adds loss.
QUEUE_LIMIT = 10000
IFB = "ifb0"
ETH_OVERHEAD = 14


@dataclass(frozen=True)
class Impairments:
    loss_pct: float = 0.0
    reorder_pct: float = 0.0
    rate: str | None = None
    delay_ms: float | None = None

    def __post_init__(self):
        for what, v in (("loss", self.loss_pct), ("reorder", self.reorder_pct)):
            if not isinstance(v, (int, float)) or math.isnan(v) or not 0 <= v <= 100:
                raise LabConfigError(f"{what} must be a percentage between 0 and 100 (got {v!r})")
        if self.rate is not None:
            parse_rate(self.rate)
        if self.delay_ms is not None and not (
                isinstance(self.delay_ms, (int, float)) and 0 < self.delay_ms <= 10_000):
            raise LabConfigError(f"delay must be between 0 and 10000 ms (got {self.delay_ms!r})")

    @property
    def rate_bps(self) -> int | None:
        return None if self.rate is None else parse_rate(self.rate)

    @property
    def egress_bpf(self) -> bool:
        return self.loss_pct > 0 or self.reorder_pct > 0

    @property
    def ingress_bpf(self) -> bool:
        return self.loss_pct > 0

    @property
    def shape_egress(self) -> bool:
        return self.rate is not None or self.reorder_pct > 0 or self.delay_ms is not None

    @property
    def shape_ingress(self) -> bool:
        return self.rate is not None or self.delay_ms is not None

    @property
    def any(self) -> bool:
        return self.egress_bpf or self.shape_egress

    def as_state(self) -> dict:
        return {"loss_pct": float(self.loss_pct), "reorder_pct": float(self.reorder_pct),
                "rate": self.rate, "delay_ms": self.delay_ms}

    def describe(self) -> str:
        parts = []
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}% each direction (IPv4 UDP only)")
        if self.reorder_pct:
            parts.append(f"reorder {self.reorder_pct:g}% host->switch (IPv4 UDP only)")
        if self.rate:
            parts.append(f"rate {self.rate} each direction")
        if self.delay_ms:
            parts.append(f"delay {self.delay_ms:g} ms each direction")
        return ", ".join(parts) or "none"


def netem_available() -> bool:
    """Try netem in a throwaway anonymous namespace: nothing named is created or left."""
    try:
        proc = subprocess.run(
            ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True)
    except FileNotFoundError:
        raise LabError("cannot probe for netem: unshare (util-linux) not found") from None
    return proc.returncode == 0


def check_supported(imp: Impairments) -> None:
    if imp.delay_ms is not None and not netem_available():
        raise LabError("--delay needs the netem qdisc, which this kernel lacks "
                       "(CONFIG_NET_SCH_NETEM is not set)")


class Programs:
    """The compiled impair programs; one compilation serves every host link.

    Keep this object alive until the filters are attached. Afterwards the
    filters hold the programs, so they outlive this process (nothing pinned).
    """

    def __init__(self, imp: Impairments):
        self.egress = self.ingress = None
        self._bpf = None
        if not imp.egress_bpf:
            return
        try:
            from bcc import BPF
        except ImportError:
            raise LabError("--loss/--reorder need bcc (Debian package python3-bpfcc)") from None
        if not BPF_SOURCE.exists():
            raise LabError(f"BPF source not found: {BPF_SOURCE}")
        cflags = [f"-DLOSS_PPM={round(imp.loss_pct * 10_000)}",
                  f"-DREORDER_PPM={round(imp.reorder_pct * 10_000)}",
                  f"-DSLOW_CLASSID={SLOW_CLASSID:#x}"]
        try:
            self._bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
            self.egress = self._bpf.load_func(b"impair_egress", BPF.SCHED_CLS)
            if imp.ingress_bpf:
                self.ingress = self._bpf.load_func(b"impair_ingress", BPF.SCHED_CLS)
        except Exception as e:  # bcc raises bare Exception for compile/verifier errors
            raise LabError(f"cannot load {BPF_SOURCE.name}: {e}") from None

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def _tc(ns: str, *args: str) -> None:
    nsutil.run_checked(["tc", "-n", ns, *args], f"tc {' '.join(args)} (in {ns})")


def _leaf(imp: Impairments) -> list[str]:
    if imp.delay_ms is not None:
        return ["netem", "delay", f"{imp.delay_ms:g}ms", "limit", str(QUEUE_LIMIT)]
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


def apply(ns: str, ifname: str, mtu: int, imp: Impairments, progs: Programs) -> None:
    """Install the impairments on interface `ifname` in host namespace `ns`."""
    if not imp.any:
        return
    if imp.shape_egress:
        _htb(ns, ifname, mtu, imp, slow_class=imp.reorder_pct > 0)
    if imp.egress_bpf or imp.shape_ingress:
        _tc(ns, "qdisc", "add", "dev", ifname, "clsact")
    if progs.egress is not None or progs.ingress is not None:
        with nsutil.iproute(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            for fn, parent in ((progs.egress, "ffff:fff3"), (progs.ingress, "ffff:fff2")):
                if fn is not None:
                    ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name=fn.name.decode(),
                           parent=parent, classid=1, direct_action=True, prio=1)
    if imp.shape_ingress:
        # GRO can hand ingress tc aggregates larger than the MTU, so the IFB
        # gets the largest MTU; it never sends anything onto a wire.
        nsutil.run_checked(["ip", "-n", ns, "link", "add", IFB, "mtu", "65535",
                            "txqueuelen", str(QUEUE_LIMIT), "type", "ifb"], f"create {IFB} in {ns}")
        nsutil.run_checked(["ip", "-n", ns, "link", "set", IFB, "up"])
        _htb(ns, IFB, mtu, imp, slow_class=False)
        # prio 2: after the loss program, which passes on with TC_ACT_UNSPEC
        _tc(ns, "filter", "add", "dev", ifname, "ingress", "prio", "2", "protocol", "all",
            "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", IFB)
