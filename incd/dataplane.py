"""The switch dataplane as incd sees it: compile, attach, pin, and typed map access.

Map value types come from bcc (`table.Leaf`), which builds them from the C
structs in bpf/inc_proto.h, so nothing here restates a layout.
"""
from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass
from pathlib import Path

from hostagent import proto

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SWITCH_SRC = BPF_DIR / "inc_switch.bpf.c"
MAP_NAMES = ("jobs", "pool", "members", "job_ps", "sources", "stats", "tx_ports", "mode_progs")
XDP_FLAGS_DRV_MODE = 1 << 2


class DataplaneError(RuntimeError):
    pass


@dataclass
class Port:
    name: str
    ifindex: int


def _bcc():
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc, system Python only)
    except ImportError as e:
        raise DataplaneError(
            "bcc is not importable: run from the project venv made by scripts/setup.sh "
            "(Debian python3-bpfcc, system Python)"
        ) from e
    return bcc


class Dataplane:
    def __init__(self, pool_slots: int = proto.C["INC_POOL_SLOTS_DEFAULT"], pin_dir: Path | None = None):
        """pin_dir: maps live there (bpffs); maps already pinned there are reused
        as they are (`adopted`), which is how a restarted incd takes over."""
        bcc = _bcc()
        if not 1 <= pool_slots <= 1 << 20:
            raise DataplaneError(f"pool size {pool_slots} out of range 1..{1 << 20}")
        self.pool_slots = pool_slots
        cflags = [f"-I{BPF_DIR}", f"-DINC_POOL_SLOTS={pool_slots}", "-w"]
        self.adopted = False
        if pin_dir is not None:
            ensure_bpffs()
            pin_dir.mkdir(parents=True, exist_ok=True)
            self.adopted = all((pin_dir / n).exists() for n in MAP_NAMES)
            cflags.append(f'-DINC_PIN_DIR="{pin_dir}"')
        self.pin_dir = pin_dir
        try:
            self.bpf = bcc.BPF(src_file=str(SWITCH_SRC).encode(), cflags=cflags)
            self.ingress = self.bpf.load_func(b"xdp_inc_ingress", bcc.BPF.XDP)
            self.mode_fns = {
                proto.MODE_MODULO: self.bpf.load_func(b"xdp_inc_modulo", bcc.BPF.XDP),
                proto.MODE_HASH: self.bpf.load_func(b"xdp_inc_hash", bcc.BPF.XDP),
                proto.C["INC_PROG_HASH_FROM_PS"]: self.bpf.load_func(b"xdp_inc_hash_from_ps", bcc.BPF.XDP),
            }
            self.egress = self.bpf.load_func(
                b"xdp_inc_egress", bcc.BPF.XDP, attach_type=bcc.BPFAttachType.XDP_DEVMAP
            )
        except Exception as e:  # bcc raises bare Exception on compile/verifier errors
            raise DataplaneError(f"cannot build the XDP program: {e}") from e
        modes = self.bpf[b"mode_progs"]
        for mode, fn in self.mode_fns.items():
            modes[ct.c_int(mode)] = ct.c_int(fn.fd)
        self.jobs = self.bpf[b"jobs"]
        self.job_ps = self.bpf[b"job_ps"]
        self.pool = self.bpf[b"pool"]
        self.members = self.bpf[b"members"]
        self.sources = self.bpf[b"sources"]
        self.stats = self.bpf[b"stats"]
        self.tx_ports = self.bpf[b"tx_ports"]
        self.ports: list[Port] = []

    # --- ports -----------------------------------------------------------
    def attach(self, ports: list[Port]) -> None:
        """XDP in native mode on every port, and all ports in the broadcast devmap."""
        if len(ports) > proto.C["INC_MAX_PORTS"]:
            raise DataplaneError(f"at most {proto.C['INC_MAX_PORTS']} ports")
        for i, p in enumerate(ports):
            val = self.tx_ports.Leaf()
            val.ifindex = p.ifindex
            val.bpf_prog.fd = self.egress.fd
            self.tx_ports[ct.c_int(i)] = val
        try:
            for p in ports:
                self.bpf.attach_xdp(p.name.encode(), self.ingress, XDP_FLAGS_DRV_MODE)
                self.ports.append(p)
        except Exception as e:
            self.detach()
            raise DataplaneError(f"cannot attach XDP to {p.name}: {e}") from e

    def detach(self) -> None:
        for p in self.ports:
            detach_port(p.name)
        self.ports = []

    # --- pinning ----------------------------------------------------------
    def unpin(self) -> None:
        if self.pin_dir is not None:
            unpin_dir(self.pin_dir)
            self.pin_dir = None

    # --- jobs ---------------------------------------------------------------
    def set_job(self, job: int, *, offset: int, slots: int, gen: int, world: int,
                mode: int = proto.MODE_MODULO) -> None:
        v = self.jobs.Leaf()
        v.offset, v.slots, v.gen, v.mode, v.world = offset, slots, gen, mode, world
        self.jobs[ct.c_int(job)] = v

    def clear_job(self, job: int) -> None:
        self.jobs[ct.c_int(job)] = self.jobs.Leaf()

    def _member_value(self, leaf_t, *, mac: bytes, port_mac: bytes, addr: bytes, switch_addr: bytes,
                      port: int, rank: int, ifindex: int):
        v = leaf_t()
        ct.memmove(v.mac, mac, 6)
        ct.memmove(v.port_mac, port_mac, 6)
        v.addr = int.from_bytes(addr, "little")          # keeps network order in memory
        v.switch_addr = int.from_bytes(switch_addr, "little")
        v.port = int.from_bytes(port.to_bytes(2, "big"), "little")
        v.rank = rank
        v.ifindex = ifindex
        return v

    def set_member(self, job: int, **fields) -> None:
        """A job's worker behind port fields["ifindex"]: where its results go,
        and the only host and port its rank's data is accepted from."""
        k = self.members.Key()
        k.job, k.ifindex = job, fields["ifindex"]
        self.members[k] = self._member_value(self.members.Leaf, **fields)
        self.set_source(job, fields["rank"], fields["addr"], fields["port"], fields["ifindex"])

    def set_source(self, job: int, rank: int, addr: bytes, port: int, ifindex: int) -> None:
        """Data of (job, rank) is accepted only from addr (4 bytes):port behind ifindex."""
        src = self.sources.Leaf()
        src.addr = int.from_bytes(addr, "little")  # keeps network order in memory
        src.port = int.from_bytes(port.to_bytes(2, "big"), "little")
        src.ifindex = ifindex
        self.sources[ct.c_int(job * proto.MAX_WORKERS + rank)] = src

    def clear_source(self, job: int, rank: int) -> None:
        self.sources[ct.c_int(job * proto.MAX_WORKERS + rank)] = self.sources.Leaf()

    def set_ps(self, job: int, **fields) -> None:
        """Hash mode: where the job's parameter server is."""
        self.job_ps[ct.c_int(job)] = self._member_value(self.job_ps.Leaf, **fields)

    def clear_ps(self, job: int) -> None:
        self.job_ps[ct.c_int(job)] = self.job_ps.Leaf()

    def del_member(self, job: int, ifindex: int) -> None:
        k = self.members.Key()
        k.job, k.ifindex = job, ifindex
        try:
            rank = self.members[k].rank
            del self.members[k]
        except KeyError:
            return
        self.clear_source(job, rank)

    def programmed_jobs(self) -> list[int]:
        """Job ids the switch accepts packets for (an adopted map may hold some)."""
        return [j for j in range(1, proto.MAX_JOBS) if self.jobs[ct.c_int(j)].mode]

    def forget_job(self, job: int) -> None:
        """Removes every trace of a job incd no longer knows (after a restart)."""
        self.clear_job(job)
        for k in [k for k in self.members.keys() if k.job == job]:
            del self.members[k]
        self.clear_ps(job)
        for rank in range(proto.MAX_WORKERS):
            self.clear_source(job, rank)

    # --- counters -----------------------------------------------------------
    def read_stats(self, job: int) -> dict:
        per_cpu = self.stats[ct.c_int(job)]
        out = {f: 0 for f, _ in self.stats.sLeaf._fields_ if f != "drops"}
        drops = [0] * len(proto.DROP_REASONS)
        for v in per_cpu:
            for f in out:
                out[f] += getattr(v, f)
            for i in range(len(drops)):
                drops[i] += v.drops[i]
        out["drops"] = dict(zip(proto.DROP_REASONS, drops))
        return out

    def reset_stats(self, job: int) -> None:
        self.stats[ct.c_int(job)] = self.stats.Leaf(*([self.stats.sLeaf()] * self.stats.total_cpu))

    def read_slot(self, idx: int):
        return self.pool[ct.c_int(idx)]

    def held_slots(self, offset: int, size: int) -> dict:
        """Non-empty slots of a region: by live job, and those whose job is gone."""
        held: dict[str, int] = {}
        for i in range(offset, offset + size):
            s = self.pool[ct.c_int(i)]
            if s.state == proto.C["INC_SLOT_EMPTY"]:
                continue
            j = self.jobs[ct.c_int(s.job)] if 0 < s.job < proto.MAX_JOBS else None
            key = str(s.job) if j is not None and j.mode and j.gen == s.gen else "reclaimable"
            held[key] = held.get(key, 0) + 1
        return held

    def clear_slots(self, offset: int, size: int, job: int) -> int:
        """Empty the region's slots still tagged with this job (its unacknowledged
        and partial psns), so a finished job holds nothing."""
        n = 0
        for i in range(offset, offset + size):
            s = self.pool[ct.c_int(i)]
            if s.state != proto.C["INC_SLOT_EMPTY"] and s.job == job:
                self.pool[ct.c_int(i)] = self.pool.Leaf()
                n += 1
        return n

    def close(self) -> None:
        self.detach()
        self.unpin()
        self.bpf.cleanup()


def detach_port(name: str) -> None:
    """Remove whatever XDP program a port has (native or generic); ignores gone ports."""
    from bcc import BPF

    for flags in (XDP_FLAGS_DRV_MODE, 0):
        try:
            BPF.remove_xdp(name.encode(), flags)
        except Exception:
            pass


def ensure_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        os.makedirs("/sys/fs/bpf", exist_ok=True)
        if os.system("mount -t bpf bpf /sys/fs/bpf") != 0:
            raise DataplaneError("/sys/fs/bpf is not a bpffs mount and mounting it failed")


def unpin_dir(pin_dir: Path) -> None:
    if not pin_dir.exists():
        return
    for name in MAP_NAMES:
        try:
            (pin_dir / name).unlink()
        except FileNotFoundError:
            pass
    try:
        pin_dir.rmdir()
    except OSError:
        pass
