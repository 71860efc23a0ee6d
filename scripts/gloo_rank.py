#!/usr/bin/env python3
"""One rank of a Gloo ring allreduce (torch.distributed, CPU) for the benchmark
suite: all sizes in one process, fp32, median time per size, one JSON line."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="rank 0's address")
    ap.add_argument("--port", type=int, default=29500)
    ap.add_argument("--sizes", required=True, help="comma-separated byte counts")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ifname", default="eth0")
    a = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", a.ifname)
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        print("gloo_rank: torch is not installed (pip install torch==2.13.0)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank,
                            world_size=a.world, timeout=datetime.timedelta(seconds=120))
    out = []
    for size in (int(x) for x in a.sizes.split(",")):
        t = torch.randn(max(1, size // 4), dtype=torch.float32)
        dist.all_reduce(t)  # warm-up: connections and buffers
        times = []
        for _ in range(a.iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        out.append({"bytes": t.numel() * 4, "median_s": statistics.median(times), "times_s": times})
    dist.destroy_process_group()
    print(json.dumps({"rank": a.rank, "world": a.world, "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
