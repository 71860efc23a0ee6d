"""The lab: a switch namespace and host namespaces joined by veth pairs.

    with Lab("t1", workers=2, loss_pct=5) as lab:      # up on enter, down on exit
        lab.run("h1", ["ip", "-4", "addr"], check=True)

    {name}-sw          switch: p1..pN (+ pps), 10.77.{i}.1/24, forwards IPv4
    {name}-h{i}        host i: eth0 10.77.{i}.2/24, default route via 10.77.{i}.1
    {name}-ps          parameter server (optional), i = 100

With racks=R >= 2 the hosts are split rack by rack (contiguous, the PS in
rack 1) over leaf switches {name}-leaf1..leafR, each joined to {name}-spine
through a bridge in {name}-ls{k} (see fabric.py):

    {name}-leaf{k}     p{i} for the rack's hosts, up 10.76.{k}.2/24, default via the spine
    {name}-ls{k}       bridge br0 with ports a (leaf) and b (spine; spine faults here)
    {name}-spine       l{k} 10.76.{k}.1/24, routes 10.77.{i}.0/24 via 10.76.{k}.2

The lab is described by its state file (see state.py); incd reads it to find
the switch ports, and Lab.load() attaches to a lab some other process made.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

from . import fabric, impair, nsutil, plan
from . import state as statefile
from .errors import LabConfigError, LabError
from .impair import Impairments
from .state import state_path

__all__ = ["Lab", "LabError", "LabConfigError", "state_path", "teardown", "status",
           "require_root"]

_NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}
_ROUTER = {"net.ipv4.ip_forward": 1,
           "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("must run as root: namespaces, veths and tc need CAP_NET_ADMIN (try sudo)")


class Lab:
    def __init__(self, name: str = "inc", workers: int = 2, ps: bool = False,
                 mtu: int = plan.MTU_DEFAULT, rate: str | None = None,
                 loss_pct: float = 0.0, reorder_pct: float = 0.0,
                 delay_ms: float | None = None, dup_pct: float = 0.0,
                 corrupt_pct: float = 0.0, jitter_ms: float | None = None, *,
                 racks: int = 1, spine_rate: str | None = None, spine_loss_pct: float = 0.0):
        plan.validate_name(name)
        if isinstance(workers, bool) or not isinstance(workers, int) \
                or not 1 <= workers <= plan.MAX_WORKERS:
            raise LabConfigError(f"workers must be between 1 and {plan.MAX_WORKERS} (got {workers!r})")
        if isinstance(mtu, bool) or not isinstance(mtu, int) \
                or not plan.MTU_MIN <= mtu <= plan.MTU_MAX:
            raise LabConfigError(
                f"mtu must be between {plan.MTU_MIN} and {plan.MTU_MAX} (got {mtu!r})")
        plan.validate_racks(racks, workers)
        self.name, self.workers, self.ps, self.mtu = name, workers, bool(ps), mtu
        self.racks = racks
        self.impair = Impairments(loss_pct, reorder_pct,
                                  None if rate is None else str(rate).strip().lower(), delay_ms,
                                  dup_pct, corrupt_pct, jitter_ms)
        self.spine_impair = _spine_impairments(racks, spine_rate, spine_loss_pct)
        hosts = plan.hosts(name, workers, self.ps, racks)
        self._state = {
            "name": name,
            "switch_netns": plan.switch_netns(name, racks),
            "mtu": mtu,
            "impair": self.impair.as_state(),
            "hosts": hosts,
            "racks": racks,
            "switches": plan.switches(name, hosts, racks),
            "spine_impair": None if self.spine_impair is None else self.spine_impair.as_state(),
        }
        self._procs: list[subprocess.Popen] = []

    # -- description -------------------------------------------------------

    @property
    def state(self) -> dict:
        """The state-file dict (valid before up(), too: it is computed from the parameters)."""
        return self._state

    @property
    def hosts(self) -> list[str]:
        return [h["name"] for h in self._state["hosts"]]

    @property
    def switches(self) -> list[dict]:
        """The state's switch entries: "sw" alone, or leaf1..leafR and "spine"."""
        return plan.switches_of(self._state)

    def host(self, host: str) -> dict:
        for h in self._state["hosts"]:
            if h["name"] == host:
                return h
        sws = self.switches
        names = [plan.SWITCH] if len(sws) == 1 else [
            *(s["name"] for s in sws), *(plan.mid_name(s["rack"]) for s in sws if s["uplink"])]
        raise LabError(f"unknown host {host!r}; lab {self.name!r} has: "
                       + ", ".join([*names, *self.hosts]))

    def netns(self, host: str) -> str:
        """Namespace of a host ("h1", "ps"), of a switch ("sw": the switch, or
        the spine of a lab with racks; "leaf1", "spine") or of the middle
        namespace of leaf k's spine link ("ls1")."""
        if host in (plan.SWITCH, "switch"):
            return self._state["switch_netns"]
        for sw in self.switches:
            if sw["name"] == host:
                return sw["netns"]
            if sw["uplink"] and plan.mid_name(sw["rack"]) == host:
                return sw["uplink"]["mid_netns"]
        return self.host(host)["netns"]

    def addr(self, host: str) -> str:
        return self.host(host)["addr"]

    # -- running programs inside ---------------------------------------------

    def run(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside the host's namespace."""
        return subprocess.run(nsutil.ns_argv(self.netns(host), argv), **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen(argv) inside the host's namespace; down() kills it if still running."""
        proc = subprocess.Popen(nsutil.ns_argv(self.netns(host), argv), **kwargs)
        self._procs.append(proc)
        return proc

    # -- lifecycle ----------------------------------------------------------

    def exists(self) -> bool:
        return statefile.state_path(self.name).exists() or bool(_lab_netns(self.name))

    def up(self) -> Lab:
        require_root()
        if self.exists():
            raise LabError(f"lab {self.name!r} already exists; run "
                           f"`inc-lab --name {self.name} down` first")
        progs = impair.Programs(self.impair)  # compile errors surface before anything exists
        spine_progs = None
        try:
            if self.spine_impair is not None:
                # compiled with the spine's own fault rates
                spine_progs = impair.Programs(self.spine_impair)
            self._build(progs, spine_progs)
            statefile.write(self._state)
        except BaseException:
            teardown(self.name)
            raise
        finally:
            progs.close()
            if spine_progs is not None:
                spine_progs.close()
        return self

    def down(self) -> list[str]:
        """Remove the lab (namespaces and state file); returns the namespaces removed."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()
        return teardown(self.name)[0]

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc) -> bool:
        self.down()
        return False

    @classmethod
    def load(cls, name: str = "inc") -> Lab:
        """Attach to a lab that is up, from its state file."""
        plan.validate_name(name)
        st = statefile.read(name)
        if st is None:
            raise LabError(f"lab {name!r} is not up (no {state_path(name)})")
        imp = Impairments.from_state(st.get("impair", {}))
        spine = st.get("spine_impair")
        spine = Impairments.from_state(spine) if spine else Impairments()
        lab = cls(name, workers=sum(h["role"] == "worker" for h in st["hosts"]),
                  ps=any(h["role"] == "ps" for h in st["hosts"]), mtu=st["mtu"],
                  rate=imp.rate, loss_pct=imp.loss_pct, reorder_pct=imp.reorder_pct,
                  delay_ms=imp.delay_ms, dup_pct=imp.dup_pct, corrupt_pct=imp.corrupt_pct,
                  jitter_ms=imp.jitter_ms, racks=st.get("racks", 1), spine_rate=spine.rate,
                  spine_loss_pct=spine.loss_pct)
        lab._state = st
        return lab

    # -- construction -----------------------------------------------------

    def _build(self, progs: impair.Programs, spine_progs: impair.Programs | None) -> None:
        hosts, mtu = self._state["hosts"], self.mtu
        switches = self.switches
        routers = [s["netns"] for s in switches]
        mids = [s["uplink"]["mid_netns"] for s in switches if s["uplink"]]
        for ns in [*routers, *mids, *(h["netns"] for h in hosts)]:
            nsutil.create(ns)
            # before any veth exists, so new interfaces inherit the defaults
            nsutil.sysctl(ns, _NO_IPV6 | (_ROUTER if ns in routers else {}))

        for sw in switches:
            mine = [h for h in hosts if h["switch_port"] in sw["ports"]] \
                if sw["role"] != "spine" else []
            with nsutil.iproute(sw["netns"]) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for h in mine:
                    # created from the switch side with the peer placed straight
                    # into the host namespace: no lab name ever appears in the root ns
                    ipr.link("add", ifname=h["switch_port"], kind="veth", mtu=mtu,
                             peer={"ifname": h["ifname"], "net_ns_fd": h["netns"], "mtu": mtu})
                    idx = ipr.link_lookup(ifname=h["switch_port"])[0]
                    ipr.addr("add", index=idx, address=h["gateway"], prefixlen=h["prefix"])
                    ipr.link("set", index=idx, state="up")

        for sw in switches:
            if sw["uplink"]:
                fabric.build_uplink(sw, self._state["switch_netns"],
                                    [h for h in hosts if h["switch_port"] in sw["ports"]],
                                    mtu, self.spine_impair, spine_progs)

        for h in hosts:
            ns, dev = h["netns"], h["ifname"]
            with nsutil.iproute(ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                idx = ipr.link_lookup(ifname=dev)[0]
                ipr.addr("add", index=idx, address=h["addr"], prefixlen=h["prefix"])
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=h["gateway"])
            # Without GRO (or XDP) on the receiving veth, XDP_REDIRECT into it
            # is dropped silently.
            # Checksum offload stays on (sending is ~25% faster): host UDP
            # reaches the switch with only the pseudo-header sum in the UDP
            # checksum, so XDP must rewrite it (0 is valid for IPv4 UDP) on
            # anything it redirects, or receivers count UdpInCsumErrors.
            nsutil.check(ns, ["ethtool", "-K", dev, "gro", "on"], f"enable GRO on {dev}")
            nsutil.check(self.netns(h["switch"]), ["ethtool", "-K", h["switch_port"], "gro", "on"],
                         f"enable GRO on {h['switch_port']}")
            impair.apply(ns, dev, mtu, self.impair, progs)
        self._wait_running()

    def _wait_running(self, timeout: float = 5.0) -> None:
        # One end of each veth gets its carrier from an event the kernel's
        # linkwatch handles up to a second later; until then its qdisc is the
        # noop qdisc and drops everything. Wait, so the lab works when up() returns.
        where = fabric.wait_list(self._state)
        for h in self._state["hosts"]:
            where[h["netns"]] = [h["ifname"]]
        deadline = time.monotonic() + timeout
        for ns, devs in where.items():
            with nsutil.iproute(ns) as ipr:
                while True:
                    down = [ln.get("ifname") for ln in ipr.get_links()
                            if ln.get("ifname") in devs and ln.get("operstate") != "UP"]
                    if not down:
                        break
                    if time.monotonic() > deadline:
                        raise LabError(f"links did not come up in {ns}: {', '.join(down)}")
                    time.sleep(0.05)


def _spine_impairments(racks: int, rate, loss_pct) -> Impairments | None:
    """The spine links' faults (None for a one-rack lab, which has no spine).

    Rate and loss only: impair's delay line cannot work on a bridge port. Its
    ingress primers are dropped by the receiving host's ip_rcv (they are
    PACKET_OTHERHOST), but a bridge forwards them, so the leaf would get a
    copy of every packet undelayed (cut or padded to the primer's length).
    """
    if racks == 1:
        if rate is not None or loss_pct:
            raise LabConfigError("--spine-rate/--spine-loss need --racks 2 or more: "
                                 "a one-rack lab has no spine links")
        return None
    try:
        return Impairments(loss_pct=loss_pct,
                           rate=None if rate is None else str(rate).strip().lower())
    except LabConfigError as e:
        raise LabConfigError(f"spine links: {e}") from None


def _lab_netns(name: str) -> list[str]:
    return nsutil.list_netns(f"{plan.validate_name(name)}-")


def teardown(name: str) -> tuple[list[str], bool]:
    """Remove every namespace named {name}-* and the state file, whatever state they are in.

    Returns (namespaces removed, whether a state file was removed). Idempotent.
    """
    removed = []
    for ns in _lab_netns(name):
        nsutil.delete(ns)
        removed.append(ns)
    return removed, statefile.remove(name)


def status(name: str) -> dict:
    """What is there of lab `name`: the state file and which namespaces exist.

    "up" is true when the state file is readable and every namespace it names exists.
    """
    present = _lab_netns(name)
    out = {"name": name, "up": False, "state_file": str(state_path(name)),
           "missing_netns": [], "stray_netns": [], "error": None, "state": None}
    try:
        st = statefile.read(name)
    except LabError as e:
        st, out["error"] = None, str(e)
    if st is not None:
        wanted = plan.lab_netns(st)
        out["state"] = st
        out["missing_netns"] = [ns for ns in wanted if ns not in present]
        out["stray_netns"] = [ns for ns in present if ns not in wanted]
        out["up"] = not out["missing_netns"]
    else:
        out["stray_netns"] = present
    return out
