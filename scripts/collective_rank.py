#!/usr/bin/env python3
"""One rank of scripts/collectives_bench.py: one collective at several sizes,
through the switch (hostagent.Communicator) or Gloo (torch.distributed, CPU),
fp32; every result checked against numpy; one JSON line of median times.

Sizes are the bytes of the result: allreduce and broadcast of a vector of
that size, allgather of blocks of size / world, reduce_scatter of a vector
of that size into shards of size / world."""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import numpy as np

COLLECTIVES = ("allreduce", "broadcast", "allgather", "reduce_scatter")
ROOT = 1  # not 0: roots other than 0 are the case to get right


def inputs(rank: int, n: int) -> np.ndarray:
    return np.random.default_rng(1000 + rank).standard_normal(n).astype(np.float32)


def expected(coll: str, world: int, rank: int, n: int) -> np.ndarray:
    if coll == "broadcast":
        return inputs(ROOT, n)
    if coll == "allgather":
        return np.concatenate([inputs(r, n // world) for r in range(world)])
    total = np.sum([inputs(r, n).astype(np.float64) for r in range(world)], axis=0)
    if coll == "reduce_scatter":
        return total[rank * (n // world):(rank + 1) * (n // world)]
    return total


def run_inc(coll: str, c, x: np.ndarray, world: int, rank: int) -> np.ndarray:
    if coll == "allreduce":
        return c.allreduce(x)
    if coll == "broadcast":
        return c.broadcast(x, root=ROOT)
    if coll == "allgather":
        return c.allgather(x).reshape(-1)
    return c.reduce_scatter(x)


def run_gloo(coll: str, dist, torch, t, world: int):
    if coll == "allreduce":
        dist.all_reduce(t)
        return t
    if coll == "broadcast":
        dist.broadcast(t, src=ROOT)
        return t
    if coll == "allgather":
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t)
        return torch.cat(out)
    out = torch.empty(t.numel() // world, dtype=t.dtype)
    dist.reduce_scatter_tensor(out, t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--system", choices=["inc", "gloo"], required=True)
    ap.add_argument("--collective", choices=COLLECTIVES, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--job", type=int, default=1)
    ap.add_argument("--master", help="gloo: rank 0's address")
    ap.add_argument("--port", type=int, default=29600)
    ap.add_argument("--sizes", required=True, help="comma-separated byte counts")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    w, rank, coll = a.world, a.rank, a.collective
    out = []
    if a.system == "gloo":
        import os

        import torch
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=rank, world_size=w,
                                timeout=datetime.timedelta(seconds=120))
        barrier = dist.barrier
    else:
        from hostagent import Communicator

        c = Communicator(a.job, rank, w, timeout=60)
        barrier = c.barrier
    for size in (int(s) for s in a.sizes.split(",")):
        n = max(w, size // 4 // w * w)
        x = inputs(rank, n // w if coll == "allgather" else n)
        if coll == "broadcast" and rank != ROOT:
            x = np.zeros_like(x)
        times, err = [], 0.0
        for i in range(a.iters + 1):  # the first is a warm-up
            if a.system == "gloo":
                t = torch.from_numpy(x.copy())
                barrier()
                t0 = time.perf_counter()
                y = run_gloo(coll, dist, torch, t, w).numpy()
            else:
                barrier()
                t0 = time.perf_counter()
                y = run_inc(coll, c, x, w, rank)
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
            want = expected(coll, w, rank, n)
            err = max(err, float(np.max(np.abs(y.astype(np.float64) - want), initial=0.0)))
        exact = coll in ("broadcast", "allgather")
        ok = err == 0.0 if exact else err <= 1e-4  # fp32 sums: quantization (INC) or summation order (Gloo)
        out.append({"bytes": n * 4, "median_s": statistics.median(times), "max_abs_err": err, "verified": ok})
    if a.system == "gloo":
        dist.destroy_process_group()
    else:
        c.close()
    print(json.dumps({"rank": rank, "results": out}))
    return 0 if all(r["verified"] for r in out) else 3


if __name__ == "__main__":
    sys.exit(main())
