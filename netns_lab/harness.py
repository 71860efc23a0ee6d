"""Shared pieces of the lab tests: unique names, a lab with its own incd, and
running several jobs at once."""
from __future__ import annotations

import os
import threading

from incd.process import IncdProcess
from netns_lab.topology import Lab

_seq = iter(range(1, 10_000))


def uniq(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 10000}{next(_seq)}"


class LabWithIncd:
    """A lab plus an incd instance on its switch; both removed on exit, also on failure."""

    def __init__(self, prefix: str = "l", workers: int = 4, ps: bool = False, incd_args=(),
                 racks: int = 1, **impair):
        """`impair`: Lab's fault keywords, the spine's (spine_rate, spine_loss_pct) included."""
        self.lab = Lab(uniq(prefix), workers=workers, ps=ps, racks=racks, **impair)
        self.incd_args = list(incd_args)

    def __enter__(self) -> Lab:
        self.lab.up()
        try:
            self.lab.incd = IncdProcess(self.lab.name + "d", lab=self.lab.name, extra=self.incd_args).start()
        except BaseException:
            self.lab.down()
            raise
        return self.lab

    def __exit__(self, *exc) -> bool:
        try:
            self.lab.incd.stop()
        finally:
            self.lab.down()
        return False


def run_concurrently(calls: dict, timeout: float = 300.0) -> dict:
    """Runs {name: zero-argument callable} at once; returns {name: result}. Any
    failure is raised afterwards, naming the call."""
    results, errors = {}, []

    def one(name, fn):
        try:
            results[name] = fn()
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors or len(results) != len(calls):
        raise AssertionError(f"concurrent runs failed: {errors or 'timed out'}")
    return results
