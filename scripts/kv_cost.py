#!/usr/bin/env python3
"""Cost of key-value aggregation in the switch, measured in the kernel with
BPF_PROG_TEST_RUN.

1. How to claim-or-add a tuple (bpf/bench_kv.bpf.c, repeat mode: the kernel
   times many runs of one packet, every tuple adding into its aggregator):
   64-bit atomics (compare-and-swap the key, atomic add) vs a spin lock per
   aggregator.
2. The switch's real program (xdp_inc_ingress -> xdp_inc_kv) on one fresh
   packet per run, the cost of a no-op run subtracted: tuples that claim empty
   aggregators (all absorbed: ACK), that add (ACK), that all collide (on to the
   reducer), and a resend of an absorbed psn (re-ACK from the seen state).
By tuples per packet; prints a table and saves JSON.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import numpy as np

import bpf
from bpf import kv_wire as kv
from bpf import wire
from bpf.testrun import XDP_REDIRECT, prog_test_run
from netns_lab.benchkit import log, save_json

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout

TUPLES = (1, 16, 64, 128, wire.KV_MAX_TUPLES)
W_IP, W_PORT = "10.77.1.2", 40000


def packet(job, flow, psn, keys, vals, flags=0) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether() / IP(src=W_IP, dst="10.77.1.1") / UDP(sport=W_PORT, dport=wire.PORT)
                 / Raw(kv.build_kv_packet(keys, vals, job=job, gen=1, flow=flow, psn=psn, flags=flags)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--singles", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "results" / "kv_cost.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("kv_cost: must run as root (BPF)", file=sys.stderr)
        return 1
    from bcc import BPF

    from incd.dataplane import Dataplane

    bench = BPF(src_file=str(bpf.source("bench_kv.bpf.c")).encode(), cflags=[f"-I{bpf.source_dir()}", "-w"])
    fds = {n: bench.load_func(n.encode(), BPF.XDP).fd for n in ("kv_bench_atomic", "kv_bench_locked", "noop")}
    cols = 64
    dp = Dataplane(pool_slots=16, kv_cols=cols)
    job = 1
    dp.set_source(job, 0, socket.inet_aton(W_IP), W_PORT, 1)
    dp.set_ps(job, mac=b"\x02" * 6, port_mac=b"\x02" * 6, addr=socket.inet_aton("10.77.100.2"),
              switch_addr=socket.inet_aton("10.77.100.1"), port=40100, rank=0, ifindex=1)
    rng = np.random.default_rng(1)
    rows = []

    def med(fd, pkt, repeat):
        return float(np.median([prog_test_run(fd, pkt, repeat=repeat).duration_ns for _ in range(a.rounds)]))

    psn = 0
    for n in TUPLES:
        keys = rng.integers(1, 2**64 - 1, n, dtype=np.uint64)
        vals = np.ones(n, np.int64)
        p = packet(job, 0, 0, keys, vals)
        row = {"tuples": n, "bytes": len(p)}
        row["atomic"] = med(fds["kv_bench_atomic"], p, a.repeat)
        row["spin_lock"] = med(fds["kv_bench_locked"], p, a.repeat)
        base = float(np.median([prog_test_run(fds["noop"], p).duration_ns for _ in range(a.singles)]))
        res = {"claim": [], "add": [], "collide": [], "resend": []}
        for _ in range(a.singles):
            dp.set_kv_job(job, offset=0, cols=cols, gen=1, world=1, parts=1, reset_flows=psn == 0)
            dp.clear_kv(job, 0)
            r = prog_test_run(dp.ingress.fd, packet(job, 0, psn, keys, vals))  # claims every row
            assert r.verdict == XDP_REDIRECT and len(r.data) == 42 + wire.HDR_LEN
            res["claim"].append(r.duration_ns)
            r = prog_test_run(dp.ingress.fd, packet(job, 0, psn + 1, keys, vals))  # adds
            res["add"].append(r.duration_ns)
            r = prog_test_run(dp.ingress.fd, packet(job, 0, psn + 1, keys, vals, wire.F_RETRANS))  # re-ACK
            res["resend"].append(r.duration_ns)
            other = keys ^ np.uint64(1 << 40)  # same column (the xor of both halves changes), other key
            other = other ^ np.uint64(1 << 8)
            r = prog_test_run(dp.ingress.fd, packet(job, 0, psn + 2, other, vals))  # all collide
            assert r.verdict == XDP_REDIRECT and len(r.data) > 42 + wire.HDR_LEN
            res["collide"].append(r.duration_ns)
            psn += 3
        for k, v in res.items():
            row[k] = max(0.0, float(np.median(v)) - base)
        row["single_run_overhead"] = base
        rows.append(row)
        log(f"  {n:>3} tuples measured")
    dp.close()
    bench.cleanup()
    save_json(a.out, {"repeat": a.repeat, "rows": rows})
    print(f"{'tuples':>6} {'bytes':>6} {'atomic':>8} {'spinlock':>8} | {'claim':>7} {'add':>7} {'collide':>7} "
          f"{'resend':>7}   (ns per packet; left: add loop only, right: whole switch)")
    for r in rows:
        print(f"{r['tuples']:>6} {r['bytes']:>6} {r['atomic']:>8.1f} {r['spin_lock']:>8.1f} | {r['claim']:>7.1f} "
              f"{r['add']:>7.1f} {r['collide']:>7.1f} {r['resend']:>7.1f}")
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
