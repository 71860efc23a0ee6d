#!/usr/bin/env python3
"""Where a cross-rack allreduce's time goes: CPU or the core link.

Builds the bench's cross-rack lab (2 racks x 4 workers, host links unshaped)
once per leaf-spine rate in --spine-rates, runs one size with INA (modulo, XDP
receive path) and with Gloo's ring, and reports each one's median time, the
bytes that crossed each leaf-spine link per allreduce (link counters over the
run divided by the allreduces in it: Gloo's script adds a warm-up), and how busy the CPUs were
over the run (/proc/stat; agent start-up and --verify included, so an upper
bound). A system whose time does not change when the core gets 100 times
faster is not bound by the core. Saves JSON; prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from incd.process import IncdProcess
from netns_lab.agents import run_allreduce
from netns_lab.benchkit import human, log, parse_size, save_json
from netns_lab.plan import parse_rate
from netns_lab.topology import Lab

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import CROSS_RACKS, CROSS_WORKERS, run_gloo  # noqa: E402


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def link_bytes(lab: Lab) -> tuple[int, int]:
    """Bytes through the middle namespaces' bridge port towards the spine: (up, down)."""
    up = down = 0
    for sw in lab.switches:
        if sw["uplink"]:
            st = lab.run(sw["name"], ["cat", "/sys/class/net/up/statistics/tx_bytes",
                                      "/sys/class/net/up/statistics/rx_bytes"],
                         capture_output=True, text=True, check=True).stdout.split()
            up, down = up + int(st[0]), down + int(st[1])
    return up, down


def measure(lab: Lab, fn, runs: int) -> dict:
    c0, l0, t0 = cpu_busy(), link_bytes(lab), time.monotonic()
    median = fn()
    c1, l1, wall = cpu_busy(), link_bytes(lab), time.monotonic() - t0
    return {"median_s": median, "cpu_busy": (c1[0] - c0[0]) / max(1, c1[1] - c0[1]),
            "up_bytes_per_allreduce": (l1[0] - l0[0]) / runs, "down_bytes_per_allreduce": (l1[1] - l0[1]) / runs,
            "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="16MiB")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--spine-rates", default="1gbit,100gbit")
    ap.add_argument("--out", default=str(ROOT / "results" / "cross_rack_profile.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("cross_rack_profile: must run as root", file=sys.stderr)
        return 1
    nbytes = parse_size(a.size)
    rows = []
    for rate in a.spine_rates.split(","):
        rate_bps = parse_rate(rate)
        lab = Lab("incxp", workers=CROSS_WORKERS, racks=CROSS_RACKS, spine_rate=rate)
        incd = IncdProcess("incxpd", lab="incxp")
        try:
            lab.up()
            incd.start()
            log(f"cross-rack lab: {CROSS_RACKS} racks x {CROSS_WORKERS // CROSS_RACKS}, spine links {rate}")

            def ina():
                res = run_allreduce(lab, job=900, world=CROSS_WORKERS, numel=nbytes // 4, dtype="float32",
                                    iters=a.iters, extra=["--verify", "--datapath", "xdp", "--barrier"], timeout=900)
                if not all(r["verified"] for r in res):
                    raise RuntimeError("INA result not verified")
                return max(r["median_s"] for r in res)

            def gloo():
                return run_gloo(lab, CROSS_WORKERS, [nbytes], a.iters, 29600)[nbytes // 4 * 4]

            for name, fn, runs in (("modulo-xdp", ina, a.iters), ("gloo", gloo, a.iters + 1)):
                r = {"system": name, "spine_rate": rate, **measure(lab, fn, runs)}
                t = r["median_s"]
                r["up_link_busy"] = r["up_bytes_per_allreduce"] * 8 / CROSS_RACKS / rate_bps / t
                r["down_link_busy"] = r["down_bytes_per_allreduce"] * 8 / CROSS_RACKS / rate_bps / t
                rows.append(r)
                log(f"  {name}: {t * 1e3:.1f} ms")
        finally:
            incd.stop()
            lab.down()
    out = {"what": "cross-rack allreduce: time, CPU and core-link use", "size": nbytes,
           "workers": CROSS_WORKERS, "racks": CROSS_RACKS, "iters": a.iters,
           "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    save_json(a.out, out)
    print(f"{'system':>11} {'spine':>8} {'ms':>8} {'cpu busy':>9} {'MB up/leaf':>11} {'MB down/leaf':>13} "
          f"{'up link':>8} {'down link':>10}")
    for r in rows:
        print(f"{r['system']:>11} {r['spine_rate']:>8} {r['median_s'] * 1e3:8.1f} {r['cpu_busy']:9.0%} "
              f"{r['up_bytes_per_allreduce'] / CROSS_RACKS / 1e6:11.1f} {r['down_bytes_per_allreduce'] / CROSS_RACKS / 1e6:13.1f} "
              f"{r['up_link_busy']:8.0%} {r['down_link_busy']:10.0%}")
    print(f"({human(nbytes)} fp32; link busy = bytes per allreduce / what the link carries in the median time; "
          f"saved {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
