"""Agent processes a failure test starts, kills and reads: when each exited,
with what message, and that the job's memory came back."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from netns_lab.agents import PSProcess, agent_argv, run_allreduce


class Agent:
    """One inc-agent process; its stderr is collected as it comes."""

    def __init__(self, lab, host: str, *args: str):
        self.proc = lab.popen(host, agent_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def stderr(self) -> str:
        return "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


def exits_after(agents: list[Agent], t0: float, timeout: float = 30.0) -> list[float]:
    """Seconds from t0 until each agent exited (polled every 10 ms)."""
    out = [None] * len(agents)
    deadline = t0 + timeout
    while None in out and time.monotonic() < deadline:
        for i, a in enumerate(agents):
            if out[i] is None and a.proc.poll() is not None:
                out[i] = time.monotonic() - t0
        time.sleep(0.01)
    for a in agents:
        a.kill()
    return out


def assert_failed(agents: list[Agent], took: list, message: str, within: float = 60.0, after: float = 0.0) -> None:
    """Each agent exited with status 1 between after and within seconds, saying message, no traceback."""
    for a, t in zip(agents, took):
        err = a.stderr()
        assert t is not None and after < t < within, (took, err[-500:])
        assert a.proc.returncode == 1 and message in err and "Traceback" not in err, err[-500:]


def assert_reclaimed(lab, job: int) -> dict:
    st = lab.incd.status()
    assert not [j for j in st["jobs"] if j["job"] == job], st["jobs"]
    assert st["free_slots"] == st["pool_slots"] and st["held_slots"] == 0 and st["hash_region"] is None
    return [j for j in st["finished"] if j["job"] == job][-1]


def next_job_is_exact(lab, job: int, mode: str, world: int = 3) -> None:
    ps = PSProcess(lab, job, world) if mode == "hash" else None
    try:
        res = run_allreduce(lab, job=job, world=world, numel=30001, dtype="int32", iters=2,
                            extra=["--mode", mode, "--verify"], timeout=120)
        assert all(r["verified"] for r in res)
        if ps:
            ps.result()
    finally:
        if ps:
            ps.kill()
