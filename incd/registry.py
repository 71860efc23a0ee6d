"""Jobs: the registration barrier, switch programming, and release when members leave.

Every rank of a job registers on its own TCP connection. When the last rank
arrives, the job gets a region and a new generation, the switch is programmed,
and every waiting rank gets the same answer. A job ends when all of its
members have closed their connections (or said "done"); its region is freed
and its final counters are kept for `incd status`.
"""
from __future__ import annotations

import collections
import socket
import threading
import time
from dataclasses import dataclass, field

from hostagent import proto

from .allocator import AllocError, RegionAllocator
from .netinfo import NetInfoError, Path

MAX_WINDOW = 4096


class RegistrationError(RuntimeError):
    pass


@dataclass
class Member:
    rank: int
    addr: str
    port: int
    path: Path
    ifname: str
    alive: bool = True


@dataclass
class Job:
    id: int
    world: int
    window: int
    mode: str
    shape: str | None = None  # what the agents say they reduce, e.g. "1000xint32"; must agree
    members: dict[int, Member] = field(default_factory=dict)
    state: str = "pending"  # pending -> active -> ended
    gen: int = 0
    offset: int = -1
    slots: int = 0
    elems: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)

    def public(self) -> dict:
        return {
            "job": self.id, "state": self.state, "mode": self.mode, "gen": self.gen,
            "world": self.world, "window": self.window, "offset": self.offset,
            "slots": self.slots, "elems_per_packet": self.elems,
            "members": [
                {"rank": m.rank, "addr": m.addr, "port": m.port, "switch_port": m.ifname,
                 "alive": m.alive}
                for m in sorted(self.members.values(), key=lambda m: m.rank)
            ],
        }


def validate_register(req: dict) -> tuple[int, int, int, int, int, str, str | None]:
    def num(key, lo, hi):
        v = req.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise RegistrationError(f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    job = num("job", 1, proto.MAX_JOBS - 1)
    world = num("world", 1, proto.MAX_WORKERS)
    rank = num("rank", 0, world - 1)
    window = num("window", 1, MAX_WINDOW)
    port = num("port", 1, 65535)
    mode = req.get("mode", "modulo")
    if mode != "modulo":
        raise RegistrationError(f"unsupported mode {mode!r} (this switch does: modulo)")
    shape = req.get("shape")
    if shape is not None and (not isinstance(shape, str) or len(shape) > 64):
        raise RegistrationError("'shape' must be a short string")
    return job, rank, world, window, port, mode, shape


class Registry:
    def __init__(self, dataplane, pool_slots: int, port_names: dict[int, str]):
        self.dp = dataplane
        self.alloc = RegionAllocator(pool_slots)
        self.port_names = port_names
        self.jobs: dict[int, Job] = {}
        self.finished: collections.deque = collections.deque(maxlen=32)
        self.cond = threading.Condition()
        self._gen = 0
        self.closing = False

    def _next_gen(self) -> int:
        self._gen = self._gen % 0xFFFF + 1
        return self._gen

    def register(self, req: dict, peer: str, path: Path, timeout: float) -> Job:
        job_id, rank, world, window, port, mode, shape = validate_register(req)
        with self.cond:
            if self.closing:
                raise RegistrationError("incd is stopping")
            job = self.jobs.get(job_id)
            if job is not None and job.state == "active":
                if any(m.alive for m in job.members.values() if m.rank == rank):
                    raise RegistrationError(
                        f"job {job_id} rank {rank} is running (from {job.members[rank].addr}); "
                        "it must finish before the job id is reused")
                # A new run of the job: the old one's stragglers are cut off by the new generation.
                self._end(job, "replaced by a new registration")
                job = None
            if job is None:
                job = Job(job_id, world, window, mode, shape)
                self.jobs[job_id] = job
            if (job.world, job.window, job.mode, job.shape) != (world, window, mode, shape):
                raise RegistrationError(
                    f"job {job_id} is being registered with world={job.world} window={job.window} "
                    f"mode={job.mode} data={job.shape}; this request says world={world} "
                    f"window={window} mode={mode} data={shape}")
            if rank in job.members:
                raise RegistrationError(
                    f"job {job_id} rank {rank} is already registered from {job.members[rank].addr}")
            for m in job.members.values():
                if m.path.ifindex == path.ifindex:
                    raise RegistrationError(
                        f"job {job_id}: rank {m.rank} already sits behind switch port "
                        f"{self.port_names.get(path.ifindex)}; one member per port per job")
            job.members[rank] = Member(rank, peer, port, path, self.port_names.get(path.ifindex, "?"))
            if len(job.members) == world:
                self._activate(job)
                self.cond.notify_all()
            deadline = time.monotonic() + timeout
            while job.state == "pending":
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    del job.members[rank]
                    if not job.members:
                        self.jobs.pop(job_id, None)
                    missing = sorted(set(range(world)) - set(job.members) - {rank})
                    why = "incd is stopping" if self.closing else (
                        f"timed out after {timeout:.0f}s waiting for job {job_id} ranks {missing}")
                    raise RegistrationError(why)
                self.cond.wait(left)
            if job.state != "active":
                raise RegistrationError(job.error or f"job {job_id} ended before it started")
            return job

    def _activate(self, job: Job) -> None:
        slots = 2 * job.window
        try:
            job.offset = self.alloc.alloc(slots)
        except AllocError as e:
            job.state, job.error = "ended", str(e)
            self.jobs.pop(job.id, None)
            return
        job.slots = slots
        job.gen = self._next_gen()
        job.elems = proto.elems_for_mtu(min(m.path.mtu for m in job.members.values()))
        self.dp.reset_stats(job.id)
        for m in job.members.values():
            self.dp.set_member(
                job.id, m.path.ifindex, mac=m.path.mac, port_mac=m.path.port_mac,
                addr=socket.inet_aton(m.addr), switch_addr=socket.inet_aton(m.path.switch_addr),
                port=m.port, rank=m.rank)
        # Job entry last: the data path accepts packets only once results can be delivered.
        self.dp.set_job(job.id, offset=job.offset, slots=slots, gen=job.gen, world=job.world)
        job.state = "active"

    def leave(self, job: Job, rank: int) -> None:
        with self.cond:
            m = job.members.get(rank)
            if m is None or not m.alive:
                return
            m.alive = False
            if job.state == "active" and not any(x.alive for x in job.members.values()):
                self._end(job, None)

    def _end(self, job: Job, reason: str | None) -> None:
        if job.state == "active":
            self.dp.clear_job(job.id)
            for m in job.members.values():
                self.dp.del_member(job.id, m.path.ifindex)
            self.alloc.free(job.offset)
            final = self.dp.read_stats(job.id)
        else:
            final = None
        job.state = "ended"
        job.error = reason
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        rec = job.public()
        rec["ended"] = time.time()
        rec["end_reason"] = reason or "all members left"
        rec["counters"] = final
        self.finished.append(rec)

    def shutdown(self) -> None:
        with self.cond:
            self.closing = True
            for job in list(self.jobs.values()):
                self._end(job, "incd stopped")
            self.cond.notify_all()

    def snapshot(self) -> dict:
        with self.cond:
            jobs = []
            for job in sorted(self.jobs.values(), key=lambda j: j.id):
                rec = job.public()
                rec["counters"] = self.dp.read_stats(job.id) if job.state == "active" else None
                jobs.append(rec)
            return {
                "pool_slots": self.alloc.size,
                "free_slots": self.alloc.free_slots(),
                "regions": {str(k): v for k, v in sorted(self.alloc.regions().items())},
                "jobs": jobs,
                "finished": list(self.finished),
                "unattributed": self.dp.read_stats(0)["drops"],
            }


def resolve_path(netinfo, peer: str, port_ifindexes: set[int]) -> Path:
    try:
        return netinfo.path_to(peer, port_ifindexes)
    except NetInfoError as e:
        raise RegistrationError(str(e)) from e
