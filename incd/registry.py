"""Jobs: the registration barrier, switch programming, and release when members leave.

Every rank of a job registers on its own TCP connection, and so does the job's
parameter server (PS) in hash and ps mode. When everyone is in, the job gets
switch memory and a new generation, the switch is programmed, and every
waiting member gets the same answer. A job ends when all of its workers have
said "done" (or closed their connections); its memory is freed, the slots it
still held are cleared, and its final counters are kept for `incd status`.
A member whose connection closes before it said "done", or whose heartbeats
stop, fails the job: the others get a "job_failed" event naming it, and the job
ends the same way (see leave() and heartbeat()).

Modes: "modulo" (NetReduce, switch only: 2W private slots), "hash" (ATP: a
region shared by all hash jobs, PS fallback), "ps" (the switch only forwards;
the plain parameter-server baseline), "kv" (key-value aggregation, word count:
mappers' tuples are summed by key in a private range of columns of the
switch's kv_pool; the reducer registers as the job's PS, gets what the switch
could not absorb, and drains the aggregators with kv_drain()). A kv job ends
when its reducer leaves; mappers leave with "done" when they have sent
everything, and one that goes without it fails the job.
"""
from __future__ import annotations

import collections
import ctypes
import socket
import threading
import time
from dataclasses import dataclass, field

from bpf import control, wire

from .allocator import AllocError, RegionAllocator
from .memory import MIN_SLOTS, JobDemand, MemoryManager, needed_slots
from .netinfo import NetInfoError, Path

KV_DRAIN_GRACE_S = 0.01  # after an epoch flip, before the old copy is read (XDP runs a packet in microseconds)
MODES = ("modulo", "hash", "ps", "kv")
MODE_CODE = {"modulo": wire.MODE_MODULO, "hash": wire.MODE_HASH, "kv": wire.MODE_KV}
KV_WINDOW = wire.KV_WINDOW         # a mapper's window may not exceed the switch's seen ring
KV_MAX_FLOWS = wire.KV_MAX_FLOWS   # mappers of all kv jobs together
KV_COLS_DEFAULT = wire.KV_COLS_DEFAULT


class RegistrationError(RuntimeError):
    pass


@dataclass
class Member:
    rank: int  # -1 for the PS
    addr: str
    port: int
    path: Path
    ifname: str
    alive: bool = True
    send: object = None  # pushes an event to the member's control connection
    last_seen: float | None = None     # monotonic time of its last heartbeat (None: sends none)
    fail_timeout: float | None = None  # silent this long = hung (from its heartbeats)

    @property
    def who(self) -> str:
        return f"the parameter server ({self.addr})" if self.rank == -1 else f"rank {self.rank} ({self.addr})"

    def public(self) -> dict:
        return {"rank": self.rank, "addr": self.addr, "port": self.port, "switch_port": self.ifname,
                "alive": self.alive}


@dataclass
class Job:
    id: int
    world: int
    mode: str
    window: int | None = None  # in effect; modulo: half the slots granted
    req_window: int | None = None  # asked for by the workers (modulo: wants 2x this)
    shape: str | None = None   # what the workers say they reduce, e.g. "1000xint32"; must agree
    deadline: float | None = None  # absolute (time.time()); None = best effort
    model_bytes: int = 0
    epochs: float = 1.0
    compute_s: float = 0.0
    members: dict[int, Member] = field(default_factory=dict)
    ps: Member | None = None
    state: str = "pending"  # pending -> (queued: waiting for memory) -> active -> ended
    gen: int = 0
    offset: int = -1
    slots: int = 0
    elems: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)
    remap: dict | None = None  # a live resize in progress (modulo)
    remaps_done: int = 0
    rejoin_by: float | None = None  # recovered by a restarted incd: members must rejoin by then
    rejoin_wait: set = field(default_factory=set)  # ranks (-1: PS) not back yet
    last_beat: float | None = None  # monotonic time of the last heartbeat from any member
    # key-value mode: offset/slots are the job's columns of kv_pool
    req_cols: int | None = None  # columns asked for by the mappers (None: the default share)
    parts: int | None = None     # subspaces the columns are cut into (asked, then in effect)
    tuples: int = 0              # tuples per packet (from the members' MTU)
    kv_drains: int = 0
    kv_epoch: int = 0            # the active copy (mirrors the switch's job entry)
    kv_lock: threading.Lock = field(default_factory=threading.Lock)  # a drain vs. the job's end
    kv_cleared: bool = False     # its columns are cleared and freed (under kv_lock)

    @property
    def needs_ps(self) -> bool:
        return self.mode in ("hash", "ps", "kv")

    def complete(self) -> bool:
        return len(self.members) == self.world and (self.ps is not None or not self.needs_ps)

    def missing(self) -> list:
        out: list = sorted(set(range(self.world)) - set(self.members))
        if self.needs_ps and self.ps is None:
            out.append("ps")
        return out

    def demand(self) -> JobDemand:
        return JobDemand(self.id, self.started, 2 * (self.req_window or 1), self.deadline,
                         self.model_bytes, self.epochs, self.compute_s)

    def public(self) -> dict:
        return {
            "job": self.id, "state": self.state, "mode": self.mode, "gen": self.gen,
            "world": self.world, "window": self.window, "req_window": self.req_window,
            "offset": self.offset, "slots": self.slots, "elems_per_packet": self.elems,
            "deadline_in_s": None if self.deadline is None else round(self.deadline - time.time(), 3),
            "model_bytes": self.model_bytes, "epochs": self.epochs, "compute_s": self.compute_s,
            "members": [m.public() for m in sorted(self.members.values(), key=lambda m: m.rank)],
            "ps": self.ps.public() if self.ps else None,
            "resizes": self.remaps_done,
            **({"cols": self.slots, "parts": self.parts, "req_cols": self.req_cols, "tuples_per_packet": self.tuples,
                "drains": self.kv_drains} if self.mode == "kv" else {}),
        }


@dataclass
class Request:
    job: int
    role: str
    rank: int
    world: int
    window: int | None
    port: int
    mode: str
    shape: str | None
    deadline_s: float | None = None
    model_bytes: int = 0
    epochs: float = 1.0
    compute_s: float = 0.0
    cols: int | None = None   # kv: columns wanted
    parts: int | None = None  # kv: subspaces


def validate_register(req: dict) -> Request:
    """The request's fields, checked; a RegistrationError names the first bad one
    (values are echoed cut short: a request may be 64 KiB of anything)."""
    def short(v):
        s = repr(v)
        return s if len(s) <= 40 else s[:40] + "..."

    def num(key, lo, hi):
        v = req.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise RegistrationError(f"'{key}' must be an integer in [{lo}, {hi}], got {short(v)}")
        return v

    role = req.get("role", "worker")
    if role not in ("worker", "ps"):
        raise RegistrationError(f"'role' must be 'worker' or 'ps', got {short(role)}")
    job = num("job", control.JOB_MIN, control.JOB_MAX)
    world = num("world", 1, wire.MAX_WORKERS)
    port = num("port", 1, 65535)
    mode = req.get("mode", "modulo")
    if mode not in MODES:
        raise RegistrationError(f"unsupported mode {short(mode)} (one of {', '.join(MODES)})")
    if role == "ps":
        if mode == "modulo":
            raise RegistrationError("modulo jobs have no parameter server")
        return Request(job, role, -1, world, None, port, mode, None)
    rank = num("rank", 0, world - 1)
    window = num("window", 1, control.MAX_WINDOW)
    cols = parts = None
    if mode == "kv":
        if window > KV_WINDOW:
            raise RegistrationError(f"a key-value mapper's 'window' may be at most {KV_WINDOW} "
                                    f"(the switch remembers {KV_WINDOW} psns per flow), got {window}")
        if req.get("cols") is not None:
            cols = num("cols", 1, 1 << 16)
        if req.get("parts") is not None:
            parts = num("parts", 1, world)
        if cols is not None and cols < (parts or world):
            raise RegistrationError(f"'cols' {cols} is fewer than the job's {parts or world} parts "
                                    f"(one column at least per part{'' if parts else ', one part per mapper'})")
    shape = req.get("shape")
    if shape is not None and (not isinstance(shape, str) or len(shape) > 64):
        raise RegistrationError("'shape' must be a short string")

    def real(key, lo, hi, default):
        v = req.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise RegistrationError(f"'{key}' must be a number in [{lo}, {hi}], got {short(v)}")
        return v

    return Request(job, role, rank, world, window, port, mode, shape,
                   deadline_s=real("deadline_s", 0.001, 10**7, None),
                   model_bytes=int(real("model_bytes", 0, 10**13, 0)),
                   epochs=float(real("epochs", 0.001, 10**7, 1.0)),
                   compute_s=float(real("compute_s", 0, 10**5, 0.0)), cols=cols, parts=parts)


class Registry:
    def __init__(self, dataplane, pool_slots: int, port_names: dict[int, str],
                 hash_slots: int | None = None, memory: MemoryManager | None = None):
        self.dp = dataplane
        self.alloc = RegionAllocator(pool_slots)
        self.mm = memory or MemoryManager(pool_slots)
        self.port_names = port_names
        self.hash_slots = max(1, hash_slots if hash_slots else pool_slots // 2)
        self.hash_region: tuple[int, int] | None = None  # (offset, size), shared by hash jobs
        self.jobs: dict[int, Job] = {}
        self.finished: collections.deque = collections.deque(maxlen=32)
        self.cond = threading.Condition()
        self._gen = 0
        self.closing = False
        self.on_change = None  # called (under self.cond) when the running jobs change: saves them
        self._next_scan = 0.0    # watchdog: next stale-slot scan (monotonic)
        self.stale_cleared = 0   # hash-region slots the watchdog emptied so far
        # key-value jobs: private column ranges of the kv_pool (both epochs)
        self.kv_cols = int(getattr(dataplane, "kv_cols", KV_COLS_DEFAULT))
        self.kv_alloc = RegionAllocator(self.kv_cols)
        self.kv_default_cols = max(1, self.kv_cols // 2)  # a job that names no 'cols' gets up to this

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _next_gen(self) -> int:
        self._gen = self._gen % 0xFFFF + 1
        return self._gen

    def register(self, raw: dict, peer: str, path: Path, timeout: float) -> tuple[Job, int]:
        """Blocks until the job is complete. Returns the job and the member's rank (-1: PS)."""
        r = validate_register(raw)
        with self.cond:
            if self.closing:
                raise RegistrationError("incd is stopping")
            # Every check first: a refused request changes nothing (not the running
            # job it collides with, not the deadline of the job it would join).
            job = self.jobs.get(r.job)
            replaces = None
            if job is not None and (job.world, job.mode) != (r.world, r.mode):
                raise RegistrationError(
                    f"job {r.job} is {'running' if job.state == 'active' else 'being registered'} with "
                    f"world={job.world} mode={job.mode}; this request says world={r.world} mode={r.mode}")
            if job is not None and job.state == "active":
                current = job.ps if r.role == "ps" else job.members.get(r.rank)
                if current is not None and current.alive:
                    who = "its PS" if r.role == "ps" else f"rank {r.rank}"
                    raise RegistrationError(
                        f"job {r.job} {who} is running (from {current.addr}); "
                        "it must finish before the job id is reused")
                if job.mode == "kv" and job.ps is not None and job.ps.alive:
                    raise RegistrationError(
                        f"job {r.job} is running: its reducer ({job.ps.addr}) has not finished; "
                        "it must finish before the job id is reused")
                # A new run of the job (this member's old run is gone): the old run's
                # stragglers are cut off by the new generation.
                replaces, job = job, None
            if job is not None:
                if r.role == "worker":
                    if job.req_window is not None and (job.req_window, job.shape) != (r.window, r.shape):
                        raise RegistrationError(
                            f"job {r.job} is being registered with window={job.req_window} data={job.shape}; "
                            f"this request says window={r.window} data={r.shape}")
                    if job.req_window is not None and (job.req_cols, job.parts) != (r.cols, r.parts):
                        raise RegistrationError(
                            f"job {r.job} is being registered with cols={job.req_cols} parts={job.parts}; "
                            f"this request says cols={r.cols} parts={r.parts}")
                    if r.rank in job.members:
                        raise RegistrationError(
                            f"job {r.job} rank {r.rank} is already registered from {job.members[r.rank].addr}")
                elif job.ps is not None:
                    raise RegistrationError(f"job {r.job} already has a PS at {job.ps.addr}")
                if r.role == "worker" and job.mode not in ("ps", "kv"):  # kv: no per-port member entry
                    for m in job.members.values():
                        if m.path.ifindex == path.ifindex:
                            raise RegistrationError(
                                f"job {r.job}: rank {m.rank} already sits behind switch port "
                                f"{self.port_names.get(path.ifindex)}; one member per port per job")
            # Accepted: from here on the request takes effect.
            if replaces is not None:
                self._end(replaces, "replaced by a new registration")
            if job is None:
                job = Job(r.job, r.world, r.mode)
                self.jobs[r.job] = job
            if r.role == "worker":
                if job.req_window is None:
                    job.req_window, job.shape = r.window, r.shape
                    job.req_cols, job.parts = r.cols, r.parts
                if r.deadline_s is not None or r.model_bytes:
                    # the job's deadline and size, from whichever rank states them
                    job.deadline = time.time() + r.deadline_s if r.deadline_s is not None else job.deadline
                    job.model_bytes, job.epochs, job.compute_s = r.model_bytes, r.epochs, r.compute_s
            member = Member(r.rank, peer, r.port, path, self.port_names.get(path.ifindex, "?"))
            if r.role == "ps":
                job.ps = member
            else:
                job.members[r.rank] = member
            if job.complete():
                if job.mode == "modulo":
                    job.state = "queued"
                    self._rebalance()
                else:
                    self._activate(job)
                self.cond.notify_all()
            deadline = time.monotonic() + timeout
            while job.state in ("pending", "queued"):
                left = deadline - time.monotonic()
                if left <= 0 or self.closing:
                    missing = job.missing()
                    if r.role == "ps":
                        job.ps = None
                    else:
                        del job.members[r.rank]
                    if not job.members and job.ps is None:
                        self.jobs.pop(r.job, None)
                    elif job.state == "queued":
                        job.state = "pending"  # it is no longer complete
                    why = "incd is stopping" if self.closing else (
                        f"timed out after {timeout:.0f}s waiting for switch memory for job {r.job} "
                        f"(policy {self.mm.policy}; {self.alloc.free_slots()} of {self.alloc.size} slots free)"
                        if job.state == "queued" else
                        f"timed out after {timeout:.0f}s waiting for job {r.job} members {missing}")
                    raise RegistrationError(why)
                self.cond.wait(left)
            if job.state != "active":
                raise RegistrationError(job.error or f"job {r.job} ended before it started")
            return job, r.rank

    def _rebalance(self) -> None:
        """Let the policy divide the memory among modulo jobs and start queued
        jobs that now get some. (Running jobs keep their region.)"""
        mod = sorted((j for j in self.jobs.values() if j.mode == "modulo" and j.state in ("queued", "active")),
                     key=lambda j: (j.started, j.id))
        if not mod:
            return
        pool = self.alloc.size - (self.hash_region[1] if self.hash_region else 0)
        self.mm.pool_slots = pool
        targets = self.mm.targets([j.demand() for j in mod], time.time(),
                                  {j.id: j.slots for j in mod if j.state == "active"})
        # Shrink first: that frees memory for the rest once the resize is done.
        for j in mod:
            want = targets.get(j.id, 0)
            if j.state == "active" and j.remap is None and MIN_SLOTS <= want < j.slots:
                self._start_remap(j, want)
        for j in mod:
            want = targets.get(j.id, 0)
            if j.state == "queued" and want >= MIN_SLOTS:
                if self.alloc.largest_free() < want <= self.alloc.free_slots() and self._compact(mod):
                    continue  # fragmented: a job is moving down; this one starts when it is done
                size = min(want, self.alloc.largest_free())
                size -= size % 2
                if size >= MIN_SLOTS:
                    self._activate(j, size)
            elif (j.state == "active" and j.remap is None and want > j.slots
                  and self.alloc.fits_if_moved(j.offset, want) and not any(x.state == "queued" for x in mod)):
                self._start_remap(j, want)  # grow into memory nobody waits for
        self.cond.notify_all()

    def _compact(self, mod: list[Job]) -> bool:
        """Moves the highest-placed job that has a lower hole to go to (a resize
        to its own size); its completion re-runs the rebalance. False if no
        move is under way or possible."""
        if any(j.remap is not None for j in mod):
            return True  # one move at a time keeps the layout predictable
        for j in sorted((j for j in mod if j.state == "active"), key=lambda j: -j.offset):
            if self.alloc.lower_fit(j.offset) is not None:
                self._start_remap(j, j.slots)
                return True
        return False

    def _region_for(self, job: Job, size: int | None) -> tuple[int, int]:
        if job.mode == "modulo":
            return self.alloc.alloc(size), size
        if job.mode == "hash":
            if self.hash_region is None:
                self.hash_region = (self.alloc.alloc(self.hash_slots), self.hash_slots)
            return self.hash_region
        if job.mode == "kv":
            return self._kv_region(job)
        return 0, 0

    def _kv_region(self, job: Job) -> tuple[int, int]:
        """Columns for a kv job: what its mappers asked for ('cols', default
        kv_cols/2), or less if less is free in one run, a multiple of its parts
        (one part per mapper unless it said 'parts'); at least one column per part."""
        parts = job.parts or job.world
        flows = sum(j.world for j in self.jobs.values() if j.mode == "kv" and j.state == "active")
        if flows + job.world > KV_MAX_FLOWS:
            raise AllocError(f"no room for job {job.id}'s {job.world} mappers: the switch keeps state for "
                             f"{KV_MAX_FLOWS} key-value flows and running jobs use {flows}")
        want = min(job.req_cols or self.kv_default_cols, self.kv_cols)
        size = min(want, self.kv_alloc.largest_free())
        size -= size % parts
        if size < parts:
            raise AllocError(
                f"no free key-value columns for job {job.id}: it needs at least {parts} (one per part), "
                f"the largest free run is {self.kv_alloc.largest_free()} of {self.kv_cols} "
                f"({self.kv_alloc.free_slots()} free)")
        job.parts = parts
        return self.kv_alloc.alloc(size), size

    def _activate(self, job: Job, size: int | None = None) -> None:
        try:
            job.offset, job.slots = self._region_for(job, size)
            # modulo: the window follows the memory granted; otherwise it is what was asked
            job.window = job.slots // 2 if job.mode == "modulo" else job.req_window
        except AllocError as e:
            job.state, job.error = "ended", str(e)
            self.jobs.pop(job.id, None)
            return
        job.gen = self._next_gen()
        job.elems = wire.elems_for_mtu(min(m.path.mtu for m in self._all_members(job)))
        if job.mode == "kv":
            try:
                self._program_kv(job)
            except Exception as e:  # e.g. the flow table is full: nothing of the job stays
                self._unprogram_kv(job)
                self.kv_alloc.free(job.offset)
                job.state, job.error = "ended", f"cannot program key-value job {job.id}: {e}"
                self.jobs.pop(job.id, None)
                return
        elif job.mode in MODE_CODE:
            self.dp.reset_stats(job.id)
            for m in job.members.values():
                self.dp.set_member(job.id, **self._member_fields(m))
            if job.ps is not None:
                self.dp.set_ps(job.id, **self._member_fields(job.ps))
            # Job entry last: packets are accepted only once results can be delivered.
            self.dp.set_job(job.id, offset=job.offset, slots=job.slots, gen=job.gen,
                            world=job.world, mode=MODE_CODE[job.mode])
        job.state = "active"
        self._changed()

    def _program_kv(self, job: Job) -> None:
        from bpf import kv_wire

        job.tuples = kv_wire.tuples_for_mtu(min(m.path.mtu for m in self._all_members(job)))
        self.dp.reset_stats(job.id)
        for m in job.members.values():  # a mapper's flow id is its rank
            self.dp.set_source(job.id, m.rank, socket.inet_aton(m.addr), m.port, m.path.ifindex)
        self.dp.set_ps(job.id, **self._member_fields(job.ps))  # the reducer
        # Fresh flows (seen state) and epoch 0; then both copies of its columns
        # emptied. Nobody has the new generation before the replies go out, so
        # no packet of this run can be absorbed before that.
        self.dp.set_kv_job(job.id, offset=job.offset, cols=job.slots, gen=job.gen, world=job.world,
                           parts=job.parts, epoch=0, reset_flows=True)
        self.dp.clear_kv(job.id, 0)
        self.dp.clear_kv(job.id, 1)
        job.kv_cleared = False
        job.kv_epoch = 0

    def _unprogram_kv(self, job: Job) -> None:
        """Removes a kv job from the switch: sources, reducer, columns (both
        epochs, emptied), flows, job entry."""
        for rank in job.members:
            self.dp.clear_source(job.id, rank)
        self.dp.clear_ps(job.id)
        self.dp.clear_kv_job(job.id)

    def kv_drain(self, job: Job, rank: int) -> dict:
        """The reducer's kv_drain: flips the job's epoch, waits the grace for
        packets that read the old one, then reads and empties the old copy.
        Returns each key once (sorted), with its sum over that copy."""
        import numpy as np

        with self.cond:
            if job.mode != "kv":
                raise RegistrationError(f"kv_drain: job {job.id} is a {job.mode} job, not a key-value one")
            if rank != -1:
                raise RegistrationError(f"kv_drain: only job {job.id}'s reducer may drain it, not a mapper")
            if job.state != "active":
                raise RegistrationError(f"kv_drain: job {job.id} is {job.state}")
        with job.kv_lock:  # the job's end waits for a drain under way (its columns stay its own)
            if job.kv_cleared or job.state != "active":
                raise RegistrationError(f"kv_drain: job {job.id} ended ({job.error or 'its reducer left'})")
            epoch = self.dp.flip_kv_epoch(job.id, KV_DRAIN_GRACE_S)
            keys, values = self.dp.drain_kv(job.id, epoch)
            job.kv_drains += 1
            job.kv_epoch = epoch ^ 1
        aggs = int(keys.size)
        if keys.size:
            keys, inv = np.unique(keys, return_inverse=True)
            sums = np.zeros(keys.size, np.int64)
            np.add.at(sums, inv, values)
            values = sums
        return {"ok": True, "job": job.id, "epoch": epoch, "active": epoch ^ 1, "aggregators": aggs,
                "keys": keys.tolist(), "values": values.tolist()}

    @staticmethod
    def _all_members(job: Job) -> list[Member]:
        return list(job.members.values()) + ([job.ps] if job.ps else [])

    @staticmethod
    def _member_fields(m: Member) -> dict:
        return dict(mac=m.path.mac, port_mac=m.path.port_mac, addr=socket.inet_aton(m.addr),
                    switch_addr=socket.inet_aton(m.path.switch_addr), port=m.port,
                    rank=max(m.rank, 0), ifindex=m.path.ifindex)

    # --- live resize (modulo) -------------------------------------------------
    # 1. propose: every rank reports the next psn it would send and stops there;
    # 2. fence: S = the largest of those; every rank finishes all psns < S;
    # 3. go: when all have, the job's region is idle: incd moves or resizes it,
    #    bumps the generation, and the ranks carry on from S with the new window.
    # No psn is aggregated in two regions and no result is lost; the pause is a
    # round trip plus the drain.
    def _start_remap(self, job: Job, size: int) -> None:
        self._remap_seq = getattr(self, "_remap_seq", 0) + 1
        job.remap = {"id": self._remap_seq, "size": size, "reports": {}, "passed": set(), "S": None,
                     "started": time.time()}
        for m in job.members.values():
            if m.alive and m.send:
                m.send({"event": "remap_propose", "job": job.id, "remap": job.remap["id"]})

    def expire_remaps(self, max_age_s: float = 5.0) -> None:
        """A resize that does not finish (a rank stopped answering) is called off:
        the ranks are released unchanged, so nobody waits at the fence for ever."""
        with self.cond:
            now = time.time()
            for job in list(self.jobs.values()):
                rm = job.remap
                if rm is not None and now - rm["started"] > max_age_s:
                    job.remap = None
                    for m in job.members.values():
                        if m.alive and m.send:
                            m.send({"event": "remap_go", "job": job.id, "remap": rm["id"], "gen": job.gen,
                                    "window": job.window, "offset": job.offset, "slots": job.slots})
            self._rebalance()

    def remap_report(self, job: Job, rank: int, remap_id: int, next_psn: int) -> None:
        with self.cond:
            rm = job.remap
            if rm is None or rm["id"] != remap_id or rm["S"] is not None:
                return
            rm["reports"][rank] = next_psn
            if len(rm["reports"]) == job.world:
                rm["S"] = max(rm["reports"].values())
                for m in job.members.values():
                    if m.alive and m.send:
                        m.send({"event": "remap_fence", "job": job.id, "remap": remap_id, "S": rm["S"]})

    def remap_passed(self, job: Job, rank: int, remap_id: int) -> None:
        with self.cond:
            rm = job.remap
            if rm is None or rm["id"] != remap_id or rm["S"] is None or job.state != "active":
                return
            rm["passed"].add(rank)
            if len(rm["passed"]) < job.world:
                return
            self.alloc.free(job.offset)
            try:
                job.offset = self.alloc.alloc(rm["size"])
                job.slots = rm["size"]
            except AllocError:  # could not grow after all: keep the old size
                job.offset = self.alloc.alloc(job.slots)
            job.window = job.slots // 2
            job.gen = self._next_gen()
            self.dp.set_job(job.id, offset=job.offset, slots=job.slots, gen=job.gen, world=job.world,
                            mode=MODE_CODE[job.mode])
            job.remap = None
            job.remaps_done += 1
            self._changed()
            for m in job.members.values():
                if m.alive and m.send:
                    m.send({"event": "remap_go", "job": job.id, "remap": remap_id, "gen": job.gen,
                            "window": job.window, "offset": job.offset, "slots": job.slots})
            self._rebalance()

    def leave(self, job: Job, rank: int, done: bool = False) -> None:
        """A member is gone: it said "done" (done=True), or its control connection
        closed. One that goes without "done" while workers still run (killed,
        crashed) fails the job at once: the others are told who ("job_failed"),
        and the job ends and frees its switch memory, instead of the others
        waiting for their timeouts."""
        with self.cond:
            m = job.ps if rank == -1 else job.members.get(rank)
            if m is None or not m.alive:
                return
            m.alive = False
            running = any(x.alive for x in job.members.values())
            if job.state == "active" and job.mode == "kv":
                # Mappers that said "done" leave early; the reducer drains after them
                # and its leaving ends the job. Anyone going without "done" fails it.
                if rank == -1:
                    if running:
                        left = sorted(r for r, x in job.members.items() if x.alive)
                        self._end(job, f"{m.who} (the reducer) left while mappers {left} were still running",
                                  culprits=[-1])
                    elif done:
                        self._end(job, None)
                    else:
                        self._end(job, f"{m.who} (the reducer) left without saying done "
                                       "(killed or crashed?)", culprits=[-1])
                elif not done:
                    self._end(job, f"{m.who} left before finishing: its control connection closed "
                                   "(killed or crashed?)", culprits=[rank])
            elif job.state == "active":
                if not done and running:
                    self._end(job, f"{m.who} left before finishing: its control connection closed "
                                   "(killed or crashed?)", culprits=[rank])
                elif not running:
                    self._end(job, None)
            self.cond.notify_all()

    def wait_end(self, job: Job) -> str:
        with self.cond:
            while job.state != "ended":
                self.cond.wait()
            return job.error or ("the reducer finished" if job.mode == "kv" else "all workers left")

    def _end(self, job: Job, reason: str | None, culprits: list | None = None) -> None:
        """Ends a job (reason None: its workers finished) and frees what it held.
        Members still connected learn how it ended, first: "job_ended", or
        "job_failed" with the reason and the ranks to blame (-1: the PS)."""
        ok_reason = "the reducer finished" if job.mode == "kv" else "all workers left"
        if reason is None:
            self._notify(job, {"event": "job_ended", "job": job.id, "reason": ok_reason})
        else:
            self._notify(job, {"event": "job_failed", "job": job.id, "error": reason,
                               "ranks": sorted(culprits or [])})
        final = None
        if job.state == "active" and job.mode == "kv":
            with job.kv_lock:  # after a drain under way
                final = self.dp.read_stats(job.id)
                final["epoch"] = self.dp.kv_epoch(job.id)
                final["drains"] = job.kv_drains
                self._unprogram_kv(job)
                self.kv_alloc.free(job.offset)
                job.kv_cleared = True
        elif job.state == "active":
            if job.mode in MODE_CODE:
                self.dp.clear_job(job.id)
                for m in job.members.values():
                    self.dp.del_member(job.id, m.path.ifindex)
                if job.ps is not None:
                    self.dp.clear_ps(job.id)
                final = self.dp.read_stats(job.id)
                if job.mode == "hash":
                    final["slots_cleared_at_end"] = self.dp.clear_slots(job.offset, job.slots, job.id)
            if job.mode == "modulo":
                self.alloc.free(job.offset)
        freed_modulo = job.state == "active" and job.mode == "modulo"
        job.state = "ended"
        job.error = reason
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        if job.mode == "hash" and self.hash_region is not None and not any(
                j.mode == "hash" and j.state == "active" for j in self.jobs.values()):
            self.alloc.free(self.hash_region[0])
            self.hash_region = None
        rec = job.public()
        rec["ended"] = time.time()
        rec["end_reason"] = reason or ok_reason
        rec["counters"] = final
        self.finished.append(rec)
        self._changed()
        if freed_modulo:
            self._rebalance()  # its memory may start a queued job
        self.cond.notify_all()

    def shutdown(self) -> None:
        with self.cond:
            self.closing = True
            for job in list(self.jobs.values()):
                self._end(job, "incd stopped")
            self.cond.notify_all()

    # --- failure detection: heartbeats and the watchdog -------------------------
    # A killed member is seen at once (its control connection closes: leave()).
    # A hung one (stopped, livelocked host) is seen by its heartbeats stopping:
    # each member sends one every fail_timeout/4 and is declared hung after
    # fail_timeout without one, checked whenever any heartbeat of its job comes
    # and by the watchdog. Silence of the whole job says nothing about any one
    # member (incd itself may have been stalled), so it blames nobody.
    def heartbeat(self, job: Job, rank: int, fail_timeout=None) -> None:
        """The member is alive and is hung after fail_timeout seconds of silence."""
        ft = fail_timeout
        if isinstance(ft, bool) or not isinstance(ft, (int, float)) or not 0.05 <= ft <= 3600:
            return
        with self.cond:
            m = job.ps if rank == -1 else job.members.get(rank)
            if m is None or not m.alive or job.state != "active":
                return
            now = time.monotonic()
            if job.last_beat is not None and now - job.last_beat > self._quiet_limit(job):
                for x in self._all_members(job):  # a stall of incd, not of the others
                    if x.last_seen is not None:
                        x.last_seen = now
            m.last_seen, m.fail_timeout = now, float(ft)
            job.last_beat = now
            self._check_hung(job, now)

    def _quiet_limit(self, job: Job) -> float:
        """No heartbeat from anyone in the job for this long: incd was stalled."""
        return 0.5 * min((x.fail_timeout for x in self._all_members(job) if x.fail_timeout), default=1.0)

    def _check_hung(self, job: Job, now: float) -> None:
        if job.state != "active" or job.last_beat is None or now - job.last_beat > self._quiet_limit(job):
            return
        hung = [x for x in self._all_members(job)
                if x.alive and x.last_seen is not None and now - x.last_seen > x.fail_timeout]
        if hung:
            self._end(job, "; ".join(f"{x.who} stopped responding: no heartbeat for {now - x.last_seen:.1f}s "
                                     f"(its limit {x.fail_timeout:g}s; hung or stopped?)" for x in hung),
                      culprits=[x.rank for x in hung])

    STALE_SCAN_S = 5.0

    def watchdog(self) -> None:
        """Called by the daemon about once a second: ends jobs with a hung member
        and, every STALE_SCAN_S, empties hash-region slots no running job owns."""
        with self.cond:
            now = time.monotonic()
            for job in list(self.jobs.values()):
                self._check_hung(job, now)
            if now >= self._next_scan:
                self._next_scan = now + self.STALE_SCAN_S
                self.clear_stale_slots()

    def clear_stale_slots(self) -> int:
        """Empties slots of the hash region tagged with a job (and generation)
        that is not running: left by a run that ended while its packets were in
        flight, or by an incd that died. The switch would take them over when a
        packet needs them; this keeps `held_slots` honest and nothing lingering.
        Returns how many were cleared."""
        with self.cond:
            if self.hash_region is None:
                return 0
            live = {(j.id, j.gen) for j in self.jobs.values() if j.mode == "hash" and j.state == "active"}
            off, size = self.hash_region
            empty = wire.SLOT_EMPTY
            n = 0
            for i in range(off, off + size):
                s = self.dp.read_slot(i)
                if s.state != empty and (s.job, s.gen) not in live:
                    self.dp.pool[ctypes.c_int(i)] = self.dp.pool.Leaf()
                    n += 1
            self.stale_cleared += n
            return n

    # --- recovery after an incd restart (see jobstate.py) -----------------------
    def rejoin(self, raw: dict, peer: str) -> tuple[Job, int]:
        """A member of a recovered job reconnects: same job, generation, rank and host."""
        try:
            job_id, rank, gen = (int(raw[k]) for k in ("job", "rank", "gen"))
        except (KeyError, TypeError, ValueError):
            raise RegistrationError("rejoin needs integer 'job', 'rank' (-1: PS) and 'gen'")
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None or job.state != "active":
                raise RegistrationError(f"job {job_id} is not running here (incd restarted without it, "
                                        "or it ended while incd was down)")
            if gen != job.gen:
                raise RegistrationError(f"job {job_id} is at generation {job.gen}, not {gen}")
            m = job.ps if rank == -1 else job.members.get(rank)
            if m is None or rank not in job.rejoin_wait:
                raise RegistrationError(f"job {job_id} has no absent member with rank {rank}")
            if m.addr != peer:
                raise RegistrationError(f"job {job_id} rank {rank} is {m.addr}, not {peer}")
            m.alive = True
            job.rejoin_wait.discard(rank)
            if not job.rejoin_wait:
                job.rejoin_by = None
            return job, rank

    def expire_rejoins(self) -> None:
        """Recovered jobs whose members did not all come back in time end, as if those had died."""
        with self.cond:
            now = time.time()
            for job in list(self.jobs.values()):
                if job.rejoin_by is not None and now > job.rejoin_by:
                    who = ", ".join((job.ps if r == -1 else job.members[r]).who for r in sorted(job.rejoin_wait))
                    self._end(job, f"incd restarted and {who} did not reconnect in time",
                              culprits=sorted(job.rejoin_wait))

    def _notify(self, job: Job, event: dict) -> None:
        for m in self._all_members(job):
            if m.alive and m.send:
                m.send(event)

    def snapshot(self) -> dict:
        with self.cond:
            jobs = []
            for job in sorted(self.jobs.values(), key=lambda j: j.id):
                rec = job.public()
                rec["counters"] = (self.dp.read_stats(job.id)
                                   if job.state == "active" and job.mode in MODE_CODE else None)
                if job.mode == "kv":
                    rec["epoch"] = self.dp.kv_epoch(job.id) if job.state == "active" else None
                jobs.append(rec)
            hash_region, held = None, 0
            if self.hash_region is not None:
                off, size = self.hash_region
                hash_region = {"offset": off, "slots": size, "held": self.dp.held_slots(off, size)}
                held = sum(n for k, n in hash_region["held"].items() if k != "reclaimable")
            owners = {j.offset: f"job {j.id}" for j in self.jobs.values()
                      if j.mode == "modulo" and j.state == "active"}
            if self.hash_region is not None:
                owners[self.hash_region[0]] = "hash"
            memory = sorted([{"offset": off, "slots": n, "owner": owners.get(off, "?")}
                             for off, n in self.alloc.regions().items()] +
                            [{"offset": off, "slots": n, "owner": None} for off, n in self.alloc.free_runs()],
                            key=lambda r: r["offset"])
            now = time.time()
            for rec, job in zip(jobs, sorted(self.jobs.values(), key=lambda j: j.id)):
                rec["need_slots"] = needed_slots(job.demand(), now, self.mm.link) if job.deadline else None
                rec["resizing"] = job.remap is not None
            return {
                "policy": self.mm.policy,
                "memory": memory,
                "pool_slots": self.alloc.size,
                "free_slots": self.alloc.free_slots(),
                "hash_slots": self.hash_slots,
                "regions": {str(k): v for k, v in sorted(self.alloc.regions().items())},
                "hash_region": hash_region,
                "held_slots": held,  # hash-region slots a live (job, psn) holds right now
                "stale_slots_cleared": self.stale_cleared,  # by the watchdog, since start
                "kv_cols": self.kv_cols,
                "kv_free_cols": self.kv_alloc.free_slots(),
                "kv_regions": {str(k): v for k, v in sorted(self.kv_alloc.regions().items())},
                "kv_flows": sum(j.world for j in self.jobs.values() if j.mode == "kv" and j.state == "active"),
                "jobs": jobs,
                "finished": list(self.finished),
                "unattributed": self.dp.read_stats(0)["drops"],
            }


def resolve_path(netinfo, peer: str, port_ifindexes: set[int]) -> Path:
    try:
        return netinfo.path_to(peer, port_ifindexes)
    except NetInfoError as e:
        raise RegistrationError(str(e)) from e
