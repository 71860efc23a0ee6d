#!/usr/bin/env python3
"""Allreduce throughput through the XDP switch: sizes x worker counts.

Brings up its own lab and incd instance (unless --use-lab), runs every rank of
each job at once with seeded inputs and --verify, and reports per size the
median completion time (slowest rank), goodput (vector bits / time), and
whether every rank's result was right. Saves JSON. Tears everything down,
also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from incd.process import IncdProcess  # noqa: E402
from netns_lab.agents import AgentRunError, run_allreduce  # noqa: E402
from netns_lab.topology import Lab  # noqa: E402

UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(s: str) -> int:
    t = s.strip().upper()
    for u in sorted(UNITS, key=len, reverse=True):
        if u and t.endswith(u):
            return int(float(t[: -len(u)]) * UNITS[u])
    return int(t)


def human(n: int) -> str:
    for u, f in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f} {u}"
    return f"{n} B"


def run(args) -> dict:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.workers.split(",")]
    elem = 4
    rows = []
    job = 100
    lab = Lab.load(args.use_lab) if args.use_lab else Lab(args.lab_name, workers=max(worlds), mtu=args.mtu)
    incd = IncdProcess(args.lab_name + "-incd", lab=args.lab_name) if not args.use_lab else None
    try:
        if not args.use_lab:
            log(f"lab: {max(worlds)} workers, MTU {args.mtu}")
            lab.up()
            incd.start()
            log("incd: XDP attached to the switch ports")
        for world in worlds:
            for size in sizes:
                numel = max(1, size // elem)
                job += 1
                t0 = time.time()
                res = run_allreduce(lab, job=job, world=world, numel=numel, dtype=args.dtype,
                                    iters=args.iters, extra=["--verify"], timeout=args.timeout)
                med = max(r["median_s"] for r in res)
                row = {
                    "workers": world, "bytes": numel * elem, "numel": numel, "dtype": args.dtype,
                    "iters": args.iters, "median_s": med, "goodput_gbps": numel * elem * 8 / med / 1e9,
                    "retransmits": sum(r["retransmits"] for r in res),
                    "verified": all(r["verified"] for r in res),
                    "elems_per_packet": res[0]["elems_per_packet"],
                    "per_rank_median_s": [r["median_s"] for r in res],
                }
                rows.append(row)
                log(f"  {world} workers {human(row['bytes']):>8}: {med * 1e3:9.3f} ms "
                    f"{row['goodput_gbps']:7.3f} Gbit/s  {'ok' if row['verified'] else 'WRONG'}  "
                    f"({time.time() - t0:.1f}s)")
    finally:
        if incd:
            incd.stop()
        if not args.use_lab:
            lab.down()
    return {
        "what": "inc allreduce throughput, modulo mode", "dtype": args.dtype, "mtu": args.mtu,
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(result: dict) -> str:
    lines = [f"{'workers':>7} {'size':>9} {'median ms':>10} {'Gbit/s':>8} {'retx':>6} verified"]
    for r in result["rows"]:
        lines.append(f"{r['workers']:>7} {human(r['bytes']):>9} {r['median_s'] * 1e3:>10.3f} "
                     f"{r['goodput_gbps']:>8.3f} {r['retransmits']:>6} {'yes' if r['verified'] else 'NO'}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2,4", help="comma-separated worker counts (default %(default)s)")
    p.add_argument("--sizes", default="1KiB,16KiB,256KiB,1MiB,4MiB,16MiB",
                   help="comma-separated vector sizes (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "int32"], default="float32")
    p.add_argument("--iters", type=int, default=5, help="iterations per size (default %(default)s)")
    p.add_argument("--mtu", type=int, default=3400)
    p.add_argument("--lab-name", default="incbench", help="name of the lab this run creates")
    p.add_argument("--use-lab", metavar="NAME", help="use an existing lab with incd already running")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per size before giving up")
    p.add_argument("--out", default=str(ROOT / "results" / "throughput.json"), help="JSON output file")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("throughput: must run as root (namespaces, XDP)", file=sys.stderr)
        return 1
    try:
        result = run(args)
    except (AgentRunError, RuntimeError) as e:
        print(f"throughput: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else table(result))
    if not args.json:
        print(f"saved {out}")
    return 0 if all(r["verified"] for r in result["rows"]) else 4


if __name__ == "__main__":
    sys.exit(main())
