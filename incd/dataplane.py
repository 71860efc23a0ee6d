"""The switch dataplane as incd sees it: compile, attach, pin, and typed map access.

Map value types come from bcc (`table.Leaf`), which builds them from the C
structs in bpf/inc_state.h, so nothing here restates a layout.

One class for every map of the switch (a little over 400 lines): each method
is a few lines of typed access, and a reader looking for how incd touches a
map finds them all here.
"""
from __future__ import annotations

import ctypes as ct
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bpf
from bpf import wire
from bpf.bcc_unit import one_unit
from bpf.xdp_load import load_xdp

from .netinfo import xdp_prog_id

BPF_DIR = bpf.source_dir()
SWITCH_SRC = bpf.source("inc_switch.bpf.c")
MAP_NAMES = ("jobs", "pool", "members", "job_ps", "sources", "stats", "tx_ports", "mode_progs",
             "kv_pool", "kv_flows", "jumbo_buf", "job_up")
KV_AGG_DTYPE = np.dtype([("key", "<u8"), ("value", "<i8")])  # struct inc_kv_agg (checked at load)
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
    def __init__(self, pool_slots: int = wire.POOL_SLOTS_DEFAULT, pin_dir: Path | None = None,
                 kv_cols: int = wire.KV_COLS_DEFAULT):
        """pin_dir: maps live there (bpffs); maps already pinned there are reused
        as they are (`adopted`), which is how a restarted incd takes over."""
        bcc = _bcc()
        if not 1 <= pool_slots <= 1 << 20:
            raise DataplaneError(f"pool size {pool_slots} out of range 1..{1 << 20}")
        if not 1 <= kv_cols <= 1 << 16:
            raise DataplaneError(f"key-value columns {kv_cols} out of range 1..{1 << 16}")
        self.pool_slots = pool_slots
        self.kv_cols = kv_cols
        self.kv_rows = wire.KV_MAX_TUPLES
        cflags = [f"-I{BPF_DIR}", f"-DINC_POOL_SLOTS={pool_slots}", f"-DINC_KV_COLS={kv_cols}",
                  f"-DINC_JUMBO_CPUS={os.cpu_count() or 1}", "-w"]
        self.adopted = False
        if pin_dir is not None:
            ensure_bpffs()
            pin_dir.mkdir(parents=True, exist_ok=True)
            self.adopted = all((pin_dir / n).exists() for n in MAP_NAMES)
            cflags.append(f'-DINC_PIN_DIR="{pin_dir}"')
        self.pin_dir = pin_dir
        try:
            # one text: bcc rewrites map calls only in the text it is given (bpf/bcc_unit.py)
            self.bpf = bcc.BPF(text=one_unit(SWITCH_SRC.name).encode(), cflags=cflags)
            self.ingress = load_xdp(self.bpf, b"xdp_inc_ingress")
            self.mode_fns = {
                wire.MODE_MODULO: load_xdp(self.bpf, b"xdp_inc_modulo"),
                wire.MODE_HASH: load_xdp(self.bpf, b"xdp_inc_hash"),
                wire.PROG_HASH_FROM_PS: load_xdp(self.bpf, b"xdp_inc_hash_from_ps"),
                wire.MODE_KV: load_xdp(self.bpf, b"xdp_inc_kv"),
                wire.PROG_BCAST: load_xdp(self.bpf, b"xdp_inc_bcast"),
                wire.PROG_JUMBO: load_xdp(self.bpf, b"xdp_inc_jumbo"),
                wire.PROG_JUMBO_ADD: load_xdp(self.bpf, b"xdp_inc_jumbo_add"),
                wire.PROG_JUMBO_OUT: load_xdp(self.bpf, b"xdp_inc_jumbo_out"),
                wire.PROG_DOWN: load_xdp(self.bpf, b"xdp_inc_down"),
                wire.PROG_LEAF: load_xdp(self.bpf, b"xdp_inc_leaf"),
                wire.PROG_SPINE: load_xdp(self.bpf, b"xdp_inc_spine"),
            }
            self.egress = load_xdp(self.bpf, b"xdp_inc_egress", attach_type=bcc.BPFAttachType.XDP_DEVMAP)
        except Exception as e:  # bcc raises bare Exception on compile/verifier errors
            raise DataplaneError(f"cannot build the XDP program: {e}") from e
        modes = self.bpf[b"mode_progs"]
        for mode, fn in self.mode_fns.items():
            modes[ct.c_int(mode)] = ct.c_int(fn.fd)
        self.jobs = self.bpf[b"jobs"]
        self.job_ps = self.bpf[b"job_ps"]
        self.job_up = self.bpf[b"job_up"]
        self.pool = self.bpf[b"pool"]
        self.members = self.bpf[b"members"]
        self.sources = self.bpf[b"sources"]
        self.stats = self.bpf[b"stats"]
        self.tx_ports = self.bpf[b"tx_ports"]
        self.kv_pool = self.bpf[b"kv_pool"]
        self.kv_flows = self.bpf[b"kv_flows"]
        if ct.sizeof(self.kv_pool.Leaf) != KV_AGG_DTYPE.itemsize:
            raise DataplaneError("struct inc_kv_agg does not match KV_AGG_DTYPE")
        self.ports: list[Port] = []
        self.prog_ids: dict[str, int] = {}  # port -> id of the program attached there

    # --- ports -----------------------------------------------------------
    def attach(self, ports: list[Port]) -> None:
        """XDP in native mode on every port, and all ports in the broadcast devmap."""
        if len(ports) > wire.MAX_PORTS:
            raise DataplaneError(f"at most {wire.C['INC_MAX_PORTS']} ports")
        for i, p in enumerate(ports):
            val = self.tx_ports.Leaf()
            val.ifindex = p.ifindex
            val.bpf_prog.fd = self.egress.fd
            self.tx_ports[ct.c_int(i)] = val
        try:
            for p in ports:
                self.bpf.attach_xdp(p.name.encode(), self.ingress, XDP_FLAGS_DRV_MODE)
                self.ports.append(p)
                self.prog_ids[p.name] = xdp_prog_id(p.name)
        except Exception as e:
            self.detach()
            raise DataplaneError(f"cannot attach XDP to {p.name}: {e}") from e

    def detach(self) -> None:
        """Only the program this incd attached: one that replaced it since stays."""
        for p in self.ports:
            detach_port(p.name, self.prog_ids.get(p.name))
        self.ports = []

    # --- pinning ----------------------------------------------------------
    def unpin(self) -> None:
        if self.pin_dir is not None:
            unpin_dir(self.pin_dir)
            self.pin_dir = None

    # --- jobs ---------------------------------------------------------------
    def set_job(self, job: int, *, offset: int, slots: int, gen: int, world: int,
                mode: int = wire.MODE_MODULO, tier: int = wire.TIER_ONE, local: int = 0) -> None:
        """tier: this switch's place on the job's path (wire.TIER_*); a leaf
        completes a slot with its `local` ranks and sends the sum up (set_up)."""
        v = self.jobs.Leaf()
        v.offset, v.slots, v.gen, v.mode, v.world = offset, slots, gen, mode, world
        v.tier, v.local = tier, local
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

    def set_member(self, job: int, switch: str = "", **fields) -> None:
        """A job's worker behind port fields["ifindex"]: where its results go,
        and the only host and port its rank's data is accepted from. switch:
        which one (a Fabric's); a Dataplane is one switch."""
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
        self.sources[ct.c_int(job * wire.MAX_WORKERS + rank)] = src

    def clear_source(self, job: int, rank: int) -> None:
        self.sources[ct.c_int(job * wire.MAX_WORKERS + rank)] = self.sources.Leaf()

    def set_ps(self, job: int, switch: str = "", **fields) -> None:
        """Hash mode: where the job's parameter server is."""
        self.job_ps[ct.c_int(job)] = self._member_value(self.job_ps.Leaf, **fields)

    def clear_ps(self, job: int) -> None:
        self.job_ps[ct.c_int(job)] = self.job_ps.Leaf()

    def set_up(self, job: int, **fields) -> None:
        """A leaf: where the job's partials go (the spine's port and address;
        rank: this leaf's rank among the spine's)."""
        self.job_up[ct.c_int(job)] = self._member_value(self.job_up.Leaf, **fields)

    def clear_up(self, job: int) -> None:
        self.job_up[ct.c_int(job)] = self.job_up.Leaf()

    def del_member(self, job: int, ifindex: int, switch: str = "") -> None:
        k = self.members.Key()
        k.job, k.ifindex = job, ifindex
        try:
            rank = self.members[k].rank
            del self.members[k]
        except KeyError:
            return
        self.clear_source(job, rank)

    # What a Fabric (fabric.py) answers for several switches; one switch takes every job.
    @staticmethod
    def placement_error(mode: str, frame: str, switches: set[str]) -> str | None:
        return None

    @staticmethod
    def tiers(switches: set[str]) -> int:
        return 1

    def recovered(self, job: int, members: list) -> None:
        pass

    def missing_ranks(self, job: int, gen: int, psn: int, idx: int, world: int) -> list[int] | None:
        """The ranks whose contribution to psn the slot lacks, if it holds that psn partly."""
        s = self.read_slot(idx)
        if s.state != wire.SLOT_PARTIAL or s.job != job or s.gen != gen or s.psn != psn:
            return None
        return [r for r in range(world) if not s.bitmap >> r & 1]

    def programmed_jobs(self) -> list[int]:
        """Job ids the switch accepts packets for (an adopted map may hold some)."""
        return [j for j in range(1, wire.MAX_JOBS) if self.jobs[ct.c_int(j)].mode]

    def forget_job(self, job: int) -> None:
        """Removes every trace of a job incd no longer knows (after a restart)."""
        self.clear_job(job)
        for k in [k for k in self.members.keys() if k.job == job]:
            del self.members[k]
        self.clear_ps(job)
        self.clear_kv_flows(job)
        for rank in range(wire.MAX_WORKERS):
            self.clear_source(job, rank)

    # --- key-value jobs -------------------------------------------------------
    # A KV job owns columns [offset, offset + cols) of every row in both epochs
    # of kv_pool; pool index = epoch * cols_total * rows + col * rows + row, so
    # that region is one contiguous range of cols * rows entries per epoch.

    def set_kv_job(self, job: int, *, offset: int, cols: int, gen: int, world: int,
                   parts: int | None = None, epoch: int = 0, reset_flows: bool = True) -> None:
        """Programs a key-value job: columns [offset, offset+cols), cut into `parts`
        subspaces (default: one per flow, so two mappers never share an aggregator),
        `epoch` active. Flow f (the mapper of rank f) aggregates into part f % parts.
        With reset_flows its flows' seen state starts empty. The job's reducer is
        set with set_ps()."""
        parts = world if parts is None else parts
        if not (0 <= offset and 1 <= cols and offset + cols <= self.kv_cols):
            raise DataplaneError(f"columns [{offset}, {offset + cols}) outside 0..{self.kv_cols}")
        if not 1 <= parts <= cols:
            raise DataplaneError(f"{parts} parts for {cols} columns")
        if not 1 <= world <= wire.MAX_WORKERS:
            raise DataplaneError(f"world {world} out of range")
        if reset_flows:
            self.reset_kv_flows(job, world)
        v = self.jobs.Leaf()
        v.offset, v.slots, v.gen, v.mode, v.world = offset, cols, gen, wire.MODE_KV, world
        v.epoch, v.parts = epoch & 1, parts
        self.jobs[ct.c_int(job)] = v

    def kv_epoch(self, job: int) -> int:
        return int(self.jobs[ct.c_int(job)].epoch)

    def flip_kv_epoch(self, job: int, grace_s: float = 0.01) -> int:
        """Makes the other copy active and returns the one that was active (now
        inactive, to drain). Waits grace_s so that packets that read the old epoch
        before the flip have finished adding (XDP runs a packet in microseconds)."""
        v = self.jobs[ct.c_int(job)]
        if v.mode != wire.MODE_KV:
            raise DataplaneError(f"job {job} is not a key-value job")
        old = int(v.epoch) & 1
        v.epoch = old ^ 1
        self.jobs[ct.c_int(job)] = v
        if grace_s > 0:
            time.sleep(grace_s)
        return old

    def _kv_range(self, job: int, epoch: int) -> tuple[int, int]:
        v = self.jobs[ct.c_int(job)]
        if v.mode != wire.MODE_KV:
            raise DataplaneError(f"job {job} is not a key-value job")
        start = (epoch & 1) * self.kv_cols * self.kv_rows + int(v.offset) * self.kv_rows
        return start, int(v.slots) * self.kv_rows

    def read_kv(self, job: int, epoch: int) -> np.ndarray:
        """The job's aggregators of one epoch, as KV_AGG_DTYPE, shape (cols, rows)."""
        start, count = self._kv_range(job, epoch)
        out = np.zeros(count, KV_AGG_DTYPE)
        keys = np.zeros(count, np.uint32)
        done = 0
        fd = self.kv_pool.map_fd
        from bcc.libbcc import lib

        while done < count:
            cnt = ct.c_uint32(count - done)
            # the kernel continues after in_batch (the previous call's last key)
            in_b = ct.c_uint32(start + done - 1) if start + done else None
            out_b = ct.c_uint32(0)
            rc = lib.bpf_lookup_batch(fd, ct.byref(in_b) if in_b is not None else None, ct.byref(out_b),
                                      keys[done:].ctypes.data, out[done:].ctypes.data, ct.addressof(cnt))
            if rc != 0 and ct.get_errno() != 2 or cnt.value == 0:  # ENOENT: end of the map
                raise DataplaneError(f"BPF_MAP_LOOKUP_BATCH on kv_pool failed: {os.strerror(ct.get_errno())}")
            done += cnt.value
        return out.reshape(-1, self.kv_rows)

    def clear_kv(self, job: int, epoch: int) -> None:
        start, count = self._kv_range(job, epoch)
        keys = np.arange(start, start + count, dtype=np.uint32)
        vals = np.zeros(count, KV_AGG_DTYPE)
        from bcc.libbcc import lib

        cnt = ct.c_uint32(count)
        if lib.bpf_update_batch(self.kv_pool.map_fd, keys.ctypes.data, vals.ctypes.data, ct.byref(cnt)) != 0:
            raise DataplaneError(f"BPF_MAP_UPDATE_BATCH on kv_pool failed: {os.strerror(ct.get_errno())}")

    def drain_kv(self, job: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Reads and clears one epoch's copy of the job's aggregators (the inactive
        one: flip_kv_epoch first). Returns (keys uint64, values int64) of the
        non-empty ones; a key may appear more than once (several rows and parts)."""
        a = self.read_kv(job, epoch).ravel()
        self.clear_kv(job, epoch)
        live = a["key"] != 0
        return a["key"][live].copy(), a["value"][live].copy()

    def _flow_key(self, job: int, flow: int):
        k = self.kv_flows.Key()
        k.job, k.flow = job, flow
        return k

    def reset_kv_flows(self, job: int, world: int) -> None:
        """Seen state of flows 0..world-1 of the job: empty (and only those exist)."""
        self.clear_kv_flows(job)
        for f in range(world):
            self.kv_flows[self._flow_key(job, f)] = self.kv_flows.Leaf()

    def clear_kv_flows(self, job: int) -> None:
        for k in [k for k in self.kv_flows.keys() if k.job == job]:
            try:
                del self.kv_flows[k]
            except KeyError:
                pass

    def read_kv_seen(self, job: int, flow: int) -> dict[int, dict]:
        """psn -> {"state": "pending"|"all"|"partial", "absorbed": n, "mask": int}
        for the psns the flow's ring remembers."""
        names = {wire.KV_PENDING: "pending", wire.KV_ALL: "all",
                 wire.KV_PARTIAL: "partial"}
        try:
            v = self.kv_flows[self._flow_key(job, flow)]
        except KeyError:
            return {}
        out = {}
        for e in v.ring:
            if e.state != wire.KV_EMPTY:
                mask = sum(int(w) << (64 * i) for i, w in enumerate(e.mask))
                out[int(e.psn)] = {"state": names.get(e.state, str(e.state)), "absorbed": int(e.absorbed),
                                   "mask": mask}
        return out

    def clear_kv_job(self, job: int) -> None:
        """Forgets a key-value job: entry, seen state, and both copies of its columns."""
        v = self.jobs[ct.c_int(job)]
        if v.mode == wire.MODE_KV:
            self.clear_kv(job, 0)
            self.clear_kv(job, 1)
        self.clear_kv_flows(job)
        self.clear_job(job)

    # --- counters -----------------------------------------------------------
    def read_stats(self, job: int) -> dict:
        per_cpu = self.stats[ct.c_int(job)]
        out = {f: 0 for f, _ in self.stats.sLeaf._fields_ if f != "drops"}
        drops = [0] * len(wire.DROP_REASONS)
        for v in per_cpu:
            for f in out:
                out[f] += getattr(v, f)
            for i in range(len(drops)):
                drops[i] += v.drops[i]
        out["drops"] = dict(zip(wire.DROP_REASONS, drops))
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
            if s.state == wire.SLOT_EMPTY:
                continue
            j = self.jobs[ct.c_int(s.job)] if 0 < s.job < wire.MAX_JOBS else None
            key = str(s.job) if j is not None and j.mode and j.gen == s.gen else "reclaimable"
            held[key] = held.get(key, 0) + 1
        return held

    def clear_slots(self, offset: int, size: int, job: int) -> int:
        """Empty the region's slots still tagged with this job (its unacknowledged
        and partial psns), so a finished job holds nothing."""
        n = 0
        for i in range(offset, offset + size):
            s = self.pool[ct.c_int(i)]
            if s.state != wire.SLOT_EMPTY and s.job == job:
                self.pool[ct.c_int(i)] = self.pool.Leaf()
                n += 1
        return n

    def close(self) -> None:
        self.detach()
        self.unpin()
        self.bpf.cleanup()


def detach_port(name: str, prog_id: int | None = None) -> None:
    """Remove the XDP program of a port (native or generic); ignores gone
    ports. With prog_id: only if that program is still the one there."""
    from bcc import BPF

    if prog_id is not None:
        try:
            if xdp_prog_id(name) != prog_id:
                return
        except Exception:
            return
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


def unpin_tree(pin_dir: Path) -> None:
    """A pin directory and, for a fabric (incd/fabric.py), its switches' below it."""
    if pin_dir.exists():
        for sub in pin_dir.iterdir():
            if sub.is_dir():
                unpin_dir(sub)
    unpin_dir(pin_dir)
