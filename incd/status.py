"""What `incd status` shows of the registry: running and finished jobs with
their counters, who holds which switch memory, the hash region and the
key-value columns. A mixin of Registry (reads its state under its cond)."""
from __future__ import annotations

import time

from bpf import wire

from .jobs import MODE_CODE
from .memory import needed_slots


class Status:
    def missing_ranks(self, job, psn: int) -> list[int] | None:
        """The ranks whose contribution to psn the switch has not got, if its
        slot holds that psn of this run (else None: nothing to tell)."""
        with self.cond:
            if job.state != "active" or not (job.mode == "modulo" and job.slots
                                             or job.mode == "hash" and self.hash_region):
                return None
            psn &= 0xFFFFFFFF
            if job.mode == "modulo":
                idx = job.offset + psn % job.slots
            else:
                idx = int(wire.hash_slots(job.id, [psn], *self.hash_region)[0])
            return self.dp.missing_ranks(job.id, job.gen, psn, idx, job.world)

    def snapshot(self) -> dict:
        with self.cond:
            running = sorted(self.jobs.values(), key=lambda j: j.id)
            now = time.time()
            jobs = []
            for job in running:
                rec = job.public()
                rec["counters"] = (self.dp.read_stats(job.id)
                                   if job.state == "active" and job.mode in MODE_CODE else None)
                if job.mode == "kv":
                    rec["epoch"] = self.dp.kv_epoch(job.id) if job.state == "active" else None
                rec["need_slots"] = needed_slots(job.demand(), now, self.mm.link) if job.deadline else None
                rec["resizing"] = job.resize is not None
                jobs.append(rec)
            hash_region, held = None, 0
            if self.hash_region is not None:
                off, size = self.hash_region
                hash_region = {"offset": off, "slots": size, "held": self.dp.held_slots(off, size)}
                held = sum(n for k, n in hash_region["held"].items() if k != "reclaimable")
            return {
                "policy": self.mm.policy,
                "memory": self._memory_map(),
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
                "kv_flows": self._kv_flows_in_use(),
                "jobs": jobs,
                "finished": list(self.finished),
                "unattributed": self.dp.read_stats(0)["drops"],
            }

    def _memory_map(self) -> list[dict]:
        """The pool's regions in order: who holds each ("job N", "hash"), free runs with owner None."""
        owners = {j.offset: f"job {j.id}" for j in self.jobs.values()
                  if j.mode == "modulo" and j.state == "active"}
        if self.hash_region is not None:
            owners[self.hash_region[0]] = "hash"
        return sorted([{"offset": off, "slots": n, "owner": owners.get(off, "?")}
                       for off, n in self.alloc.regions().items()] +
                      [{"offset": off, "slots": n, "owner": None} for off, n in self.alloc.free_runs()],
                      key=lambda r: r["offset"])
