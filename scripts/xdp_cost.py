#!/usr/bin/env python3
"""Cost of the switch's aggregation per packet, measured in the kernel with
BPF_PROG_TEST_RUN (repeat mode: the kernel times many runs of one packet).

Compares three ways to add a packet into an aggregator (bpf/bench_agg.bpf.c:
a spin lock around plain adds, a per-lane atomic add, a per-CPU copy; repeat
mode, the kernel times many runs of one packet) and the switch's real program
(bpf/inc_switch.bpf.c, a two-rank modulo job: the first contribution to a slot,
and the last one, which adds and turns the packet into the result). The real
program rewrites the packet, so it is timed one fresh packet per run, and the
cost of such a run for a no-op program is subtracted. By lanes per packet;
prints a table, saves JSON and a PNG.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import numpy as np

import bpf
from bpf import wire
from bpf.testrun import XDP_DROP, XDP_REDIRECT, prog_test_run
from netns_lab.benchkit import log, pyplot, save_json

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout

LANES = (32, 64, 128, 256, 512, 800)


def packet(job: int, gen: int, psn: int, lanes: int, rank: int = 0) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    buf, sizes = wire.build_packets(np.arange(lanes, dtype=np.int32), lanes, job=job, gen=gen, rank=rank, psn0=psn)
    return bytes(Ether() / IP(src="10.77.1.2", dst="10.77.1.1") / UDP(sport=40000, dport=wire.PORT)
                 / Raw(buf.tobytes()[: sizes[0]]))


def ns_per_packet(fd: int, pkt: bytes, repeat: int, rounds: int) -> float:
    # the median of a few rounds: the machine is shared
    return float(np.median([prog_test_run(fd, pkt, repeat=repeat).duration_ns for _ in range(rounds)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "results" / "xdp_cost.json"))
    ap.add_argument("--plot", default=str(ROOT / "results" / "xdp_cost.png"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("xdp_cost: must run as root (BPF)", file=sys.stderr)
        return 1
    from bcc import BPF

    from incd.dataplane import Dataplane

    bench = BPF(src_file=str(bpf.source("bench_agg.bpf.c")).encode(), cflags=[f"-I{bpf.source_dir()}", "-w"])
    variants = {name: bench.load_func(name.encode(), BPF.XDP).fd
                for name in ("agg_spinlock", "agg_spinlock_chunked", "agg_atomic", "agg_percpu")}
    noop = bench.load_func(b"noop", BPF.XDP).fd
    dp = Dataplane(pool_slots=4096)
    rows = []
    singles = 1000
    for job, lanes in enumerate(LANES, start=1):
        pkt = packet(job, 1, 0, lanes)
        row = {"lanes": lanes, "bytes": 4 * lanes}
        for name, fd in variants.items():
            row[name] = ns_per_packet(fd, pkt, a.repeat, a.rounds)
        # the real program: fresh psns, one run each, minus a no-op run's cost
        dp.set_job(job, offset=0, slots=4096, gen=1, world=2)
        for rank in (0, 1):  # BPF_PROG_TEST_RUN's packets come in on lo
            dp.set_source(job, rank, socket.inet_aton("10.77.1.2"), 40000, 1)
        base = float(np.median([prog_test_run(noop, pkt).duration_ns for _ in range(singles)]))
        first, last = [], []
        for psn in range(singles):
            p0, p1 = packet(job, 1, psn, lanes), packet(job, 1, psn, lanes, rank=1)
            r0, r1 = prog_test_run(dp.ingress.fd, p0), prog_test_run(dp.ingress.fd, p1)
            if (r0.verdict, r1.verdict) != (XDP_DROP, XDP_REDIRECT):  # consumed, then the result
                raise SystemExit(f"xdp_cost: the switch did not aggregate ({r0.verdict_name}, {r1.verdict_name})")
            first.append(r0.duration_ns)
            last.append(r1.duration_ns)
        row["switch_first"] = max(0.0, float(np.median(first)) - base)
        row["switch_last"] = max(0.0, float(np.median(last)) - base)
        row["single_run_overhead"] = base
        rows.append(row)
        log(f"  {lanes:>4} lanes measured")
    dp.close()
    bench.cleanup()
    save_json(a.out, {"repeat": a.repeat, "rows": rows})
    print(f"{'lanes':>5} {'bytes':>6} {'spin lock':>10} {'lock x8':>8} {'atomic':>8} {'per-CPU':>8} "
          f"{'switch 1st':>10} {'switch last':>11}   (ns per packet)")
    for r in rows:
        print(f"{r['lanes']:>5} {r['bytes']:>6} {r['agg_spinlock']:>10.1f} {r['agg_spinlock_chunked']:>8.1f} "
              f"{r['agg_atomic']:>8.1f} {r['agg_percpu']:>8.1f} {r['switch_first']:>10.1f} {r['switch_last']:>11.1f}")
    plt = pyplot()
    if plt is None:
        print(f"saved {a.out} (no matplotlib: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("agg_spinlock", "spin lock + adds"), ("agg_spinlock_chunked", "spin lock, 8 lanes a check"),
                       ("agg_atomic", "atomic per lane"),
                       ("agg_percpu", "per-CPU"), ("switch_first", "switch: first contribution"),
                       ("switch_last", "switch: last (add + result)")):
        ax.plot([r["bytes"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("payload bytes per packet")
    ax.set_ylabel("ns per packet")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=110)
    print(f"saved {a.out} and {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
