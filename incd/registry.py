"""Jobs: the registration barrier, switch programming, and release when members leave.

Every rank of a job registers on its own TCP connection, and so does the job's
parameter server (PS) in hash and ps mode. When everyone is in, the job gets
switch memory and a new generation, the switch is programmed, and every
waiting member gets the same answer. A job ends when all of its workers have
said "done" (or closed their connections); its memory is freed, the slots it
still held are cleared, and its final counters are kept for `incd status`.
A member whose connection closes before it said "done", or whose heartbeats
stop, fails the job: the others get a "job_failed" event naming it, and the job
ends the same way (see leave() and watchdog.py).

Modes: "modulo" (NetReduce, switch only: 2W private slots), "hash" (ATP: a
region shared by all hash jobs, PS fallback), "ps" (the switch only forwards;
the plain parameter-server baseline), "kv" (key-value aggregation, word count:
mappers' tuples are summed by key in a private range of columns of the
switch's kv_pool; the reducer registers as the job's PS, gets what the switch
could not absorb, and drains the aggregators with kv_drain()). A kv job ends
when its reducer leaves; mappers leave with "done" when they have sent
everything, and one that goes without it fails the job.

The Registry is this module plus one mixin per concern: requests.py (what a
request may say), jobs.py (Job, Member), kv_jobs.py (columns, drains),
resize.py (policy, live resize, compaction), watchdog.py (heartbeats, stale
slots), recovery.py (restore after a restart, rejoin), status.py (snapshot).
"""
from __future__ import annotations

import collections
import hmac
import itertools
import socket
import threading
import time

from bpf import wire

from .allocator import AllocError, RegionAllocator
from .jobs import MODE_CODE, Job, Member
from .kv_jobs import KV_COLS_DEFAULT, KvJobs
from .memory import MemoryManager
from .netinfo import Path
from .recovery import Recovery
from .requests import RegistrationError, Request, token_digest, validate_register
from .resize import Resizing
from .status import Status
from .watchdog import Watchdog


class Registry(KvJobs, Resizing, Watchdog, Recovery, Status):
    def __init__(self, dataplane, pool_slots: int, port_names: dict[tuple[str, int], str],
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
        self._resize_ids = itertools.count(1)
        self.closing = False
        self.on_change = None  # called (under self.cond) when the running jobs change: saves them
        self._next_scan = 0.0    # watchdog: next stale-slot scan (monotonic)
        self.stale_cleared = 0   # hash-region slots the watchdog emptied so far
        # key-value jobs: private column ranges of the kv_pool (both epochs)
        self.kv_cols = int(getattr(dataplane, "kv_cols", KV_COLS_DEFAULT))
        self.kv_alloc = RegionAllocator(self.kv_cols)
        self.kv_default_cols = max(1, self.kv_cols // 2)  # a job that names no 'cols' gets up to this

    @property
    def last_gen(self) -> int:
        """The generation given out last (saved with the jobs: a restarted incd goes on from it)."""
        return self._gen

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _next_gen(self) -> int:
        self._gen = self._gen % 0xFFFF + 1
        return self._gen

    # --- the registration barrier ------------------------------------------------
    def register(self, raw: dict, peer: str, path: Path, timeout: float, gone=None) -> tuple[Job, int]:
        """Blocks until the job is complete. Returns the job and the member's rank
        (-1: PS). gone(): whether the registering connection closed meanwhile
        (then the member is taken out again at once)."""
        r = validate_register(raw)
        with self.cond:
            if self.closing:
                raise RegistrationError("incd is stopping")
            # Every check first: a refused request changes nothing (not the running
            # job it collides with, not the deadline of the job it would join).
            job = self._check_register(r, path)
            # Accepted: from here on the request takes effect.
            if job is None:
                job = Job(r.job, r.world, r.mode)
                job.token_digest = token_digest(r.job_token)
                self.jobs[r.job] = job
            self._join(job, r, peer, path)
            if job.complete():
                if job.mode == "modulo":
                    job.state = "queued"
                    self._rebalance()
                else:
                    self._activate(job)
                self.cond.notify_all()
            self._wait_start(job, r, timeout, gone)
            return job, r.rank

    def _check_register(self, r: Request, path: Path) -> Job | None:
        """The job the request joins (None: a new one); raises if the request
        conflicts with it or the job is running."""
        job = self.jobs.get(r.job)
        if job is not None and not hmac.compare_digest(job.token_digest, token_digest(r.job_token)):
            # First, and all it says: a stranger learns nothing of the job.
            raise RegistrationError(f"job {r.job}: wrong or missing job token (its members registered with "
                                    "--job-token / INC_JOB_TOKEN)" if job.token_digest else
                                    f"job {r.job} is registered without a job token; this request has one")
        if job is not None and (job.world, job.mode) != (r.world, r.mode):
            raise _differs(r.job, "running" if job.state == "active" else "being registered",
                           ("world", job.world, r.world), ("mode", job.mode, r.mode))
        if job is not None and job.state == "active":
            # Never replaced by a registration: only its members end a run (done,
            # or by going away), so nobody else can cut it short.
            left = sorted(x for x, m in job.members.items() if m.alive)
            why = (f"ranks {left} have not finished" if left else
                   "its members are to rejoin after an incd restart" if job.rejoin_wait else
                   "its reducer has not finished")
            raise RegistrationError(f"job {r.job} is running ({why}); its id can be reused once that run ends")
        if job is None:
            return None
        if r.role == "worker":
            if job.req_window is not None and (job.req_window, job.shape, job.frame) != (r.window, r.shape, r.frame):
                raise _differs(r.job, "being registered", ("window", job.req_window, r.window),
                               ("data", job.shape, r.shape), ("frame", job.frame, r.frame))
            if job.req_window is not None and (job.req_cols, job.parts) != (r.cols, r.parts):
                raise _differs(r.job, "being registered", ("cols", job.req_cols, r.cols),
                               ("parts", job.parts, r.parts))
            if r.rank in job.members:
                raise RegistrationError(f"job {r.job} rank {r.rank} is already registered")
        elif job.ps is not None:
            raise RegistrationError(f"job {r.job} already has a PS")
        if r.role == "worker" and job.mode not in ("ps", "kv"):  # kv: no per-port member entry
            for m in job.members.values():
                if (m.path.switch, m.path.ifindex) == (path.switch, path.ifindex):
                    raise RegistrationError(
                        f"job {r.job}: rank {m.rank} already sits behind switch port "
                        f"{self.port_name(path)}; one member per port per job")
        return job

    def _join(self, job: Job, r: Request, peer: str, path: Path) -> None:
        if r.role == "worker":
            if job.req_window is None:
                job.req_window, job.shape, job.frame = r.window, r.shape, r.frame
                job.req_cols, job.parts = r.cols, r.parts
            if r.deadline_s is not None or r.model_bytes:
                # the job's deadline and size, from whichever rank states them
                job.deadline = time.time() + r.deadline_s if r.deadline_s is not None else job.deadline
                job.model_bytes, job.epochs, job.compute_s = r.model_bytes, r.epochs, r.compute_s
        member = Member(r.rank, peer, r.port, path, self.port_name(path), datapath=r.datapath)
        if r.role == "ps":
            job.ps = member
        else:
            job.members[r.rank] = member

    def port_name(self, path: Path) -> str:
        return self.port_names.get((path.switch, path.ifindex), "?")

    def _wait_start(self, job: Job, r: Request, timeout: float, gone=None) -> None:
        """Waits (under self.cond) until the job runs; on a timeout, a stop or the
        member's connection closing, the member is taken out again and the error
        says what was missing."""
        deadline = time.monotonic() + timeout
        while job.state in ("pending", "queued"):
            left = deadline - time.monotonic()
            if gone is not None and gone():
                left = 0
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
            self.cond.wait(min(left, 0.5) if gone is not None else left)
        if job.state != "active":
            raise RegistrationError(job.error or f"job {r.job} ended before it started")

    # --- switch programming -------------------------------------------------------
    def _region_for(self, job: Job, size: int | None) -> tuple[int, int]:
        if job.mode == "modulo":
            return self.alloc.alloc(size), size
        if job.mode == "hash":
            if self.hash_region is None:
                self.hash_region = (self.alloc.alloc(self.hash_slots), self.hash_slots)
            return self.hash_region
        if job.mode == "kv":
            return self._kv_columns(job)
        return 0, 0

    def _activate(self, job: Job, size: int | None = None) -> None:
        small = [m for m in job.all_members() if m.path.mtu < wire.JUMBO_IP_BYTES] if job.frame == "jumbo" else []
        if small:
            job.state = "ended"
            job.error = (f"job {job.id}: jumbo frames need an MTU of {wire.JUMBO_IP_BYTES} on every member's switch "
                         f"port; " + ", ".join(f"{m.ifname} has {m.path.mtu}" for m in small))
            self.jobs.pop(job.id, None)
            return
        where = self.dp.placement_error(job.mode, job.frame, {m.path.switch for m in job.all_members()})
        if where:
            job.state, job.error = "ended", f"job {job.id}: {where}"
            self.jobs.pop(job.id, None)
            return
        try:
            job.offset, job.slots = self._region_for(job, size)
            # modulo: the window follows the memory granted; otherwise it is what was asked
            job.window = job.slots // 2 if job.mode == "modulo" else job.req_window
        except AllocError as e:
            job.state, job.error = "ended", str(e)
            self.jobs.pop(job.id, None)
            return
        job.gen = self._next_gen()
        job.tiers = self.dp.tiers({m.path.switch for m in job.all_members()})
        job.elems = wire.elems_for_mtu(min(m.path.mtu for m in job.all_members()))
        if job.mode == "kv":
            if not self._activate_kv(job):
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

    @staticmethod
    def _member_fields(m: Member) -> dict:
        return dict(mac=m.path.mac, port_mac=m.path.port_mac, addr=socket.inet_aton(m.addr),
                    switch_addr=socket.inet_aton(m.path.switch_addr), port=m.port,
                    rank=max(m.rank, 0), ifindex=m.path.ifindex, switch=m.path.switch)

    # --- leaving and the end of a job -----------------------------------------------
    def leave(self, job: Job, rank: int, done: bool = False, reason: str | None = None) -> None:
        """A member is gone: it said "done" (done=True), or its control connection
        closed. One that goes without "done" while workers still run (killed,
        crashed) fails the job at once: the others are told who ("job_failed"),
        and the job ends and frees its switch memory, instead of the others
        waiting for their timeouts. reason: why it is gone, if not only that
        (its own "abort", or incd cut it off): that fails the job whatever its state."""
        with self.cond:
            m = job.member(rank)
            if m is None or not m.alive:
                return
            m.alive = False
            if reason is not None:
                if job.state != "ended":
                    self._end(job, f"{m.who} {reason}", culprits=[rank])
                self.cond.notify_all()
                return
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
            return job.error or job.ok_reason

    def _end(self, job: Job, reason: str | None, culprits: list | None = None) -> None:
        """Ends a job (reason None: its workers finished) and frees what it held.
        Members still connected learn how it ended, first: "job_ended", or
        "job_failed" with the reason and the ranks to blame (-1: the PS)."""
        if reason is None:
            self._notify(job, {"event": "job_ended", "job": job.id, "reason": job.ok_reason})
        else:
            self._notify(job, {"event": "job_failed", "job": job.id, "error": reason,
                               "ranks": sorted(culprits or [])})
        final = None
        if job.state == "active" and job.mode == "kv":
            final = self._end_kv(job)
        elif job.state == "active":
            if job.mode in MODE_CODE:
                self.dp.clear_job(job.id)
                for m in job.members.values():
                    self.dp.del_member(job.id, m.path.ifindex, m.path.switch)
                if job.ps is not None:
                    self.dp.clear_ps(job.id)
                final = self.dp.read_stats(job.id)
                # Emptied now: generations are 16 bits, and a later run whose job id and
                # generation come round again must not find this run's sums (modulo) or
                # partials (hash) in the region.
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
        rec["end_reason"] = reason or job.ok_reason
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

    def _notify(self, job: Job, event: dict) -> None:
        for m in job.all_members():
            if m.alive and m.send:
                m.send(event)


def _differs(job: int, state: str, *fields: tuple) -> RegistrationError:
    """A request that disagrees with the job it would join: which fields differ
    and what the request says, not the job's values (incd status shows them
    to root): a stranger learns no more of a job than that it exists."""
    diff = [(name, mine) for name, theirs, mine in fields if theirs != mine]
    return RegistrationError(f"job {job} is {state} with another {' and '.join(n for n, _ in diff)} (see incd "
                             f"status); this request says {' '.join(f'{n}={v}' for n, v in diff)}")
