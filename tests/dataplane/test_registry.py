"""incd's job registry with the real dataplane loaded (no traffic): the live
resize protocol and compaction, with the test playing the ranks' side."""
from __future__ import annotations

import ctypes as ct
import threading
import time

import pytest

from helpers.polling import wait_event
from helpers.registry import PATH
from incd.memory import Link, MemoryManager
from incd.registry import Registry

class Rank:
    """One rank of a one-rank job: registers in a thread, records pushed events."""

    def __init__(self, reg: Registry, job: int, window: int, port: int, host: int | None = None, **demand):
        self.reg, self.events, self.job = reg, [], None
        req = {"job": job, "rank": 0, "world": 1, "window": window, "port": port, "mode": "modulo", **demand}
        self.t = threading.Thread(target=self._register, args=(req, host or port))
        self.t.start()

    def _register(self, req, i):
        self.job, _ = self.reg.register(req, f"10.77.{i}.2", PATH[i], timeout=10)
        self.job.members[0].send = self.events.append

    def wait(self):
        self.t.join(10)
        assert self.job is not None and self.job.state == "active"
        # the reply and `send` come right after activation
        deadline = time.time() + 2
        while self.job.members[0].send is None and time.time() < deadline:
            time.sleep(0.01)
        return self.job

    def serve_resize(self, next_psn: int):
        """What hostagent.transport does: report, drain to S, and be done."""
        ev = wait_event(self.events, "remap_propose")
        self.reg.resize_report(self.job, 0, ev["remap"], next_psn)
        ev = wait_event(self.events, "remap_fence")
        assert ev["S"] == next_psn  # one rank: S is its own position
        self.reg.resize_passed(self.job, 0, ev["remap"])
        return wait_event(self.events, "remap_go")


def regions(reg):
    return {int(k): v for k, v in reg.snapshot()["regions"].items()}


def test_resize_protocol_and_compaction(dp):
    reg = Registry(dp, 64, {}, memory=MemoryManager(64, "edf", Link()))
    ranks = []
    for j in (1, 2, 3):  # one after the other: a at 0, b at 16, c at 32 (in threads the order is chance)
        ranks.append(Rank(reg, j, 8, j))
        ranks[-1].wait()
    a, b, c = ranks
    ja, jb, jc = a.job, b.job, c.job
    assert (ja.offset, jb.offset, jc.offset) == (0, 16, 32) and regions(reg) == {0: 16, 16: 16, 32: 16}
    gen_c = jc.gen
    reg.leave(ja, 0)                       # a hole at 0..15, free 48..63
    d = Rank(reg, 4, 16, 4)                # wants 32: fits in total, not in one run
    go = c.serve_resize(next_psn=1000)      # so the highest job (c, at 32) is moved down
    assert (go["offset"], go["slots"]) == (0, 16) and go["gen"] != gen_c
    jd = d.wait()
    assert (jd.offset, jd.slots) == (32, 32)
    assert (jc.offset, jc.slots, jc.window, jc.gen) == (0, 16, 8, go["gen"])
    assert regions(reg) == {0: 16, 16: 16, 32: 32}
    v = dp.jobs[__import__("ctypes").c_int(3)]
    assert (v.offset, v.slots, v.gen) == (0, 16, go["gen"])  # the switch got the new region


def test_a_deadline_job_shrinks_a_running_one(dp):
    reg = Registry(dp, 64, {}, memory=MemoryManager(64, "edf", Link()))
    big = Rank(reg, 11, 32, 1)
    jb = big.wait()
    assert jb.slots == 64
    urgent = Rank(reg, 12, 32, 2, deadline_s=20, model_bytes=500_000_000, epochs=5, compute_s=0.1)
    go = big.serve_resize(next_psn=77)
    ju = urgent.wait()
    assert go["slots"] < 64 and jb.slots == go["slots"] and jb.window == go["slots"] // 2
    assert ju.slots + jb.slots <= 64
    assert not (set(range(ju.offset, ju.offset + ju.slots)) & set(range(jb.offset, jb.offset + jb.slots)))
    reg.leave(ju, 0)                       # and the big job grows back once it is gone
    go = big.serve_resize(next_psn=500)
    assert go["slots"] == 64 and jb.slots == 64


def test_a_generation_that_comes_round_again_finds_its_region_empty(dp):
    """Generations are 16 bits: when job 5 gets the generation of an earlier run
    of job 5 again, nothing that run left in the switch (a completed sum, a
    partial) may still be there to answer its first packets."""
    from bpf import wire

    reg = Registry(dp, 64, {}, memory=MemoryManager(64, "fifo", Link()))
    first = Rank(reg, 5, 8, 1)
    job = first.wait()
    gen, offset, slots = job.gen, job.offset, job.slots
    for i, state in ((offset + 3, wire.SLOT_COMPLETE), (offset + 4, wire.SLOT_PARTIAL)):
        leaf = dp.pool.Leaf()  # what the switch leaves: a psn's sum or partial of this run
        leaf.job, leaf.gen, leaf.psn, leaf.state, leaf.count, leaf.numel = 5, gen, i - offset, state, 1, 4
        leaf.lanes[0] = 1234
        dp.pool[ct.c_int(i)] = leaf
    reg.leave(job, 0, done=True)
    fin = reg.snapshot()["finished"][-1]
    assert fin["job"] == 5 and fin["counters"]["slots_cleared_at_end"] == 2
    reg._gen = gen - 1  # as if the 16-bit counter came round: the next run gets `gen` again
    again = Rank(reg, 5, 8, 1).wait()
    assert again.gen == gen and again.offset == offset
    left = [i for i in range(offset, offset + slots) if dp.read_slot(i).state != wire.SLOT_EMPTY]
    assert left == []
    reg.leave(again, 0, done=True)


def test_a_job_that_ignores_a_resize_fails_and_gives_its_memory_back(dp):
    """Job 21 holds the whole pool and never answers the resize a deadline job
    needs: after the resize's time is up, job 21 fails naming its rank, and the
    deadline job gets the memory."""
    reg = Registry(dp, 64, {}, memory=MemoryManager(64, "edf", Link()))
    hog = Rank(reg, 21, 32, 1)
    jh = hog.wait()
    assert jh.slots == 64
    urgent = Rank(reg, 22, 32, 2, deadline_s=20, model_bytes=500_000_000, epochs=5, compute_s=0.1)
    wait_event(hog.events, "remap_propose")  # and ignored
    reg.expire_resizes(max_age_s=0.0)
    ju = urgent.wait()
    assert jh.state == "ended" and "rank 0 did not report its position of a live resize" in jh.error
    assert any(e.get("event") == "job_failed" for e in hog.events)
    assert ju.state == "active" and ju.slots > 0
    reg.leave(ju, 0, done=True)


def test_the_jobs_of_one_host_hold_at_most_max_host_slots(dp):
    """One host cannot take the pool with many jobs each under max_job_slots:
    its next job waits while another host's job gets memory at once."""
    reg = Registry(dp, 64, {}, memory=MemoryManager(64, "fifo", Link(), max_host_slots=32))
    a = Rank(reg, 31, 16, 41, host=1)           # host 1: 32 slots, its whole share
    ja = a.wait()
    assert ja.slots == 32
    b = Rank(reg, 32, 8, 42, host=1)            # host 1 again: waits
    c = Rank(reg, 33, 8, 43, host=2)            # another host: runs
    jc = c.wait()
    assert jc.slots == 16
    time.sleep(0.3)
    assert b.job is None or b.job.state != "active"
    reg.leave(ja, 0, done=True)                 # host 1's share frees: b runs
    jb = b.wait()
    assert jb.slots == 16 and reg.snapshot()["free_slots"] == 32
    for j in (jb, jc):
        reg.leave(j, 0, done=True)
