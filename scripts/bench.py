#!/usr/bin/env python3
"""The benchmark suite: in-network aggregation against its peers, in one run.

For each regime (host links unshaped; shaped to 1 Gbit/s - the
bandwidth-bound regime of a real cluster; cross-rack: two racks of four
behind leaf switches, their links to the spine at 1 Gbit/s, where the ring
sends about twice the vector across the core per rank and two-tier
aggregation one partial per rack) one lab is built, and every system
runs on it: INA modulo and hash through the XDP switch, each with the
agents' socket data path and with their XDP receive path (-xdp; hash-xdp's
PS answers complete aggregates with its XDP fast path too), the
user-space parameter server (--mode ps), and Gloo's ring allreduce
(torch.distributed, CPU); modulo-jumbo: the XDP path with 64 KB jumbo
frames (the lab then runs at MTU 65535, Gloo included). fp32, all INA
results verified. Prints a table with each system's median
time and its ratio to Gloo, saves JSON and PNG plots (time vs size per system;
ratio to Gloo). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from incd.process import IncdProcess
from netns_lab.agents import AgentRunError
from netns_lab.allreduce_bench import one_size
from netns_lab.benchkit import human, log, parse_size, pyplot, save_json
from netns_lab.plan import MTU_DEFAULT, MTU_JUMBO
from netns_lab.topology import Lab

ROOT = Path(__file__).resolve().parent.parent  # gloo_rank.py beside this file, results/
# An INA system is a mode and the agents' data path: "modulo" sends and receives
# through sockets, "modulo-xdp" receives through the host XDP program ("hash-xdp":
# the PS's fast path as well).
SYSTEMS = ("modulo", "modulo-xdp", "modulo-jumbo", "hash", "hash-xdp", "ps", "gloo")
# modulo-jumbo: the XDP path with 64 KB jumbo frames (bpf/mode_jumbo.h), a window
# of 16 frames; it needs every link's MTU at plan.MTU_JUMBO (--mtu).
JUMBO_ARGS = ("--frame", "jumbo", "--window", str(16 * 20))
# The cross-rack regime ("cross-rack" or "cross-rack:RATE"): 2 racks of 4 workers,
# the leaf-spine links shaped (default 1gbit), host links unshaped; every rank
# in it, so half of each ring and each aggregation crosses the core. Only
# modulo jobs run on a two-tier fabric (incd/fabric.py).
CROSS_RACKS, CROSS_WORKERS, CROSS_RATE = 2, 8, "1gbit"
CROSS_SYSTEMS = ("modulo", "modulo-xdp", "gloo")


def regime_lab(regime: str, name: str, workers: int, mtu: int) -> tuple[Lab, list[int] | None]:
    """The lab for a regime, and the worlds it forces (None: the --workers given)."""
    if regime.startswith("cross-rack"):
        rate = regime.partition(":")[2] or CROSS_RATE
        return Lab(name, workers=CROSS_WORKERS, racks=CROSS_RACKS, spine_rate=rate, mtu=mtu), [CROSS_WORKERS]
    return Lab(name, workers=workers, ps=True, rate=None if regime == "unshaped" else regime, mtu=mtu), None


def run_gloo(lab: Lab, world: int, sizes: list[int], iters: int, port: int) -> dict[int, float]:
    master = lab.addr("h1")
    procs = [lab.popen(f"h{r + 1}", [sys.executable, str(ROOT / "scripts" / "gloo_rank.py"), "--rank", str(r),
                                      "--world", str(world), "--master", master, "--port", str(port),
                                      "--sizes", ",".join(map(str, sizes)), "--iters", str(iters)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"gloo rank failed: {err.strip()[-400:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {row["bytes"]: max(r["results"][i]["median_s"] for r in results)
            for i, row in enumerate(results[0]["results"])}


def run(args) -> dict:
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    worlds = [int(w) for w in args.workers.split(",")]
    systems = args.systems.split(",")
    regimes = args.regimes.split(",")
    rows = []
    job = 500
    for regime in regimes:
        args.mtu = args.mtu or (MTU_JUMBO if "modulo-jumbo" in systems else MTU_DEFAULT)
        lab, forced = regime_lab(regime, f"incb{regimes.index(regime)}", max(worlds), args.mtu)
        here = [s for s in systems if forced is None or s in CROSS_SYSTEMS]
        if here != systems:
            log(f"regime {regime}: {', '.join(s for s in systems if s not in here)} do not run across racks; skipped")
        incd = IncdProcess(lab.name + "-incd", lab=lab.name)
        try:
            log(f"regime {regime}: lab with {lab.workers} workers" +
                (f" in {lab.racks} racks, spine links {lab.spine_impair.rate}" if lab.racks > 1 else " + ps"))
            lab.up()
            incd.start()
            for world in forced or worlds:
                if "gloo" in here:
                    t0 = time.time()
                    g = run_gloo(lab, world, sizes, args.iters, 29500 + world)
                    for size in sizes:
                        nbytes = max(1, size // 4) * 4  # what gloo_rank.py reduces: whole fp32 values
                        rows.append({"regime": regime, "system": "gloo", "workers": world, "bytes": nbytes,
                                     "median_s": g[nbytes], "verified": None})
                    log(f"  gloo {world} workers: {', '.join(f'{human(s)} {g[max(1, s // 4) * 4] * 1e3:.2f} ms' for s in sizes)}"
                        f" ({time.time() - t0:.0f}s)")
                for system in (s for s in here if s != "gloo"):
                    for size in sizes:
                        t0 = time.time()
                        mode, _, dp = system.partition("-")
                        jumbo = dp == "jumbo"
                        dp = "xdp" if jumbo else dp
                        # Each timed iteration after a barrier, as gloo_rank.py's.
                        r = one_size(lab, mode=mode, world=world, numel=max(1, size // 4), concurrent=1,
                                     job0=job, args=args, datapath=dp or "socket",
                                     extra=("--barrier", *(JUMBO_ARGS if jumbo else ())))
                        if r["datapaths"] != [dp or "socket"] or r["frames"] != ["jumbo" if jumbo else "std"]:
                            raise RuntimeError(f"{system}: the agents used {r['datapaths']} {r['frames']}")
                        if mode == "hash" and r["ps_datapaths"] != [dp or "socket"]:
                            raise RuntimeError(f"{system}: the PS used {r['ps_datapaths']}")
                        job += 1
                        rows.append({"regime": regime, "system": system, "workers": world, "bytes": r["bytes"],
                                     "median_s": r["median_s"], "verified": r["verified"],
                                     "pps_per_agent": r["pps_per_agent"], "retransmits": r["retransmits"]})
                        log(f"  {system:>6} {world} workers {human(r['bytes']):>8}: {r['median_s'] * 1e3:9.2f} ms "
                            f"{'ok' if r['verified'] else 'WRONG'} ({time.time() - t0:.1f}s)")
        finally:
            incd.stop()
            lab.down()
    gloo = {(r["regime"], r["workers"], r["bytes"]): r["median_s"] for r in rows if r["system"] == "gloo"}
    for r in rows:
        g = gloo.get((r["regime"], r["workers"], r["bytes"]))
        r["vs_gloo"] = r["median_s"] / g if g else None
    return {"what": "allreduce: INA vs parameter server vs Gloo", "dtype": "float32", "iters": args.iters,
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "mtu": args.mtu, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}


def table(res: dict) -> str:
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in res["rows"])]
    keys = sorted({(r["regime"], r["workers"], r["bytes"]) for r in res["rows"]},
                  key=lambda k: (k[0] != "unshaped", k[0], k[1], k[2]))
    by = {(r["regime"], r["workers"], r["bytes"], r["system"]): r for r in res["rows"]}
    head = f"{'regime':>9} {'wk':>2} {'size':>8} " + " ".join(f"{s + ' ms':>10}" for s in systems) + \
        "  " + " ".join(f"{s + '/gloo':>11}" for s in systems if s != "gloo")
    lines = [head]
    for k in keys:
        cells = [f"{by[k + (s,)]['median_s'] * 1e3:>10.2f}" if k + (s,) in by else f"{'-':>10}" for s in systems]
        ratios = [f"{by[k + (s,)]['vs_gloo']:>11.2f}" if k + (s,) in by and by[k + (s,)]["vs_gloo"] else f"{'-':>11}"
                  for s in systems if s != "gloo"]
        lines.append(f"{k[0]:>9} {k[1]:>2} {human(k[2]):>8} " + " ".join(cells) + "  " + " ".join(ratios))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    panels = sorted({(r["regime"], r["workers"]) for r in res["rows"]})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.4), squeeze=False)
    for c, (regime, world) in enumerate(panels):
        for s in SYSTEMS:
            pts = sorted((r["bytes"], r["median_s"], r["vs_gloo"]) for r in res["rows"]
                         if (r["regime"], r["workers"], r["system"]) == (regime, world, s))
            if not pts:
                continue
            axes[0][c].loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=s)
            if s != "gloo":
                axes[1][c].semilogx([p[0] for p in pts], [p[2] for p in pts], marker="o", label=s)
        axes[0][c].set_title(f"{regime}, {world} workers", fontsize=9)
        axes[0][c].set_ylabel("time (ms)")
        axes[1][c].axhline(1.0, color="gray", lw=0.8)
        axes[1][c].set_ylabel("time / Gloo")
        axes[1][c].set_xlabel("vector bytes")
        for ax in (axes[0][c], axes[1][c]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--regimes", default="unshaped,1gbit,cross-rack",
                    help="unshaped, a tc rate for the host links such as 1gbit, and/or cross-rack[:RATE]: "
                         f"{CROSS_RACKS} racks x {CROSS_WORKERS // CROSS_RACKS} workers, leaf-spine links at RATE "
                         f"(default {CROSS_RATE}), host links unshaped ({', '.join(CROSS_SYSTEMS)} only)")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--sizes", default="1KiB,64KiB,1MiB,16MiB,64MiB")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mtu", type=int, default=0,
                    help=f"every link's MTU (default {MTU_DEFAULT}, or {MTU_JUMBO} when modulo-jumbo runs)")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench.json"))
    ap.add_argument("--plot", default=str(ROOT / "results" / "bench.png"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root", file=sys.stderr)
        return 1
    bad = set(a.systems.split(",")) - set(SYSTEMS)
    if bad:
        print(f"bench: unknown systems {sorted(bad)}", file=sys.stderr)
        return 2
    if "gloo" in a.systems.split(","):
        try:
            import torch  # noqa: F401
        except ImportError:
            print("bench: Gloo needs torch: .venv/bin/pip install torch==2.13.0 (make bench does it)",
                  file=sys.stderr)
            return 2
    try:
        res = run(a)
    except (AgentRunError, RuntimeError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    save_json(a.out, res)
    print(table(res))
    print(f"saved {a.out}" + (f" and {a.plot}" if plot(res, Path(a.plot)) else ""))
    return 0 if all(r["verified"] in (None, True) for r in res["rows"]) else 4


if __name__ == "__main__":
    sys.exit(main())
