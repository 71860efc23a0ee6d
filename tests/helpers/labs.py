"""Labs without incd for the lab tests: named t{pid}{tag} so parallel runs and
a user's lab never collide, always removed; the inc-lab CLI as a user runs it;
a sender/receiver pair of tiny programs inside the hosts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from netns_lab.topology import Lab, teardown

PID = os.getpid()
PREFIX = f"t{PID}"


def lab_name(tag: str) -> str:
    return f"{PREFIX}{tag}"


def make_lab(tag: str, **kw):
    """Context manager for a lab that is always removed, however the test ends."""
    name = lab_name(tag)

    class _Guard:
        def __enter__(self):
            self.lab = Lab(name, **kw)
            try:
                return self.lab.up()
            except BaseException:
                teardown(name)
                raise

        def __exit__(self, *exc):
            try:
                self.lab.down()
            finally:
                teardown(name)

    return _Guard()


def cli(*args, name=None):
    argv = [sys.executable, "-m", "netns_lab.cli"]
    if name:
        argv += ["--name", name]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60)


def send_and_receive(lab, src, dst, to, send_code, recv_code, port, idle, n, size, burst, gap,
                     timeout=120):
    """Runs recv_code on dst (it prints "ready", then its JSON report) and
    send_code on src towards to:port; returns the report."""
    rx = lab.popen(dst, [sys.executable, "-c", recv_code, str(port), str(idle)],
                   stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        lab.run(src, [sys.executable, "-c", send_code, to, str(port), str(n), str(size),
                      str(burst), str(gap)], check=True, timeout=timeout)
        out, _ = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return json.loads(out)
