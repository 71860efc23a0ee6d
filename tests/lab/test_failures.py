"""Failure detection and notification: a member that dies or hangs mid-job, the
PS too, incd stopping or dying. The other members fail within the fail timeout
with an error naming who, the job's switch memory is reclaimed, and the next job
runs normally. Also the watchdog's stale-slot cleanup and the control stream's
framing (an event in the same read as a reply)."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import pytest

from bpf import wire
from helpers.agents import Agent, assert_failed, assert_reclaimed, exits_after, next_job_is_exact
from helpers.polling import wait_event
from helpers.registry import PATH
from hostagent.incd_link import Control
from incd.registry import Registry
from netns_lab.harness import LabWithIncd

FAIL_TIMEOUT = 2.0   # the agents' default, passed explicitly
SLACK = 1.5          # scheduling on a shared 2-core machine, process exit
DETECTED = {}        # what the lab tests measured: kill -> each survivor's exit, seconds


@pytest.fixture(scope="module", autouse=True)
def report_detection_times():
    """Prints what the lab tests measured, once they are done (pytest -s shows it)."""
    yield
    for what, took in DETECTED.items():
        print(f"\ndetection {what}: " + ", ".join("-" if t is None else f"{t:.2f}s" for t in took))


# --- the control stream -----------------------------------------------------------

def test_event_in_the_same_read_as_the_reply_is_kept():
    a, b = socket.socketpair()
    try:
        ctl = Control(a)
        ev = {"event": "job_failed", "job": 7, "error": "rank 1 (x) left before finishing", "ranks": [1]}
        early = {"event": "remap_propose", "job": 7, "remap": 1}
        # an event before the reply, the reply, and an event, all in one write
        b.sendall(b"".join((json.dumps(o) + "\n").encode() for o in (early, {"ok": True, "job": 7}, ev)))
        assert ctl.call({"op": "register"}) == {"ok": True, "job": 7}
        got = []
        ctl.start(got.append, fail_timeout=10.0)
        deadline = time.time() + 5
        while len(got) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert got == [early, ev]
        b.settimeout(5)
        sent = b.makefile("rb")
        assert json.loads(sent.readline())["op"] == "register"
        assert json.loads(sent.readline()) == {"op": "alive", "fail_timeout": 10.0}  # at once, then every 2.5 s
        sent.close()
        b.close()  # incd gone: noticed
        deadline = time.time() + 5
        while ctl.lost_at is None and time.time() < deadline:
            time.sleep(0.01)
        assert ctl.lost_at is not None and ctl.replies.get(timeout=1) is None
    finally:
        a.close()
        b.close()


# --- the registry, with the real dataplane loaded (no traffic) ----------------------

def start_job(reg: Registry, job: int, world: int, mode: str = "modulo", ps: bool = False):
    """Registers ranks 0..world-1 (and a PS) from threads, as the control server does;
    returns the job and each member's pushed events by rank (-1: the PS)."""
    events: dict[int, list] = {}
    jobs = []

    def one(rank):
        req = {"job": job, "world": world, "port": 41000 + rank, "mode": mode}
        req.update({"role": "ps"} if rank == -1 else {"rank": rank, "window": 4})
        j, r = reg.register(req, f"10.77.{rank + 2}.2", PATH[rank + 2], timeout=10)
        events[r] = []
        (j.ps if r == -1 else j.members[r]).send = events[r].append
        jobs.append(j)

    threads = [threading.Thread(target=one, args=(r,)) for r in list(range(world)) + ([-1] if ps else [])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(jobs) == len(threads) and jobs[0].state == "active"
    return jobs[0], events


def test_member_leaving_without_done_fails_the_job(dp):
    reg = Registry(dp, 64, {})
    job, ev = start_job(reg, 5, 3)
    reg.leave(job, 0, done=True)   # finished: no failure
    assert job.state == "active"
    reg.leave(job, 1)              # its connection closed without "done": killed
    assert job.state == "ended" and "rank 1" in job.error and "before finishing" in job.error
    failed = wait_event(ev[2], "job_failed")
    assert failed["ranks"] == [1] and failed["job"] == 5 and "rank 1" in failed["error"]
    assert not ev[0]               # it had left already
    snap = reg.snapshot()
    assert not snap["jobs"] and snap["free_slots"] == 64
    assert snap["finished"][-1]["end_reason"] == job.error
    # a normal end: the PS is told the job ended; nobody is told it failed
    job, ev = start_job(reg, 6, 2, mode="hash", ps=True)
    reg.leave(job, 0, done=True)
    reg.leave(job, 1, done=True)
    assert job.state == "ended" and job.error is None
    assert wait_event(ev[-1], "job_ended")["job"] == 6
    # the PS dying fails the job, naming it; incd stopping fails what runs
    job, ev = start_job(reg, 7, 2, mode="hash", ps=True)
    reg.leave(job, -1)
    assert "parameter server" in wait_event(ev[0], "job_failed")["error"]
    job, ev = start_job(reg, 8, 1)
    reg.shutdown()
    assert wait_event(ev[0], "job_failed")["error"] == "incd stopped"
    assert reg.snapshot()["free_slots"] == 64


def test_hung_member_is_found_by_its_heartbeats(dp):
    reg = Registry(dp, 64, {})
    job, ev = start_job(reg, 9, 2)
    ft = 0.3
    for bad in (None, "2", True, 0.0, float("nan"), 1e9):  # nonsense is ignored, not trusted
        reg.heartbeat(job, 1, bad)
    assert job.members[1].last_seen is None
    for r in (0, 1):
        reg.heartbeat(job, r, ft)
    time.sleep(2 * ft)           # nobody's heartbeat came: incd was stalled, nobody is blamed
    reg.heartbeat(job, 0, ft)
    reg.watchdog()
    assert job.state == "active"
    deadline = time.time() + 5   # rank 0 keeps beating, rank 1 is silent
    while job.state == "active" and time.time() < deadline:
        reg.heartbeat(job, 0, ft)
        time.sleep(ft / 4)
    failed = wait_event(ev[0], "job_failed")
    assert failed["ranks"] == [1] and "rank 1" in failed["error"] and "no heartbeat" in failed["error"]
    assert reg.snapshot()["free_slots"] == 64


def test_rejoin_after_restart_needs_the_members_own_token(dp, tmp_path):
    """Every member gets its own token in its join reply (never in status); a
    restarted incd takes a rejoin only with it, also from the member's address."""
    from incd import jobstate
    from incd.requests import RegistrationError
    from incd.server import joined_reply

    reg = Registry(dp, 64, {})
    job, _ = start_job(reg, 14, 2, mode="hash", ps=True)
    toks = {r: joined_reply(job, r)["token"] for r in (0, 1, -1)}
    assert len(set(toks.values())) == 3 and all(len(t) == 32 for t in toks.values())
    assert all(t not in json.dumps(reg.snapshot()) for t in toks.values())
    f = tmp_path / "jobs.json"
    with reg.cond:
        jobstate.save(f, jobstate.dump(reg, "fp"))
    assert os.stat(f).st_mode & 0o777 == 0o600
    data = json.loads(f.read_text())
    reg.shutdown()
    reg2 = Registry(dp, 64, {})
    assert jobstate.restore(reg2, data, 5.0) == [14]
    addr = {0: "10.77.2.2", 1: "10.77.3.2", -1: "10.77.1.2"}
    for bad in (None, "", toks[1], toks[0].upper(), 5):
        req = {"job": 14, "rank": 0, "gen": job.gen}
        if bad is not None:
            req["token"] = bad
        with pytest.raises(RegistrationError, match=r"^job 14 rank 0: wrong or missing token"):
            reg2.rejoin(req, addr[0])
    for r in (0, 1, -1):
        assert reg2.rejoin({"job": 14, "rank": r, "gen": job.gen, "token": toks[r]}, addr[r])[1] == r
    assert not reg2.jobs[14].rejoin_wait
    reg2.shutdown()


def test_watchdog_clears_stale_hash_slots(dp):
    reg = Registry(dp, 64, {}, hash_slots=16)
    job, _ = start_job(reg, 12, 1, mode="hash", ps=True)
    off, size = reg.hash_region
    pool = dp.bpf[b"pool"]

    def put(i, owner, gen):
        v = pool.Leaf()
        v.job, v.gen, v.state, v.count, v.psn = owner, gen, wire.SLOT_PARTIAL, 1, 3
        pool[ctypes.c_int(i)] = v

    put(off, job.id, job.gen)             # the running job's: kept
    put(off + 1, 99, 4)                   # a job that is not running
    put(off + 2, job.id, job.gen ^ 0x55)  # an older run of the same job id
    reg.watchdog()                        # the first call scans at once
    states = [dp.read_slot(off + i).state for i in range(3)]
    assert states == [wire.SLOT_PARTIAL, wire.SLOT_EMPTY, wire.SLOT_EMPTY]
    assert reg.snapshot()["stale_slots_cleared"] == 2
    assert reg.clear_stale_slots() == 0
    reg.leave(job, 0, done=True)          # the job's own slots go at its end
    assert reg.snapshot()["hash_region"] is None and dp.read_slot(off).state == wire.SLOT_EMPTY
    assert reg.alloc.free_slots() == 64 and size == 16


# --- the lab: real daemon, real agents ------------------------------------------------

def workers(lab, job: int, world: int, mode: str, *extra: str) -> list[Agent]:
    return [Agent(lab, f"h{r + 1}", "allreduce", "--job", str(job), "--rank", str(r), "--world", str(world),
                  "--mode", mode, "--numel", "400000", "--dtype", "int32", "--iters", "100000",
                  "--timeout", "60", "--fail-timeout", str(FAIL_TIMEOUT), *extra) for r in range(world)]


def wait_running(agents: list[Agent], timeout: float = 60.0) -> None:
    """Until every worker has finished an iteration: the job is mid-way."""
    deadline = time.time() + timeout
    while not all("iter 1/" in a.stderr() for a in agents):
        assert time.time() < deadline, [a.stderr()[-300:] for a in agents]
        assert all(a.proc.poll() is None for a in agents), [a.stderr()[-300:] for a in agents]
        time.sleep(0.05)
    time.sleep(0.3)


@pytest.fixture(scope="module")
def flab(root):
    with LabWithIncd("f", workers=3, ps=True) as lab:
        yield lab


@pytest.mark.parametrize("mode,victim", [("modulo", 1), ("hash", 1), ("hash", "ps")],
                         ids=["modulo-rank1", "hash-rank1", "hash-ps"])
def test_killed_member_fails_the_job(flab, mode, victim):
    job = {"modulo": 80, "hash": 81}[mode] + (2 if victim == "ps" else 0)
    ps = Agent(flab, "ps", "ps", "--job", str(job), "--world", "3", "--fail-timeout", str(FAIL_TIMEOUT)) \
        if mode == "hash" else None
    ws = workers(flab, job, 3, mode)
    everyone = ws + ([ps] if ps else [])
    try:
        wait_running(ws)
        dead = ps if victim == "ps" else ws[victim]
        dead.proc.kill()
        t0 = time.monotonic()
        rest = [a for a in everyone if a is not dead]
        took = exits_after(rest, t0)
        DETECTED[f"{mode} kill {victim}"] = took
        name = "the parameter server" if victim == "ps" else f"rank {victim}"
        assert_failed(rest, took, f"job {job} failed: {name}", within=FAIL_TIMEOUT + SLACK)
        rec = assert_reclaimed(flab, job)
        assert name in rec["end_reason"]
    finally:
        for a in everyone:
            a.kill()
    next_job_is_exact(flab, job, mode)


def test_stopped_member_is_taken_for_hung(flab):
    """SIGSTOP: still connected, but silent. The others fail after --fail-timeout,
    not after --timeout (60 s here)."""
    ws = workers(flab, 84, 3, "modulo")
    try:
        wait_running(ws)
        os.kill(ws[2].proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        took = exits_after(ws[:2], t0)
        DETECTED["modulo SIGSTOP 2"] = took
        # its last heartbeat came up to a quarter of the timeout before it stopped
        assert_failed(ws[:2], took, "rank 2 (", within=FAIL_TIMEOUT + SLACK + 1.0, after=FAIL_TIMEOUT * 0.7)
        assert all("no heartbeat" in a.stderr() for a in ws[:2])
        assert "rank 2" in assert_reclaimed(flab, 84)["end_reason"]
    finally:
        for a in ws:
            a.kill()
    next_job_is_exact(flab, 84, "modulo")


def test_incd_stop_fails_running_jobs(root):
    with LabWithIncd("g", workers=2, ps=True) as lab:
        ps = Agent(lab, "ps", "ps", "--job", "85", "--world", "2")
        ws = workers(lab, 86, 2, "modulo") + workers(lab, 85, 2, "hash")
        try:
            wait_running(ws)
            t0 = time.monotonic()  # from running `incd stop` (a CLI process) on
            stopper = threading.Thread(target=lab.incd.stop)
            stopper.start()
            took = exits_after(ws + [ps], t0)
            stopper.join(60)
            DETECTED["incd stop"] = took
            assert_failed(ws + [ps], took, "failed: incd stopped")
        finally:
            for a in ws + [ps]:
                a.kill()


def test_incd_killed(root):
    """incd dies (SIGKILL): the agents notice their control connection is gone.
    The switch keeps aggregating (its maps and programs stay), so a job whose
    ranks are all alive finishes; once a rank also dies, nobody can tell the
    others, and they fail after --fail-timeout without a result."""
    with LabWithIncd("k", workers=3) as lab:
        ws = workers(lab, 87, 2, "modulo")
        short = [Agent(lab, "h3", "allreduce", "--job", "88", "--rank", "0", "--world", "1", "--numel", "400000",
                       "--dtype", "int32", "--iters", "400", "--verify", "--json")]
        try:
            wait_running(ws)
            assert short[0].proc.poll() is None, short[0].stderr()
            os.kill(lab.incd.status()["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            time.sleep(0.5)
            ws[1].proc.kill()
            took = exits_after(ws[:1] + short, t0, timeout=120)
            DETECTED["incd SIGKILL + rank 1"] = took[:1]
            err = ws[0].stderr()
            assert ws[0].proc.returncode == 1 and "lost the control connection to incd" in err, err[-500:]
            assert took[0] < 0.5 + FAIL_TIMEOUT + SLACK, took
            out = short[0].proc.stdout.read()
            assert short[0].proc.returncode == 0, short[0].stderr()[-500:]
            res = json.loads(out.strip().splitlines()[-1])
            assert res["verified"] and res["ctrl_lost"]
            assert "lost the control connection" in short[0].stderr()
        finally:
            for a in ws + short:
                a.kill()


SLOW_HASH_RANK = r'''
import sys, time
import numpy as np
from hostagent import Communicator
with Communicator(int(sys.argv[1]), 0, 1, mode="hash", timeout=20) as c:
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        assert c.allreduce(np.arange(10, dtype=np.int32))[9] == 9
        time.sleep(0.2)
print("done", flush=True)
'''


def test_the_daemons_periodic_sweep_empties_stale_hash_slots(root):
    """Not the watchdog called by hand: the running daemon's own periodic call.
    Slots of the hash region tagged with a job that does not exist (written into
    the daemon's pinned pool from outside) are emptied within STALE_SCAN_S, while
    a live hash job keeps its slots and stays exact."""
    import subprocess

    from helpers.polling import wait_for
    from incd import daemon
    from incd.dataplane import Dataplane
    from incd.watchdog import STALE_SCAN_S
    from netns_lab.agents import PSProcess

    job = 61
    with LabWithIncd("sw", workers=1, ps=True) as lab:
        ps = PSProcess(lab, job, 1, mode="hash")
        rank = lab.popen("h1", [sys.executable, "-c", SLOW_HASH_RANK, str(job), str(3 * STALE_SCAN_S)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        side = None
        try:
            st = wait_for(lambda: (s := lab.incd.status())["hash_region"] and s, timeout=30,
                          what="the hash job running")
            off, size = st["hash_region"]["offset"], st["hash_region"]["slots"]
            before = st["stale_slots_cleared"]
            used = set(wire.hash_slots(job, np.arange(4096), off, size).tolist())  # ~20 psns/s: far fewer
            free = [i for i in range(off, off + size) if i not in used][:8]
            assert len(free) == 8
            side = Dataplane(st["pool_slots"], pin_dir=daemon.pin_dir(lab.incd.instance))  # the daemon's maps
            assert side.adopted
            for i in free:
                v = side.pool.Leaf()
                v.job, v.gen, v.state, v.count, v.psn = 99, 7, wire.SLOT_PARTIAL, 1, 3
                side.pool[ctypes.c_int(i)] = v
            t0 = time.monotonic()
            wait_for(lambda: lab.incd.status()["stale_slots_cleared"] >= before + 8,
                     timeout=STALE_SCAN_S + 5, what="the periodic sweep")
            assert time.monotonic() - t0 <= STALE_SCAN_S + 5
            assert all(side.read_slot(i).state == wire.SLOT_EMPTY for i in free)
            out, err = rank.communicate(timeout=60)
            assert rank.returncode == 0 and out.strip() == "done", err[-500:]
            assert ps.result()["results"] > 0
        finally:
            if side is not None:
                side.pin_dir = None  # the daemon's pins stay
                side.bpf.cleanup()
            if rank.poll() is None:
                rank.kill()
                rank.wait()
            ps.kill()
