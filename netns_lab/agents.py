"""Run one inc-agent per lab host at once and collect their JSON results."""
from __future__ import annotations

import json
import subprocess
import sys


class AgentRunError(RuntimeError):
    pass


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hostagent.cli", *args]


class PSProcess:
    """`inc-agent ps` for one job on a lab host; it exits once the job's workers leave."""

    def __init__(self, lab, job: int, world: int, mode: str = "hash", host: str = "ps"):
        self.proc = lab.popen(host, agent_argv("ps", "--job", str(job), "--world", str(world),
                                               "--mode", mode, "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 30.0) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AgentRunError(f"PS did not exit within {timeout}s after its workers left")
        if self.proc.returncode != 0:
            raise AgentRunError(f"PS exit {self.proc.returncode}: {err.strip()[-500:]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_allreduce(lab, *, job: int, world: int, numel: int | None = None, dtype: str = "float32",
                  iters: int = 1, extra: list[str] | None = None, per_rank: dict | None = None,
                  hosts: list[str] | None = None, timeout: float = 300.0) -> list[dict]:
    """All ranks of one job, rank r on hosts[r] (default h1..hN). per_rank maps a
    rank to more arguments (e.g. --in/--out). Returns each rank's JSON result."""
    hosts = hosts or [f"h{r + 1}" for r in range(world)]
    procs = []
    for r in range(world):
        argv = agent_argv("allreduce", "--job", str(job), "--rank", str(r), "--world", str(world),
                          "--iters", str(iters), "--json", *(extra or []), *(per_rank or {}).get(r, []))
        if numel is not None:
            argv += ["--numel", str(numel), "--dtype", dtype]
        procs.append(lab.popen(hosts[r], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, errors = [], []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AgentRunError(f"job {job}: rank {r} did not finish within {timeout}s")
        if p.returncode != 0:
            errors.append(f"rank {r} exit {p.returncode}: {err.strip()[-500:]}")
            continue
        try:
            results.append(json.loads(out.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            errors.append(f"rank {r}: no JSON result: {out[-300:]!r} {err[-300:]!r}")
    if errors:
        raise AgentRunError(f"job {job}: " + "; ".join(errors))
    return results
