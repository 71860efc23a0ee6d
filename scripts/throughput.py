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
import json
import threading
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from incd.process import IncdProcess  # noqa: E402
from netns_lab.agents import AgentRunError, PSProcess, run_allreduce  # noqa: E402
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


def one_size(lab, *, mode: str, world: int, numel: int, concurrent: int, job0: int, args) -> dict:
    """`concurrent` jobs of `world` ranks each, all at once; hash/ps jobs get their own PS."""
    results, errors, pss = {}, [], []

    def job_thread(job):
        try:
            results[job] = run_allreduce(lab, job=job, world=world, numel=numel, dtype=args.dtype,
                                         iters=args.iters, extra=["--verify", "--mode", mode],
                                         timeout=args.timeout)
        except (AgentRunError, RuntimeError) as e:
            errors.append(str(e))

    jobs = [job0 + k for k in range(concurrent)]
    try:
        if mode != "modulo":
            pss = [PSProcess(lab, j, world, mode=mode) for j in jobs]
        threads = [threading.Thread(target=job_thread, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ps in pss:
            ps.result()
    finally:
        for ps in pss:
            ps.kill()
    if errors:
        raise AgentRunError("; ".join(errors))
    per_job = [max(r["median_s"] for r in results[j]) for j in jobs]
    med = max(per_job)
    return {
        "mode": mode, "workers": world, "concurrent": concurrent, "bytes": numel * 4, "numel": numel,
        "dtype": args.dtype, "iters": args.iters, "median_s": med,
        "goodput_gbps": numel * 4 * 8 / med / 1e9,
        "aggregate_goodput_gbps": concurrent * numel * 4 * 8 / med / 1e9,
        "per_job_median_s": per_job,
        "retransmits": sum(r["retransmits"] for j in jobs for r in results[j]),
        "verified": all(r["verified"] for j in jobs for r in results[j]),
        "elems_per_packet": results[jobs[0]][0]["elems_per_packet"],
        "pps_per_agent": min(r["pps"] for j in jobs for r in results[j]),
    }


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
                                       concurrent=conc, job0=job, args=args)
                        job += conc
                        rows.append(row)
                        log(f"  {mode:>6} x{conc} {world} workers {human(row['bytes']):>8}: "
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(result: dict) -> str:
    lines = [f"{'mode':>6} {'jobs':>4} {'workers':>7} {'size':>9} {'median ms':>10} {'Gbit/s':>8} "
             f"{'vs ps':>6} {'retx':>6} verified"]
    for r in result["rows"]:
        vs = f"{r['time_vs_ps']:.2f}" if r["time_vs_ps"] else "-"
        lines.append(f"{r['mode']:>6} {r['concurrent']:>4} {r['workers']:>7} {human(r['bytes']):>9} "
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


def run_and_save(prog: str, run, args, table, all_ok, as_json: bool = False) -> int:
    """A measuring program's main: run(args) as root, errors in one line, the
    result saved to args.out and printed as a table. Exit 4 if not all_ok(rows)."""
    if os.geteuid() != 0:
        print(f"{prog}: must run as root (namespaces, XDP)", file=sys.stderr)
        return 1
    try:
        result = run(args)
    except (AgentRunError, RuntimeError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if as_json else table(result))
    if not as_json:
        print(f"saved {out}")
    return 0 if all_ok(result["rows"]) else 4


if __name__ == "__main__":
    sys.exit(main())
