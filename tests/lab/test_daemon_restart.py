"""incd killed with -9 mid-job, then started again. The switch's maps and
programs are pinned, so the dataplane keeps aggregating while incd is down;
the new incd reads the saved job table, adopts the pinned maps, and the members
reconnect ("rejoin"), so the running job finishes exactly. When the state
cannot be taken over (other configuration) or a member does not come back, the
job fails cleanly: a clear error, memory reclaimed, the next job exact. A clean
`incd stop` after a crash leaves no XDP program, pin or state file."""
from __future__ import annotations

import json
import os
import time

import pytest

from incd import daemon
from incd.process import IncdProcess
from netns_lab.harness import LabWithIncd
from helpers.agents import Agent, assert_failed, assert_reclaimed, exits_after, next_job_is_exact
from helpers.polling import wait_rejoined, wait_running

# Long enough (about 15 s here) that the job is still running when the new incd is up.
ITERS = "2500"


def long_job(lab, job: int, world: int, mode: str, *extra: str) -> list[Agent]:
    return [Agent(lab, f"h{r + 1}", "allreduce", "--job", str(job), "--rank", str(r), "--world", str(world),
                  "--mode", mode, "--numel", "400000", "--dtype", "int32", "--iters", ITERS, "--verify",
                  "--json", *extra) for r in range(world)]


def result(a: Agent, timeout: float = 180.0) -> dict:
    out, _ = a.proc.communicate(timeout=timeout)
    assert a.proc.returncode == 0, a.stderr()[-800:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def rlab(root):
    with LabWithIncd("r", workers=3, ps=True) as lab:
        yield lab


@pytest.mark.parametrize("mode", ["modulo", "hash"])
def test_killed_incd_is_restarted_and_the_job_finishes(rlab, mode):
    job = 90
    ps = Agent(rlab, "ps", "ps", "--job", str(job), "--world", "3", "--json") if mode == "hash" else None
    ws = long_job(rlab, job, 3, mode)
    try:
        before = wait_running(rlab, job, ws)
        pid = rlab.incd.kill()
        assert daemon.recoverable(rlab.incd.instance)
        rlab.incd.start()
        assert rlab.incd.status()["pid"] != pid
        after = wait_rejoined(rlab, job)
        # the same switch memory and generation: the pinned maps were taken over as they were
        assert (after["offset"], after["slots"], after["gen"]) == (before["offset"], before["slots"], before["gen"])
        assert all(a.proc.poll() is None for a in ws), "the job ended before incd was back; raise ITERS"
        res = [result(a) for a in ws]
        assert all(r["verified"] and r["rejoins"] == 1 and not r["ctrl_lost"] for r in res), res
        if ps:
            ps.proc.communicate(timeout=30)
            assert ps.proc.returncode == 0, ps.stderr()[-500:]
        rec = assert_reclaimed(rlab, job)
        assert rec["end_reason"] == "all workers left"
        if mode == "modulo":  # every packet aggregated by the switch, across both incds (hash: some by the PS)
            assert rec["counters"]["slots_completed"] == int(ITERS) * 500
    finally:
        for a in ws + ([ps] if ps else []):
            a.kill()
    next_job_is_exact(rlab, job + 1, mode)


def test_restart_with_another_configuration_fails_the_job_cleanly(rlab):
    """A pool of another size cannot reuse the pinned maps: the new incd starts
    fresh, and the members that try to rejoin are told so."""
    ws = long_job(rlab, 92, 3, "modulo")
    try:
        wait_running(rlab, 92, ws)
        rlab.incd.kill()
        rlab.incd = IncdProcess(rlab.incd.instance, lab=rlab.name, extra=["--pool-slots", "2048"]).start()
        t0 = time.monotonic()
        took = exits_after(ws, t0, timeout=60)
        # refused when they rejoin, or (if the new incd was slow to come up) failed for want of results
        assert_failed(ws, took, "job 92: lost the control connection to incd")
        for a in ws:
            err = a.stderr()
            assert "job 92 is not running here" in err or "no result came" in err, err[-500:]
        st = rlab.incd.status()
        assert st["pool_slots"] == 2048 and st["free_slots"] == 2048 and not st["jobs"]
    finally:
        for a in ws:
            a.kill()
    next_job_is_exact(rlab, 93, "modulo")


def test_member_that_does_not_rejoin_fails_the_job(rlab):
    """Rank 2 dies while incd is down: nobody can tell the others until incd is
    back; then it waits --rejoin-grace for rank 2 and fails the job naming it."""
    ws = long_job(rlab, 94, 3, "modulo", "--fail-timeout", "30", "--timeout", "60")
    try:
        wait_running(rlab, 94, ws)
        rlab.incd.kill()
        ws[2].kill()
        rlab.incd = IncdProcess(rlab.incd.instance, lab=rlab.name, extra=["--rejoin-grace", "2"]).start()
        t0 = time.monotonic()
        took = exits_after(ws[:2], t0, timeout=60)
        assert_failed(ws[:2], took, "job 94 failed: incd restarted and rank 2 (", within=2 + 1 + 1.5)  # grace + tick
        assert "rank 2 (10.77.3.2) did not reconnect" in assert_reclaimed(rlab, 94)["end_reason"]
    finally:
        for a in ws:
            a.kill()
    next_job_is_exact(rlab, 95, "modulo")


def test_stop_after_a_crash_leaves_nothing(rlab):
    ws = long_job(rlab, 96, 2, "modulo")
    try:
        wait_running(rlab, 96, ws)
        pin = rlab.incd.status()["pin_dir"]
        rlab.incd.kill()
        assert os.path.isdir(pin)
        out = rlab.incd.stop()
        assert "unpinned" in out and "detached" in out, out
    finally:
        for a in ws:
            a.kill()
    links = rlab.run("sw", ["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "xdp" not in links and not os.path.exists(pin)
    assert not [p for p in daemon.RUN_DIR.glob(f"{rlab.incd.instance}.*")]
    rlab.incd.start()  # and the lab is usable again
