"""Sharing the pool among modulo jobs: the memory policy's targets, live
resizes of running jobs, and compaction when free memory is fragmented.

Live resize, driven by incd with the job's ranks (the control API's ops and
events keep their first name, "remap_*"):
1. propose: every rank reports the next psn it would send and stops there;
2. fence: S = the largest of those; every rank finishes all psns < S;
3. go: when all have, the job's region is idle: incd moves or resizes it,
   bumps the generation, and the ranks carry on from S with the new window.
No psn is aggregated in two regions and no result is lost; the pause is a
round trip plus the drain.

A mixin of Registry: it uses the registry's dp, cond, jobs, alloc, mm and
hash_region."""
from __future__ import annotations

import time

from .allocator import AllocError
from .jobs import MODE_CODE, Job, Resize

RESIZE_MAX_AGE_S = 5.0  # a resize not done by then is called off


class Resizing:
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
            if j.state == "active" and j.resize is None and j.min_slots <= want < j.slots:
                self._start_resize(j, want)
        for j in mod:
            want = targets.get(j.id, 0)
            if j.state == "queued" and want >= j.min_slots:
                if self.alloc.largest_free() < want <= self.alloc.free_slots() and self._compact(mod):
                    continue  # fragmented: a job is moving down; this one starts when it is done
                size = min(want, self.alloc.largest_free())
                size -= size % 2
                if size >= j.min_slots:
                    self._activate(j, size)
            elif (j.state == "active" and j.resize is None and want > j.slots
                  and self.alloc.fits_if_moved(j.offset, want) and not any(x.state == "queued" for x in mod)):
                self._start_resize(j, want)  # grow into memory nobody waits for
        self.cond.notify_all()

    def _compact(self, mod: list[Job]) -> bool:
        """Moves the highest-placed job that has a lower hole to go to (a resize
        to its own size); its completion re-runs the rebalance. False if no
        move is under way or possible."""
        if any(j.resize is not None for j in mod):
            return True  # one move at a time keeps the layout predictable
        for j in sorted((j for j in mod if j.state == "active"), key=lambda j: -j.offset):
            if self.alloc.lower_fit(j.offset) is not None:
                self._start_resize(j, j.slots)
                return True
        return False

    def _start_resize(self, job: Job, size: int) -> None:
        job.resize = Resize(next(self._resize_ids), size)  # _resize_ids: an itertools.count of the Registry
        self._tell_ranks(job, {"event": "remap_propose", "job": job.id, "remap": job.resize.id})

    def _tell_ranks(self, job: Job, event: dict) -> None:
        for m in job.members.values():
            if m.alive and m.send:
                m.send(event)

    def _resize_go(self, job: Job, resize_id: int) -> None:
        self._tell_ranks(job, {"event": "remap_go", "job": job.id, "remap": resize_id, "gen": job.gen,
                               "window": job.window, "offset": job.offset, "slots": job.slots})

    def expire_resizes(self, max_age_s: float = RESIZE_MAX_AGE_S) -> None:
        """A resize that does not finish in time fails its job, naming the ranks
        that did not follow it, and frees the job's memory: a live agent answers
        within milliseconds, and a member that ignores resizes must not keep
        memory other jobs are waiting for."""
        with self.cond:
            now = time.time()
            for job in list(self.jobs.values()):
                rs = job.resize
                if rs is not None and now - rs.started > max_age_s:
                    done = rs.reports if rs.fence is None else rs.passed
                    late = sorted(r for r in job.members if r not in done)
                    step = "report its position" if rs.fence is None else "pass the fence"
                    job.resize = None
                    self._end(job, f"rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} did not "
                                   f"{step} of a live resize within {max_age_s:.0f}s; the job's switch memory "
                                   "was taken back", culprits=late)
            self._rebalance()

    def resize_report(self, job: Job, rank: int, resize_id: int, next_psn: int) -> None:
        """A rank's answer to the proposal: the next psn it would send."""
        with self.cond:
            rs = job.resize
            if rs is None or rs.id != resize_id or rs.fence is not None:
                return
            rs.reports[rank] = next_psn
            if len(rs.reports) == job.world:
                rs.fence = max(rs.reports.values())
                self._tell_ranks(job, {"event": "remap_fence", "job": job.id, "remap": resize_id, "S": rs.fence})

    def resize_passed(self, job: Job, rank: int, resize_id: int) -> None:
        """A rank has every psn below the fence back; the last one completes the resize."""
        with self.cond:
            rs = job.resize
            if rs is None or rs.id != resize_id or rs.fence is None or job.state != "active":
                return
            rs.passed.add(rank)
            if len(rs.passed) < job.world:
                return
            self.dp.clear_slots(job.offset, job.slots, job.id)  # nothing of this generation stays behind
            self.alloc.free(job.offset)
            try:
                job.offset = self.alloc.alloc(rs.size)
                job.slots = rs.size
            except AllocError:  # could not grow after all: keep the old size
                job.offset = self.alloc.alloc(job.slots)
            job.window = job.slots // 2
            job.gen = self._next_gen()
            self.dp.set_job(job.id, offset=job.offset, slots=job.slots, gen=job.gen, world=job.world,
                            mode=MODE_CODE[job.mode])
            job.resize = None
            job.resizes_done += 1
            self._changed()
            self._resize_go(job, resize_id)
            self._rebalance()
