#!/usr/bin/env python3
"""Allreduce throughput through the XDP switch: modes x concurrent jobs x
worker counts x sizes.

Brings up its own lab and incd instance (unless --use-lab), runs every rank of
each job at once with seeded inputs and --verify, and reports per size the
median completion time (slowest rank of the slowest job), goodput (vector
bits / time), the time relative to the plain parameter server measured in the
same run (--modes ...,ps), and whether every rank's result was right. Saves
JSON. Tears everything down, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from incd.process import IncdProcess
from netns_lab.allreduce_bench import one_size
from netns_lab.benchkit import human, log, parse_size, run_and_save
from netns_lab.topology import Lab

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout


def run(args) -> dict:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.workers.split(",")]
    modes = args.modes.split(",")
    concs = [int(c) for c in args.concurrent.split(",")]
    bad = set(modes) - {"modulo", "hash", "ps"}
    if bad:
        raise RuntimeError(f"unknown modes {sorted(bad)}")
    need_ps = any(m != "modulo" for m in modes)
    rows = []
    job = 100
    lab = (Lab.load(args.use_lab) if args.use_lab
           else Lab(args.lab_name, workers=max(worlds), mtu=args.mtu, ps=need_ps))
    incd = IncdProcess(args.lab_name + "-incd", lab=args.lab_name) if not args.use_lab else None
    try:
        if not args.use_lab:
            log(f"lab: {max(worlds)} workers{' + ps' if need_ps else ''}, MTU {args.mtu}")
            lab.up()
            incd.start()
            log("incd: XDP attached to the switch ports")
        for conc in concs:
            for world in worlds:
                for size in sizes:
                    for mode in modes:
                        t0 = time.time()
                        row = one_size(lab, mode=mode, world=world, numel=max(1, size // 4),
                                       concurrent=conc, job0=job, args=args, datapath=args.datapath)
                        job += conc
                        rows.append(row)
                        log(f"  {mode:>6} x{conc} {world} workers {human(row['bytes']):>8} "
                            f"({'/'.join(row['datapaths'])}): "
                            f"{row['median_s'] * 1e3:9.3f} ms {row['goodput_gbps']:7.3f} Gbit/s  "
                            f"{'ok' if row['verified'] else 'WRONG'}  ({time.time() - t0:.1f}s)")
    finally:
        if incd:
            incd.stop()
        if not args.use_lab:
            lab.down()
    # The same run's parameter server is the peer: time relative to it.
    base = {(r["workers"], r["concurrent"], r["bytes"]): r["median_s"] for r in rows if r["mode"] == "ps"}
    for r in rows:
        b = base.get((r["workers"], r["concurrent"], r["bytes"]))
        r["time_vs_ps"] = r["median_s"] / b if b else None
    return {
        "what": "inc allreduce throughput", "dtype": args.dtype, "mtu": args.mtu,
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
    }



def table(result: dict) -> str:
    lines = [f"{'mode':>6} {'path':>6} {'jobs':>4} {'workers':>7} {'size':>9} {'median ms':>10} {'Gbit/s':>8} "
             f"{'vs ps':>6} {'retx':>6} verified"]
    for r in result["rows"]:
        vs = f"{r['time_vs_ps']:.2f}" if r["time_vs_ps"] else "-"
        lines.append(f"{r['mode']:>6} {'/'.join(r['datapaths']):>6} {r['concurrent']:>4} {r['workers']:>7} {human(r['bytes']):>9} "
                     f"{r['median_s'] * 1e3:>10.3f} {r['goodput_gbps']:>8.3f} {vs:>6} {r['retransmits']:>6} "
                     f"{'yes' if r['verified'] else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2,4", help="comma-separated worker counts (default %(default)s)")
    p.add_argument("--sizes", default="1KiB,16KiB,256KiB,1MiB,4MiB,16MiB",
                   help="comma-separated vector sizes (default %(default)s)")
    p.add_argument("--modes", default="modulo", help="comma-separated: modulo, hash, ps (the "
                   "parameter-server baseline the others are compared with); default %(default)s")
    p.add_argument("--concurrent", default="1", help="comma-separated counts of jobs run at once, "
                   "each with all workers (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "int32"], default="float32")
    p.add_argument("--datapath", choices=["socket", "xdp", "auto"], default="socket",
                   help="the agents' data path (inc-agent allreduce --datapath; default %(default)s)")
    p.add_argument("--iters", type=int, default=5, help="iterations per size (default %(default)s)")
    p.add_argument("--mtu", type=int, default=3400)
    p.add_argument("--lab-name", default="incbench", help="name of the lab this run creates")
    p.add_argument("--use-lab", metavar="NAME", help="use an existing lab with incd already running")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per size before giving up")
    p.add_argument("--out", default=str(ROOT / "results" / "throughput.json"), help="JSON output file")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = p.parse_args()
    return run_and_save("throughput", run, args, table, lambda rows: all(r["verified"] for r in rows),
                        as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
