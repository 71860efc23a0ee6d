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
