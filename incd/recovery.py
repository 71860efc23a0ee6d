"""After an incd restart: the registry takes back the running jobs a saved job
table names (restore(); jobstate.py reads and writes the file), and their
members reconnect ("rejoin") within a grace time or the job ends as if they
had died. The switch state of those jobs never left the pinned maps.

A mixin of Registry: it uses the registry's dp, cond, jobs, alloc, kv_alloc,
hash_region, _gen and _end()."""
from __future__ import annotations

import hmac

import time

from .jobs import Job
from .requests import RegistrationError


class Recovery:
    def restore(self, gen: int, hash_region: tuple[int, int] | None, jobs: list[Job],
                grace_s: float) -> list[int]:
        """Takes back running jobs saved by a previous incd: their memory is
        reserved where it was, and each member marked alive in `jobs` (it was
        connected when incd died) must rejoin within grace_s; all start absent.
        Returns the job ids."""
        with self.cond:
            self._gen = int(gen)
            if hash_region:
                off, size = hash_region
                self.alloc.reserve(off, size)
                self.hash_region = (off, size)
            for j in jobs:
                # those connected when incd died must come back; who had left stays gone
                j.rejoin_wait = {m.rank for m in j.all_members() if m.alive}
                for m in j.all_members():
                    m.alive = False  # until it rejoins
                if j.mode == "modulo":
                    self.alloc.reserve(j.offset, j.slots)
                elif j.mode == "kv":
                    self.kv_alloc.reserve(j.offset, j.cols)
                    j.kv_epoch = self.dp.kv_epoch(j.id)  # the pinned job entry has the active copy
                j.state = "active"
                self.dp.recovered(j.id, [(m.path.switch, m.rank, m.path.ifindex) for m in j.members.values()])
                j.rejoin_by = time.time() + grace_s
                self.jobs[j.id] = j
            return [j.id for j in jobs]

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
            m = job.member(rank)
            if m is None or rank not in job.rejoin_wait:
                raise RegistrationError(f"job {job_id} has no absent member with rank {rank}")
            if m.addr != peer:
                raise RegistrationError(f"job {job_id} rank {rank} is {m.addr}, not {peer}")
            if m.token is not None and not hmac.compare_digest(str(raw.get("token", "")), m.token):
                raise RegistrationError(f"job {job_id} rank {rank}: wrong or missing token "
                                        "(the one incd gave this member when it joined)")
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
                    who = ", ".join(job.member(r).who for r in sorted(job.rejoin_wait))
                    self._end(job, f"incd restarted and {who} did not reconnect in time",
                              culprits=sorted(job.rejoin_wait))
