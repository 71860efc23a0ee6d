"""Failure detection in the registry: heartbeats and the watchdog.

A killed member is seen at once (its control connection closes: leave()).
A hung one (stopped, livelocked host) is seen by its heartbeats stopping:
each member sends one every fail_timeout/4 and is declared hung after
fail_timeout without one, checked whenever any heartbeat of its job comes
and by the watchdog. Silence of the whole job says nothing about any one
member (incd itself may have been stalled), so it blames nobody.

A mixin of Registry: it uses the registry's dp, cond, jobs, hash_region and _end()."""
from __future__ import annotations

import ctypes
import time

from bpf import control, wire

from .jobs import Job

STALE_SCAN_S = 5.0  # how often the watchdog looks for stale hash-region slots


class Watchdog:
    STALE_SCAN_S = STALE_SCAN_S

    def heartbeat(self, job: Job, rank: int, fail_timeout=None) -> None:
        """The member is alive and is hung after fail_timeout seconds of silence."""
        ft = fail_timeout
        if isinstance(ft, bool) or not isinstance(ft, (int, float)) or not 0.05 <= ft <= control.MAX_FAIL_TIMEOUT:
            return
        with self.cond:
            m = job.member(rank)
            if m is None or not m.alive or job.state != "active":
                return
            now = time.monotonic()
            if job.last_beat is not None and now - job.last_beat > self._quiet_limit(job):
                for x in job.all_members():  # a stall of incd, not of the others
                    if x.last_seen is not None:
                        x.last_seen = now
            m.last_seen, m.fail_timeout = now, float(ft)
            job.last_beat = now
            self._check_hung(job, now)

    @staticmethod
    def _quiet_limit(job: Job) -> float:
        """No heartbeat from anyone in the job for this long: incd was stalled."""
        return 0.5 * min((x.fail_timeout for x in job.all_members() if x.fail_timeout), default=1.0)

    def _check_hung(self, job: Job, now: float) -> None:
        if job.state != "active" or job.last_beat is None or now - job.last_beat > self._quiet_limit(job):
            return
        hung = [x for x in job.all_members()
                if x.alive and x.last_seen is not None and now - x.last_seen > x.fail_timeout]
        if hung:
            self._end(job, "; ".join(f"{x.who} stopped responding: no heartbeat for {now - x.last_seen:.1f}s "
                                     f"(its limit {x.fail_timeout:g}s; hung or stopped?)" for x in hung),
                      culprits=[x.rank for x in hung])

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
