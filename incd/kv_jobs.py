"""Key-value (word count) jobs in the registry: each job's range of columns of
the switch's kv_pool, programming its mappers' flows and its reducer, and the
reducer's drains (epoch flips).

A kv job's Job.offset/slots are its columns (Job.cols); a mapper's rank is its
flow id (Member.flow); the job's PS is its reducer (Job.reducer). A mixin of
Registry: it uses the registry's dp, cond, jobs and kv_alloc."""
from __future__ import annotations

import socket

from bpf import kv_wire, wire

from .allocator import AllocError
from .jobs import Job
from .requests import RegistrationError

KV_DRAIN_GRACE_S = 0.01  # after an epoch flip, before the old copy is read (XDP runs a packet in microseconds)
KV_MAX_FLOWS = wire.KV_MAX_FLOWS   # mappers of all kv jobs together
KV_COLS_DEFAULT = wire.KV_COLS_DEFAULT


class KvJobs:
    def _kv_flows_in_use(self) -> int:
        return sum(j.world for j in self.jobs.values() if j.mode == "kv" and j.state == "active")

    def _kv_columns(self, job: Job) -> tuple[int, int]:
        """Columns for a kv job: what its mappers asked for ('cols', default
        kv_cols/2), or less if less is free in one run, a multiple of its parts
        (one part per mapper unless it said 'parts'); at least one column per part."""
        parts = job.parts or job.world
        flows = self._kv_flows_in_use()
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

    def _program_kv(self, job: Job) -> None:
        job.tuples = kv_wire.tuples_for_mtu(min(m.path.mtu for m in job.all_members()))
        self.dp.reset_stats(job.id)
        for m in job.members.values():
            self.dp.set_source(job.id, m.flow, socket.inet_aton(m.addr), m.port, m.path.ifindex)
        self.dp.set_ps(job.id, **self._member_fields(job.reducer))
        # Fresh flows (seen state) and epoch 0; then both copies of its columns
        # emptied. Nobody has the new generation before the replies go out, so
        # no packet of this run can be absorbed before that.
        self.dp.set_kv_job(job.id, offset=job.offset, cols=job.cols, gen=job.gen, world=job.world,
                           parts=job.parts, epoch=0, reset_flows=True)
        self.dp.clear_kv(job.id, 0)
        self.dp.clear_kv(job.id, 1)
        job.kv_cleared = False
        job.kv_epoch = 0

    def _unprogram_kv(self, job: Job) -> None:
        """Removes a kv job from the switch: sources, reducer, columns (both
        epochs, emptied), flows, job entry."""
        for m in job.members.values():
            self.dp.clear_source(job.id, m.flow)
        self.dp.clear_ps(job.id)
        self.dp.clear_kv_job(job.id)

    def _activate_kv(self, job: Job) -> bool:
        """Programs the switch for a kv job that got its columns; False (and the
        job ended, nothing of it left) if the switch refuses, e.g. a full flow table."""
        try:
            self._program_kv(job)
        except Exception as e:
            self._unprogram_kv(job)
            self.kv_alloc.free(job.offset)
            job.state, job.error = "ended", f"cannot program key-value job {job.id}: {e}"
            self.jobs.pop(job.id, None)
            return False
        return True

    def _end_kv(self, job: Job) -> dict:
        """Frees a running kv job's columns and flows; returns its final counters."""
        with job.kv_lock:  # after a drain under way
            final = self.dp.read_stats(job.id)
            final["epoch"] = self.dp.kv_epoch(job.id)
            final["drains"] = job.kv_drains
            self._unprogram_kv(job)
            self.kv_alloc.free(job.offset)
            job.kv_cleared = True
        return final

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
