"""Run one inc-agent per lab host at once and collect their JSON results."""
from __future__ import annotations

import json
import subprocess
import sys
import time


class AgentRunError(RuntimeError):
    pass


def agent_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hostagent.cli", *args]


class PSProcess:
    """`inc-agent ps` for one job on a lab host; it exits once the job's workers leave."""

    def __init__(self, lab, job: int, world: int, mode: str = "hash", host: str = "ps",
                 datapath: str = "socket"):
        self.proc = lab.popen(host, agent_argv("ps", "--job", str(job), "--world", str(world),
                                               "--mode", mode, "--datapath", datapath, "--json"),
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
    return collect([(f"rank {r}", p) for r, p in enumerate(procs)], job=job, timeout=timeout)


def collect(procs: list[tuple[str, subprocess.Popen]], *, job: int, timeout: float) -> list[dict]:
    """Waits for each (name, process) in turn, one deadline for all, and returns
    each one's last line of output as JSON. A process still running at the
    deadline: all are killed. Any that failed: AgentRunError naming each."""
    deadline = time.monotonic() + timeout
    results, errors = [], []
    for name, p in procs:
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
                q.wait()
            raise AgentRunError(f"job {job}: {name} did not finish within {timeout:.0f}s") from None
        if p.returncode != 0:
            errors.append(f"{name} exit {p.returncode}: {err.strip()[-500:]}")
            continue
        try:
            results.append(json.loads(out.strip().splitlines()[-1]))
        except (json.JSONDecodeError, IndexError):
            errors.append(f"{name}: no JSON result: {out[-300:]!r} {err[-300:]!r}")
    if errors:
        raise AgentRunError(f"job {job}: " + "; ".join(errors))
    return results


def run_wordcount(lab, *, job: int, files: list[str], out: str, map_args: list[str] | tuple = (),
                  reducer_cmd: list[str] | None = None, timeout: float = 300.0) -> tuple[list[dict], dict]:
    """One word count: `kv-reduce` on the ps host writing out, `kv-map` rank r on
    h(r+1) reading files[r]. reducer_cmd: what runs inc-agent's command line for
    the reducer (default agent_argv()). Returns (the mappers' JSON results, the
    reducer's)."""
    n = str(len(files))
    red = lab.popen("ps", [*(reducer_cmd or agent_argv()), "kv-reduce", "--job", str(job), "--mappers", n,
                           "--out", str(out), "--json"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = [lab.popen(f"h{r + 1}", agent_argv("kv-map", "--job", str(job), "--rank", str(r), "--mappers", n,
                                              "--input", str(f), "--json", *map_args),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r, f in enumerate(files)]
    res = collect([*((f"mapper {r}", p) for r, p in enumerate(maps)), ("reducer", red)], job=job, timeout=timeout)
    return res[:-1], res[-1]
