"""Live memory management in the lab: a deadline job arrives while a
best-effort job holds all the memory; EDF shrinks the running job without
stopping it, and every iteration of both stays exact."""
from __future__ import annotations

import json
import subprocess

from helpers.polling import wait_for
from netns_lab.harness import LabWithIncd
from netns_lab.agents import agent_argv, run_allreduce

DEADLINE_ARGS = ["--deadline", "30", "--model-bytes", "50000000", "--epochs", "5", "--compute-s", "0.1"]


def job_rec(st, job):
    return next((j for j in st["jobs"] if j["job"] == job), None)


def test_resize_during_allreduce_is_exact(root):
    with LabWithIncd("m", incd_args=["--pool-slots", "64", "--policy", "edf"]) as lab:
        big = [lab.popen(f"h{r + 1}", agent_argv(
            "allreduce", "--job", "3", "--rank", str(r), "--world", "2", "--numel", "200000", "--dtype",
            "int32", "--iters", "600", "--window", "32", "--verify", "--json", "--quiet"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        try:
            wait_for(lambda: (job_rec(lab.incd.status(), 3) or {}).get("slots") == 64, what="job 3 on 64 slots")
            shrunk = []
            res = run_allreduce(lab, job=4, world=2, numel=200000, dtype="int32", iters=30,
                                extra=["--verify", "--window", "32", *DEADLINE_ARGS], hosts=["h3", "h4"])
            st = lab.incd.status()
            rec3 = job_rec(st, 3)
            assert rec3 is not None, "the best-effort job should still be running"
            shrunk.append(rec3["resizes"])
            assert all(r["verified"] for r in res)
            outs = []
            for p in big:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
                outs.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for p in big:
                p.kill()
        # every one of the 600 iterations of the resized job was exact
        assert all(o["verified"] for o in outs)
        assert all(o["resizes"] >= 1 for o in outs)
        assert shrunk[0] >= 1
        fin = {j["job"]: j for j in lab.incd.status()["finished"]}
        assert fin[3]["resizes"] >= 2  # shrunk for job 4, grown back when it left
        mem = lab.incd.status()["memory"]
        assert mem == [{"offset": 0, "slots": 64, "owner": None}]


def test_fifo_queues_instead(root):
    with LabWithIncd("q", incd_args=["--pool-slots", "64", "--policy", "fifo"]) as lab:
        big = [lab.popen(f"h{r + 1}", agent_argv(
            "allreduce", "--job", "3", "--rank", str(r), "--world", "2", "--numel", "200000", "--dtype",
            "int32", "--iters", "400", "--window", "32", "--json", "--quiet"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        try:
            wait_for(lambda: (job_rec(lab.incd.status(), 3) or {}).get("slots") == 64, what="job 3 on 64 slots")
            small = [lab.popen(f"h{r + 3}", agent_argv(
                "allreduce", "--job", "4", "--rank", str(r), "--world", "2", "--numel", "1000", "--dtype",
                "int32", "--window", "32", "--verify", "--json", "--quiet", *DEADLINE_ARGS),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
            rec = wait_for(lambda: (job_rec(lab.incd.status(), 4) or {}).get("state") == "queued"
                           and job_rec(lab.incd.status(), 4), what="job 4 queued")
            st = lab.incd.status()
            # job 3 (400 iterations) still runs: job 4 waits, and job 3 is not shrunk for it
            assert job_rec(st, 4)["state"] == "queued"
            assert job_rec(st, 3)["state"] == "active" and job_rec(st, 3)["slots"] == 64
            for p in small + big:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
            assert rec["job"] == 4
            fin = {j["job"]: j for j in lab.incd.status()["finished"]}
            assert fin[3]["resizes"] == 0
        finally:
            for p in big:
                p.kill()
