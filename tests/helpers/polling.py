"""Waiting, bounded, for something a daemon or a thread does."""
from __future__ import annotations

import time


def wait_for(pred, timeout=20.0, what="condition"):
    """pred()'s first true value, polled every 50 ms."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_active(incd, job: int, timeout: float = 30.0) -> dict:
    """The job's status record once incd reports it active."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for j in incd.status().get("jobs", []):
            if j["job"] == job and j["state"] == "active":
                return j
        time.sleep(0.05)
    raise AssertionError(f"job {job} never became active")


def wait_event(events, kind, timeout=5.0):
    """Takes the first event of `kind` out of a list the registry appends to."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in events:
            if e["event"] == kind:
                events.remove(e)
                return e
        time.sleep(0.01)
    raise AssertionError(f"no {kind} event; have {events}")


def wait_running(lab, job: int, agents, completed: int = 2000, timeout: float = 60.0) -> dict:
    """The job's status record once the switch has completed more than
    `completed` of its slots (it is mid-way); fails if an agent exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(a.proc.poll() is None for a in agents), [a.stderr()[-300:] for a in agents]
        jobs = [j for j in lab.incd.status().get("jobs", []) if j["job"] == job]
        if jobs and jobs[0]["state"] == "active" and jobs[0]["counters"]["slots_completed"] > completed:
            return jobs[0]
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not start: {[a.stderr()[-300:] for a in agents]}")


def wait_rejoined(lab, job: int, agents=(), timeout: float = 60.0) -> dict:
    """The job's status record once every member (and its PS) is back after an
    incd restart; fails if the job ended first ("raise iters")."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [j for j in lab.incd.status().get("jobs", []) if j["job"] == job]
        assert jobs, f"job {job} ended before its members were seen back; raise iters"
        if all(m["alive"] for m in jobs[0]["members"]) and (jobs[0]["ps"] is None or jobs[0]["ps"]["alive"]):
            return jobs[0]
        time.sleep(0.1)
    raise AssertionError(f"job {job} members did not rejoin: {lab.incd.status().get('jobs')} "
                         f"{[a.stderr()[-500:] for a in agents]}")
