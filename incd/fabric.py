"""One incd for every switch of a two-tier fabric: leaves and a spine (docs/design.md,
"Two tiers"). Fabric offers the registry the calls it makes on a Dataplane and
turns each into the programming of the switches on a job's path:

- a job whose members all sit behind one leaf is that leaf's alone (INC_TIER_ONE),
  as on a single switch;
- a job across racks: every leaf with members sums them (INC_TIER_LEAF, `local`
  ranks) and sends one partial up (job_up: the spine's port, the leaf's rank at
  the spine = its place among the job's leaves); the spine takes the leaves as
  its ranks (members on its ports towards them, INC_TIER_SPINE).

Memory: one allocator for the whole fabric, so a job holds the same region on
every switch of its path (and the region is reserved on the others too):
simple, and a resize or a restart is the same set of calls everywhere; a rack-
local job could share offsets with other racks' jobs, which this leaves unused.
Only modulo jobs run on a fabric so far; hash and key-value jobs are refused
with the reason."""
from __future__ import annotations

import functools
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bpf import wire

from . import netns as nsx
from .dataplane import Dataplane, DataplaneError, Port, unpin_tree
from .netinfo import PortInfo, port_info


@dataclass
class Node:
    """One switch: its namespace, ports towards hosts (a leaf) or leaves (the spine)."""
    name: str
    netns: str
    role: str                     # "leaf" or "spine"
    ports: list[PortInfo]
    up: PortInfo | None = None    # a leaf's port towards the spine
    peer_port: str | None = None  # the spine's port towards this leaf
    dp: Dataplane | None = None
    prog_ids: dict = field(default_factory=dict)


def _mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def _add_stats(a: dict, b: dict) -> dict:
    return {k: ({d: a[k][d] + b[k][d] for d in a[k]} if k == "drops" else a[k] + b[k]) for k in a}


def _addr(p: PortInfo) -> bytes:
    if not p.addrs:
        raise DataplaneError(f"port {p.name} has no IPv4 address")
    return socket.inet_aton(p.addrs[0].split("/")[0])


class Fabric:
    def __init__(self, switches: list[dict], pool_slots: int, pin_root: Path):
        """switches: the config's entries (name, netns, role, ports, uplink)."""
        self.nodes: dict[str, Node] = {}
        for sw in switches:
            up = sw.get("uplink")
            ports = nsx.call_in(sw["netns"], lambda sw=sw: [port_info(n) for n in sw["ports"]])
            upi = nsx.call_in(sw["netns"], lambda: port_info(up["port"])) if up else None
            self.nodes[sw["name"]] = Node(sw["name"], sw["netns"], sw["role"], ports, upi,
                                          up["peer_port"] if up else None)
        spines = [n for n in self.nodes.values() if n.role == "spine"]
        if len(spines) != 1:
            raise DataplaneError(f"a fabric needs exactly one spine, got {len(spines)}")
        self.spine = spines[0]
        self.leaves = [n for n in self.nodes.values() if n.role == "leaf"]
        by_name = {p.name: p for p in self.spine.ports}
        for leaf in self.leaves:
            if leaf.up is None or leaf.peer_port not in by_name:
                raise DataplaneError(f"leaf {leaf.name}: its uplink does not reach a port of the spine")
        self.pool_slots = pool_slots
        self.pin_root = pin_root
        try:
            for n in self.nodes.values():
                n.dp = Dataplane(pool_slots, pin_root / n.name)
        except BaseException:
            self.close()
            raise
        self.adopted = all(n.dp.adopted for n in self.nodes.values())
        self.members: dict[int, dict[str, dict[int, int]]] = {}  # job -> switch -> {rank: ifindex}
        self.paths: dict[int, list[str]] = {}  # job -> leaves it was last programmed on

    # --- ports ------------------------------------------------------------
    def port_names(self) -> dict[tuple[str, int], str]:
        return {(n.name, p.ifindex): f"{n.name}/{p.name}" for n in self.leaves for p in n.ports}

    def attach(self) -> None:
        for n in self.nodes.values():
            ports = [*n.ports, *([n.up] if n.up else [])]
            nsx.call_in(n.netns, lambda n=n, ports=ports: n.dp.attach([Port(p.name, p.ifindex) for p in ports]))
            n.prog_ids = dict(n.dp.prog_ids)

    def close(self) -> None:
        for n in self.nodes.values():
            if n.dp is not None:
                nsx.call_in(n.netns, n.dp.close)
        unpin_tree(self.pin_root)

    def describe(self) -> list[dict]:
        return [{"name": n.name, "role": n.role, "netns": n.netns,
                 "ports": [p.name for p in n.ports] + ([n.up.name] if n.up else []),
                 "xdp_prog_ids": n.prog_ids} for n in self.nodes.values()]

    # --- placement ----------------------------------------------------------
    @staticmethod
    def placement_error(mode: str, frame: str, switches: set[str]) -> str | None:
        if mode != "modulo":
            return (f"{mode} jobs do not run on a two-tier fabric yet (only modulo jobs); "
                    "run it on a one-rack lab")
        if frame == "jumbo" and len(switches) > 1:
            return f"jumbo frames need the job's ranks behind one leaf; they sit behind {', '.join(sorted(switches))}"
        return None

    @staticmethod
    def tiers(switches: set[str]) -> int:
        return 2 if len(switches) > 1 else 1

    # --- members and jobs ---------------------------------------------------------
    def set_member(self, job: int, switch: str = "", **fields) -> None:
        self.nodes[switch].dp.set_member(job, **fields)
        self.members.setdefault(job, {}).setdefault(switch, {})[fields["rank"]] = fields["ifindex"]

    def del_member(self, job: int, ifindex: int, switch: str = "") -> None:
        self.nodes[switch].dp.del_member(job, ifindex)
        ranks = self.members.get(job, {}).get(switch, {})
        for r in [r for r, i in ranks.items() if i == ifindex]:
            del ranks[r]

    def set_job(self, job: int, *, offset: int, slots: int, gen: int, world: int,
                mode: int = wire.MODE_MODULO) -> None:
        where = {s: r for s, r in self.members.get(job, {}).items() if r}
        leaves = sorted(where)
        if not leaves:
            raise DataplaneError(f"job {job}: no member behind any leaf")
        self.paths[job] = leaves
        if len(leaves) == 1:
            self.nodes[leaves[0]].dp.set_job(job, offset=offset, slots=slots, gen=gen, world=world, mode=mode)
            return
        sp = self.spine
        spine_port = {p.name: p for p in sp.ports}
        # The spine first: a leaf's partial is taken once the spine knows the job.
        for i, name in enumerate(leaves):
            leaf, sport = self.nodes[name], spine_port[self.nodes[name].peer_port]
            sp.dp.set_member(job, mac=_mac(leaf.up.mac), port_mac=_mac(sport.mac), addr=_addr(leaf.up),
                             switch_addr=_addr(sport), port=wire.PORT, rank=i, ifindex=sport.ifindex)
        sp.dp.set_job(job, offset=offset, slots=slots, gen=gen, world=len(leaves), mode=mode, tier=wire.TIER_SPINE)
        for i, name in enumerate(leaves):
            leaf, sport = self.nodes[name], spine_port[self.nodes[name].peer_port]
            leaf.dp.set_up(job, mac=_mac(sport.mac), port_mac=_mac(leaf.up.mac), addr=_addr(sport),
                           switch_addr=_addr(leaf.up), port=wire.PORT, rank=i, ifindex=leaf.up.ifindex)
            leaf.dp.set_job(job, offset=offset, slots=slots, gen=gen, world=world, mode=mode,
                            tier=wire.TIER_LEAF, local=len(where[name]))

    def clear_job(self, job: int) -> None:
        for name in self.paths.get(job, []):
            self.nodes[name].dp.clear_job(job)
            self.nodes[name].dp.clear_up(job)
        if len(self.paths.get(job, [])) > 1:
            self.spine.dp.clear_job(job)
            for p in self.spine.ports:
                self.spine.dp.del_member(job, p.ifindex)

    def _on_path(self, job: int) -> list[Node]:
        names = self.paths.get(job, [])
        return [self.nodes[n] for n in names] + ([self.spine] if len(names) > 1 else [])

    # --- counters and slots -----------------------------------------------------
    def read_stats(self, job: int) -> dict:
        """The counters of the switch where the job's psns complete (the spine, for
        a job across racks), and every switch's on the path under "switches"."""
        if job == 0:
            return functools.reduce(_add_stats, (n.dp.read_stats(0) for n in self.nodes.values()))
        path = self._on_path(job)
        if not path:
            return self.leaves[0].dp.read_stats(job)
        per = {n.name: n.dp.read_stats(job) for n in path}
        return {**per[path[-1].name], "switches": per}

    def reset_stats(self, job: int) -> None:
        for n in self.nodes.values():
            n.dp.reset_stats(job)

    def clear_slots(self, offset: int, size: int, job: int) -> int:
        return sum(n.dp.clear_slots(offset, size, job) for n in self.nodes.values())

    def missing_ranks(self, job: int, gen: int, psn: int, idx: int, world: int) -> list[int] | None:
        """The ranks whose contribution to psn no leaf holds while some leaf's slot
        for it is partial (None: nothing to tell)."""
        missing, partial = [], False
        for name in self.paths.get(job, []):
            s = self.nodes[name].dp.read_slot(idx)
            ranks = sorted(self.members.get(job, {}).get(name, {}))
            if s.job != job or s.gen != gen or s.psn != psn or s.state == wire.SLOT_EMPTY:
                missing += ranks  # nothing of this psn at that leaf
                continue
            partial |= s.state == wire.SLOT_PARTIAL
            missing += [r for r in ranks if not s.bitmap >> r & 1]
        return sorted(missing) if partial else None

    def programmed_jobs(self) -> list[int]:
        return sorted({j for n in self.nodes.values() for j in n.dp.programmed_jobs()})

    def forget_job(self, job: int) -> None:
        for n in self.nodes.values():
            n.dp.forget_job(job)

    def recovered(self, job: int, members: list[tuple[str, int, int]]) -> None:
        """A restarted incd's recovered job: (switch, rank, ifindex) of each member;
        its entries on the switches are pinned and stay as they are."""
        where: dict[str, dict[int, int]] = {}
        for sw, rank, ifindex in members:
            where.setdefault(sw, {})[rank] = ifindex
        self.members[job] = where
        self.paths[job] = sorted(where)
