"""Bad packets against a running job: >= 10k random and mutated packets from a
stranger's host and from a second process on a member's host, mixed into
running int32 jobs. Every iteration of every job must stay exact, incd must
keep serving, and the switch must have dropped the packets by reason."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers.polling import wait_active
from netns_lab.agents import run_allreduce
from netns_lab.harness import LabWithIncd

FUZZER = Path(__file__).resolve().parent / "inc_fuzzer.py"
JOB = 61


def test_fuzzed_packets_never_reach_a_running_job(root, tmp_path):
    with LabWithIncd("fz", workers=3) as lab:
        runs: list = []
        fuzzing = threading.Event()
        fuzzing.set()

        def jobs():
            # one run of the job after another for as long as the fuzzers send
            # (ranks must agree on the iteration count, so a run cannot be open-ended)
            while fuzzing.is_set():
                try:
                    runs.append(run_allreduce(lab, job=JOB, world=2, numel=30000, dtype="int32", iters=200,
                                              extra=["--verify"], timeout=120))
                except Exception as e:
                    runs.append(e)
                    return

        gen_file = tmp_path / "gen"

        def watch_gen():  # so the fuzzers' packets carry the running job's generation
            while fuzzing.is_set():
                for j in lab.incd.status().get("jobs", []):
                    if j["job"] == JOB and j["state"] == "active":
                        gen_file.write_text(str(j["gen"]))
                time.sleep(0.1)

        t = threading.Thread(target=jobs)
        t.start()
        w = threading.Thread(target=watch_gen)
        try:
            gen_file.write_text(str(wait_active(lab.incd, JOB)["gen"]))
            w.start()
            fuzzers = [lab.popen(host, [sys.executable, str(FUZZER), "--switch", lab.host(host)["gateway"],
                                        "--job", str(JOB), "--gen-file", str(gen_file), "--world", "2",
                                        "--count", "6000", "--seed", str(seed)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                       # a stranger, and a second process on rank 0's host
                       for host, seed in (("h3", 1), ("h1", 2))]
            sent = []
            for f in fuzzers:
                out, err = f.communicate(timeout=240)
                assert f.returncode == 0, err[-800:]
                sent.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            fuzzing.clear()
            t.join(300)
            if w.is_alive():
                w.join(10)
        errors = [r for r in runs if isinstance(r, Exception)]
        assert not errors, errors
        assert runs and all(rank["verified"] for run in runs for rank in run), runs
        assert sum(s["udp"] + s["raw"] for s in sent) >= 10000, sent
        st = lab.incd.status()  # incd still answers, and nothing of the jobs is left behind
        assert st["free_slots"] == st["pool_slots"], st["memory"]
        drops: dict = {}
        for rec in st["finished"]:
            if rec["job"] == JOB and rec.get("counters"):
                for k, v in rec["counters"]["drops"].items():
                    drops[k] = drops.get(k, 0) + v
        assert drops.get("bad_source", 0) > 0, drops
        assert drops.get("bad_csum", 0) + drops.get("bad_len", 0) + drops.get("bad_hdr", 0) > 0, drops
