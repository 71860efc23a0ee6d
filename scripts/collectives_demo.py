#!/usr/bin/env python3
"""The Python API in a lab: each rank runs the code below (see `rank_main`),
which is what a training script does with hostagent.Communicator.

    sudo .venv/bin/python scripts/collectives_demo.py [--workers 4] [--json]

Brings up its own lab and incd, runs one process per worker host, prints what
each rank got, tears everything down (also on failure or Ctrl-C). With
--rank R it is one rank (the environment gives INC_JOB, WORLD_SIZE and the
switch; the lab's default gateway is the switch)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np


def rank_main(rank: int) -> dict:
    from hostagent import Communicator

    with Communicator(rank=rank) as c:  # job and world from INC_JOB, WORLD_SIZE
        grads = np.full(1000, rank + 1, dtype=np.float32)
        total = c.allreduce(grads)                      # sum over ranks, float32
        mean = c.allreduce(grads, op="avg")
        top = c.allreduce(np.array([rank * 10], np.int32), op="max")
        params = c.broadcast(np.arange(4, dtype=np.float64) if rank == 0 else np.zeros(4), root=0)
        ids = c.allgather(np.array([rank, rank * rank], np.int32))
        shard = c.reduce_scatter(np.ones((c.world * 2,), np.int32))
        c.barrier()
        return {"rank": rank, "datapath": c.datapath, "sum": float(total[0]), "avg": float(mean[0]),
                "max": int(top[0]), "broadcast": params.tolist(), "allgather": ids.tolist(),
                "reduce_scatter": shard.tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--job", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON list of the ranks' results")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank is not None:
        print(json.dumps(rank_main(a.rank)), flush=True)
        return 0
    if a.workers < 1:
        ap.error("--workers must be at least 1")
    from netns_lab.harness import LabWithIncd

    print(f"lab with {a.workers} workers and incd ...", file=sys.stderr)
    with LabWithIncd("coll", workers=a.workers) as lab:
        env = {"INC_JOB": str(a.job), "WORLD_SIZE": str(a.workers)}
        procs = [lab.popen(f"h{r + 1}", ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, __file__,
                                          "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(a.workers)]
        results, failed = [], False
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            if p.returncode != 0:
                failed = True
                print(f"rank {r} failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}",
                      file=sys.stderr)
            else:
                results.append(json.loads(out.strip().splitlines()[-1]))
    if a.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"rank {r['rank']} ({r['datapath']}): sum {r['sum']:g} avg {r['avg']:g} max {r['max']} "
                  f"broadcast {r['broadcast']} allgather {r['allgather']} reduce_scatter {r['reduce_scatter']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
