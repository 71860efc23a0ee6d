#!/usr/bin/env python3
"""Allreduce under network faults: slowdown against the clean run.

For each fault (loss, reordering, duplication, corruption, delay jitter, as
`inc-lab up` makes them) a lab of 4 workers + PS is built with that fault on
every link, incd is started on it, and for each size and mode (modulo, hash)
all ranks run int32 with --verify (netns_lab.allreduce_bench.one_size(), as
scripts/throughput.py does). The clean lab is measured the same way, first
and last; the table shows each median time against the better clean one of
the same mode and size. A run that does not finish within --timeout is recorded as such (its agents are killed) and the next one
starts. JSON goes to results/faults.json. Everything is torn down, also on
failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from incd.process import IncdProcess
from netns_lab.agents import AgentRunError
from netns_lab.allreduce_bench import one_size
from netns_lab.benchkit import human, log, parse_size, run_and_save
from netns_lab.impair import read_counters
from netns_lab.topology import Lab

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout

# name -> Lab impairment keywords (the same as the inc-lab up flags)
FAULTS = {
    "clean": {},
    "loss1": {"loss_pct": 1.0},
    "loss5": {"loss_pct": 5.0},
    "reorder20": {"reorder_pct": 20.0},
    "dup5": {"dup_pct": 5.0},
    "corrupt1": {"corrupt_pct": 1.0},
    "corrupt5": {"corrupt_pct": 5.0},
    "jitter1": {"delay_ms": 1.0, "jitter_ms": 1.0},
    "delay5": {"delay_ms": 5.0},
}
DEFAULT_FAULTS = "loss1,loss5,reorder20,dup5,corrupt1,jitter1"
FLAGS = {"loss_pct": "--loss", "reorder_pct": "--reorder", "dup_pct": "--dup",
         "corrupt_pct": "--corrupt", "delay_ms": "--delay", "jitter_ms": "--jitter"}
WORKERS = 4


def flags(fault: str) -> str:
    return " ".join(f"{FLAGS[k]} {v:g}" for k, v in FAULTS[fault].items()) or "-"


def run_fault(fault: str, sizes: list[int], modes: list[str], args, job: int) -> tuple[list[dict], dict, int]:
    lab = Lab(f"{args.lab_name}{list(FAULTS).index(fault)}", workers=WORKERS, ps=True, **FAULTS[fault])
    incd = IncdProcess(lab.name + "-incd", lab=lab.name)
    rows = []
    try:
        lab.up()
        incd.start()
        log(f"{fault} ({flags(fault)}): lab {lab.name} with {WORKERS} workers + ps, incd up")
        for size in sizes:
            for mode in modes:
                t0 = time.time()
                row = {"fault": fault, "impair": FAULTS[fault], "mode": mode, "workers": WORKERS,
                       "bytes": max(1, size // 4) * 4, "dtype": "int32", "iters": args.iters}
                try:
                    row.update(one_size(lab, mode=mode, world=WORKERS, numel=max(1, size // 4),
                                        concurrent=1, job0=job, args=args))
                    row["status"] = "ok" if row["verified"] else "WRONG"
                except AgentRunError as e:
                    # A run killed at the timeout also makes its PS fail, and
                    # that error may be the one reported.
                    late = "did not finish" in str(e) or time.time() - t0 >= args.timeout
                    row.update(median_s=None, verified=False, error=str(e)[-400:],
                               status="timeout" if late else "failed")
                fin = [j for j in incd.status().get("finished", []) if j["job"] == job]
                if fin and fin[-1].get("counters"):
                    c = fin[-1]["counters"]
                    row["switch"] = {k: v for k, v in c.items() if k != "drops" and v}
                    row["switch_drops"] = {k: v for k, v in c["drops"].items() if v}
                job += 1
                rows.append(row)
                ms = f"{row['median_s'] * 1e3:9.2f} ms" if row["median_s"] else f"{'-':>12}"
                log(f"  {mode:>6} {human(row['bytes']):>8}: {ms} {row['status']} ({time.time() - t0:.1f}s)")
        counters = read_counters(lab.state) if FAULTS[fault] else {}
    finally:
        incd.stop()
        lab.down()
    return rows, counters, job


def run(args) -> dict:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    # clean first and last: the baseline is the better of the two, so a busy
    # moment of the machine during one of them does not flatter the faults
    faults = ["clean"] + [f for f in args.faults.split(",") if f != "clean"] + ["clean"]
    bad = (set(faults) - set(FAULTS)) | (set(modes) - {"modulo", "hash"})
    if bad:
        raise RuntimeError(f"unknown faults or modes: {sorted(bad)} (faults: {', '.join(FAULTS)})")
    rows, counters, job = [], {}, 100
    opts = SimpleNamespace(dtype="int32", iters=args.iters, timeout=args.timeout, lab_name=args.lab_name)
    for fault in faults:
        got, c, job = run_fault(fault, sizes, modes, opts, job)
        counters.setdefault(fault, c)
        rows += got
    clean = {}
    for r in rows:
        if r["fault"] == "clean" and r["median_s"]:
            key = (r["mode"], r["bytes"])
            clean[key] = min(clean.get(key, r["median_s"]), r["median_s"])
    for r in rows:
        c = clean.get((r["mode"], r["bytes"]))
        r["clean_median_s"] = c
        r["slowdown"] = r["median_s"] / c if r["median_s"] and c else None
    return {"what": "allreduce under network faults: slowdown against the clean lab",
            "workers": WORKERS, "dtype": "int32", "iters": args.iters, "timeout_s": args.timeout,
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
            "impair_counters": counters}  # per fault: the impair programs' counts, per host end


def table(res: dict) -> str:
    lines = [f"{'fault':>9} {'inc-lab up flags':<20} {'mode':>6} {'size':>8} {'median ms':>10} "
             f"{'clean ms':>9} {'slowdown':>8} {'retx':>6} verified"]
    for r in res["rows"]:
        med = f"{r['median_s'] * 1e3:10.2f}" if r["median_s"] else f"{r['status']:>10}"
        cl = f"{r['clean_median_s'] * 1e3:9.2f}" if r["clean_median_s"] else f"{'-':>9}"
        sd = f"{r['slowdown']:7.1f}x" if r["slowdown"] else f"{'-':>8}"
        retx = r.get("retransmits", "-")
        lines.append(f"{r['fault']:>9} {flags(r['fault']):<20} {r['mode']:>6} {human(r['bytes']):>8} {med} {cl} "
                     f"{sd} {retx:>6} {'yes' if r['verified'] else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default=DEFAULT_FAULTS,
                   help=f"comma-separated, from: {', '.join(f for f in FAULTS if f != 'clean')} "
                        "(the clean run is always first); default %(default)s")
    p.add_argument("--sizes", default="1MiB,16MiB", help="comma-separated vector sizes (default %(default)s)")
    p.add_argument("--modes", default="modulo,hash", help="comma-separated (default %(default)s)")
    p.add_argument("--iters", type=int, default=3, help="iterations per run (default %(default)s)")
    p.add_argument("--timeout", type=float, default=150.0,
                   help="seconds a run (all iterations) may take before it counts as hung (default %(default)s)")
    p.add_argument("--lab-name", default="incflt", help="prefix of the labs this run creates")
    p.add_argument("--out", default=str(ROOT / "results" / "faults.json"), help="JSON output file")
    args = p.parse_args()
    return run_and_save("faults", run, args, table,
                        lambda rows: all(r["verified"] for r in rows if r["status"] != "timeout"))

if __name__ == "__main__":
    sys.exit(main())
