#!/usr/bin/env python3
"""The collectives against Gloo, in one lab and one run: allreduce, broadcast
(root 1), allgather and reduce_scatter through the switch (hostagent's
Communicator, modulo mode, the XDP receive path where it loads) and through
Gloo (torch.distributed, CPU), fp32, each rank's result checked against
numpy (scripts/collective_rank.py). Prints a table of median times (the
slowest rank's) and the ratio INC / Gloo, saves JSON and a PNG.

Needs root and torch (`make setup-torch`)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from incd.process import IncdProcess
from netns_lab.benchkit import human, log, parse_size, pyplot, save_json
from netns_lab.topology import Lab

ROOT = Path(__file__).resolve().parent.parent
RANK = str(ROOT / "scripts" / "collective_rank.py")
COLLECTIVES = ("allreduce", "broadcast", "allgather", "reduce_scatter")


def one(lab: Lab, system: str, coll: str, world: int, sizes: list[int], iters: int, job: int) -> dict[int, dict]:
    argv = ["--system", system, "--collective", coll, "--world", str(world), "--sizes", ",".join(map(str, sizes)),
            "--iters", str(iters), "--job", str(job), "--master", lab.addr("h1"), "--port", str(29600 + job % 300)]
    procs = [lab.popen(f"h{r + 1}", [sys.executable, RANK, "--rank", str(r), *argv], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True) for r in range(world)]
    reps = []
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=900)
        if p.returncode not in (0, 3) or not out.strip():
            raise RuntimeError(f"{system} {coll} rank {r} failed: {err.strip()[-600:]}")
        reps.append(json.loads(out.strip().splitlines()[-1]))
    return {row["bytes"]: {"median_s": max(rep["results"][i]["median_s"] for rep in reps),
                           "verified": all(rep["results"][i]["verified"] for rep in reps),
                           "max_abs_err": max(rep["results"][i]["max_abs_err"] for rep in reps)}
            for i, row in enumerate(reps[0]["results"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--sizes", default="64KiB,1MiB,16MiB")
    ap.add_argument("--collectives", default=",".join(COLLECTIVES))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "collectives.json"))
    ap.add_argument("--plot", default=str(ROOT / "results" / "collectives.png"))
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    colls = a.collectives.split(",")
    bad = [c for c in colls if c not in COLLECTIVES]
    if bad or a.workers < 2:
        ap.error(f"collectives are {', '.join(COLLECTIVES)}; workers at least 2")
    rows = []
    lab = Lab("incc", workers=a.workers)
    incd = IncdProcess(lab.name + "-incd", lab=lab.name)
    try:
        lab.up()
        incd.start()
        for k, coll in enumerate(colls):
            res = {s: one(lab, s, coll, a.workers, sizes, a.iters, 700 + 2 * k + (s == "gloo"))
                   for s in ("inc", "gloo")}
            for nbytes in sorted(res["inc"]):
                i, g = res["inc"][nbytes], res["gloo"].get(nbytes)
                rows.append({"collective": coll, "bytes": nbytes, "workers": a.workers,
                             "inc_s": i["median_s"], "gloo_s": g and g["median_s"],
                             "inc_verified": i["verified"], "gloo_verified": g and g["verified"],
                             "ratio": g and i["median_s"] / g["median_s"]})
                log(f"{coll:>14} {human(nbytes):>8}: inc {i['median_s'] * 1e3:8.2f} ms "
                    f"{'ok' if i['verified'] else 'WRONG'}, gloo {g['median_s'] * 1e3:8.2f} ms")
    finally:
        incd.stop()
        lab.down()
    print(f"{'collective':>14} {'size':>8} {'inc ms':>9} {'gloo ms':>9} {'inc/gloo':>9}")
    for r in rows:
        print(f"{r['collective']:>14} {human(r['bytes']):>8} {r['inc_s'] * 1e3:9.2f} {r['gloo_s'] * 1e3:9.2f} "
              f"{r['ratio']:9.2f}{'' if r['inc_verified'] else '  INC RESULT WRONG'}")
    save_json(a.out, {"workers": a.workers, "iters": a.iters, "rows": rows})
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for coll in colls:
            rs = [r for r in rows if r["collective"] == coll]
            ax.plot([r["bytes"] for r in rs], [r["ratio"] for r in rs], marker="o", label=coll)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes of the result")
        ax.set_ylabel("time INC / Gloo (below 1: INC faster)")
        ax.set_title(f"collectives, {a.workers} workers, fp32")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot)
        print(f"saved {a.out} and {a.plot}")
    return 0 if all(r["inc_verified"] and r["gloo_verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
