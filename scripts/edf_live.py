#!/usr/bin/env python3
"""Live EDF vs FIFO on the switch: three jobs in one lab, one with a deadline.

Two best-effort jobs start first and want all of a small pool; a short job with a
deadline arrives while they run. For each policy (a fresh incd each time) this
records when every job asked for memory, when it got some, how much, and when
it finished, by polling `incd status` every 50 ms. Under EDF the deadline job
should get memory at once and finish first; under FIFO it waits its turn.
Every job runs with --verify. Prints a table, saves JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from incd.process import IncdProcess
from netns_lab.agents import agent_argv
from netns_lab.benchkit import log, save_json
from netns_lab.topology import Lab

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout

JOBS = [  # job, hosts, start delay s, iterations, extra args
    (1, ["h1", "h2"], 0.0, 400, []),
    (2, ["h3", "h4"], 0.3, 400, []),
    (3, ["h1", "h4"], 2.0, 60, ["--deadline", "20", "--model-bytes", "50000000", "--epochs", "5",
                                "--compute-s", "0.1"]),
]


def run_policy(lab: Lab, policy: str, pool: int, numel: int) -> dict:
    incd = IncdProcess(f"{lab.name}-{policy}", lab=lab.name, extra=["--pool-slots", str(pool), "--policy", policy])
    incd.start()
    t0 = time.time()
    seen: dict[int, dict] = {j: {"asked": None, "active": None, "slots": [], "finished": None} for j, *_ in JOBS}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            st = incd.status()
            for rec in st.get("jobs", []):
                s = seen.get(rec["job"])
                if s is None:
                    continue
                now = time.time() - t0
                s["asked"] = s["asked"] if s["asked"] is not None else now
                if rec["state"] == "active":
                    s["active"] = s["active"] if s["active"] is not None else now
                    if not s["slots"] or s["slots"][-1][1] != rec["slots"]:
                        s["slots"].append((round(now, 3), rec["slots"]))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    procs = []
    try:
        for job, hosts, delay, iters, extra in JOBS:
            while time.time() - t0 < delay:
                time.sleep(0.01)
            for r, h in enumerate(hosts):
                argv = agent_argv("allreduce", "--job", str(job), "--rank", str(r), "--world", str(len(hosts)),
                                  "--numel", str(numel), "--dtype", "int32", "--iters", str(iters),
                                  "--window", str(pool // 2), "--verify", "--json", "--quiet",
                                  "--register-timeout", "120", *extra)
                procs.append((job, lab.popen(h, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        exits = []

        def wait(job, proc):
            out, err = proc.communicate(timeout=600)
            exits.append((job, proc.returncode, out, err, time.time() - t0))

        waiters = [threading.Thread(target=wait, args=jp) for jp in procs]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
    finally:
        stop.set()
        poller.join()
        for _, proc in procs:
            proc.kill()
        incd.stop()
    rows = []
    for job, hosts, delay, iters, extra in JOBS:
        mine = [e for e in exits if e[0] == job]
        bad = [e for e in mine if e[1] != 0]
        if bad or len(mine) != len(hosts):
            raise RuntimeError(f"job {job} failed: {bad[0][3].strip()[-300:] if bad else 'no exit'}")
        rows.append({"job": job, "deadline": bool(extra), "start_s": delay, "asked_s": seen[job]["asked"],
                     "got_memory_s": seen[job]["active"],
                     "finished_s": max(e[4] for e in mine), "slots": seen[job]["slots"],
                     "verified": all(json.loads(e[2].strip().splitlines()[-1])["verified"] for e in mine)})
    return {"policy": policy, "pool_slots": pool, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-slots", type=int, default=48)
    p.add_argument("--numel", type=int, default=200000)
    p.add_argument("--policies", default="edf,fifo")
    p.add_argument("--out", default=str(ROOT / "results" / "edf_live.json"))
    a = p.parse_args()
    if os.geteuid() != 0:
        print("edf_live: must run as root", file=sys.stderr)
        return 1
    lab = Lab("incedf", workers=4)
    results = []
    try:
        lab.up()
        for pol in a.policies.split(","):
            log(f"policy {pol} ...")
            results.append(run_policy(lab, pol, a.pool_slots, a.numel))
    except RuntimeError as e:
        print(f"edf_live: {e}", file=sys.stderr)
        return 1
    finally:
        lab.down()
    save_json(a.out, results)
    for res in results:
        print(f"policy {res['policy']}:")
        print(f"  {'job':>3} {'deadline':>8} {'registered s':>12} {'memory at s':>11} {'finished s':>10}"
              "  (time, slots) while running")
        for r in res["rows"]:
            print(f"  {r['job']:>3} {'yes' if r['deadline'] else 'no':>8} {r['asked_s']:>12.2f} "
                  f"{r['got_memory_s'] if r['got_memory_s'] is not None else float('nan'):>11.2f} "
                  f"{r['finished_s']:>10.2f}  {r['slots']}  {'verified' if r['verified'] else 'WRONG'}")
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
