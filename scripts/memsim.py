#!/usr/bin/env python3
"""Trace-driven simulation of incd's switch memory manager.

Runs the allocator code incd uses (incd/memory.py) on simulated time for each
policy over the same job trace, and reports average job completion time (JCT),
deadline satisfaction and memory utilisation as a table, JSON and a plot.

Model (fluid): a job's epoch takes compute_s + model_bytes / throughput, and
throughput follows its slots (Memory = Throughput x RTT, capped by the link).
Memory is re-divided at every arrival and completion.

Trace JSON (--trace, or --save-trace to write the generated one):
  {"pool_slots": 1024, "rtt_us": 500, "link_gbps": 100,
   "jobs": [{"job": 1, "arrival_s": 0.0, "model_mb": 100, "epochs": 20, "compute_s": 0.2,
             "want_slots": 512, "deadline_s": 30.0}, ...]}     # deadline_s: after arrival, or null
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from incd.memory import POLICIES, JobDemand, Link, MemoryManager
from netns_lab.benchkit import pyplot, save_json

ROOT = Path(__file__).resolve().parent.parent  # results/ of the checkout

MODELS_MB = (25, 100, 350)  # about ResNet-50, BERT-base, BERT-large gradients in fp32


def make_trace(seed: int, jobs: int, pool: int, rtt_us: float, link_gbps: float,
               mean_gap_s: float, deadline_frac: float) -> dict:
    rng = random.Random(seed)
    link = Link(rtt_us * 1e-6, link_gbps * 1e9)
    t, out = 0.0, []
    for j in range(1, jobs + 1):
        t += rng.expovariate(1 / mean_gap_s)
        model = rng.choice(MODELS_MB)
        epochs = rng.randint(5, 40)
        compute = rng.uniform(0.05, 0.5)
        want = rng.choice((pool // 8, pool // 4, pool // 2))
        want -= want % 2
        ideal = epochs * (compute + model * 1e6 / link.throughput(want))
        deadline = round(ideal * rng.uniform(1.3, 4.0), 3) if rng.random() < deadline_frac else None
        out.append({"job": j, "arrival_s": round(t, 3), "model_mb": model, "epochs": epochs,
                    "compute_s": round(compute, 3), "want_slots": want, "deadline_s": deadline})
    return {"pool_slots": pool, "rtt_us": rtt_us, "link_gbps": link_gbps, "seed": seed, "jobs": out}


def normalize(trace: dict) -> dict:
    """Checks a trace and fills optional fields: job (its position), compute_s (0),
    want_slots (half the pool), deadline_s (none)."""
    for k in ("pool_slots", "rtt_us", "link_gbps", "jobs"):
        if k not in trace:
            raise ValueError(f"trace has no {k!r}")
    pool = int(trace["pool_slots"])
    if pool < 2 or trace["rtt_us"] <= 0 or trace["link_gbps"] <= 0:
        raise ValueError("pool_slots >= 2, rtt_us > 0 and link_gbps > 0 please")
    jobs = []
    for i, j in enumerate(trace["jobs"]):
        try:
            job = {"job": int(j.get("job", i + 1)), "arrival_s": float(j["arrival_s"]),
                   "model_mb": float(j["model_mb"]), "epochs": float(j["epochs"]),
                   "compute_s": float(j.get("compute_s", 0.0)),
                   "want_slots": int(j.get("want_slots", pool // 2)),
                   "deadline_s": None if j.get("deadline_s") is None else float(j["deadline_s"])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"job #{i + 1}: needs arrival_s, model_mb, epochs as numbers ({e})")
        if job["epochs"] <= 0 or job["model_mb"] < 0 or job["compute_s"] < 0 or job["want_slots"] < 2:
            raise ValueError(f"job #{i + 1}: epochs > 0, model_mb >= 0, compute_s >= 0, want_slots >= 2")
        job["want_slots"] -= job["want_slots"] % 2
        jobs.append(job)
    if len({j["job"] for j in jobs}) != len(jobs):
        raise ValueError("job ids repeat")
    if not jobs:
        raise ValueError("no jobs")
    return {**trace, "pool_slots": pool, "jobs": jobs}


def simulate(trace: dict, policy: str) -> dict:
    link = Link(trace["rtt_us"] * 1e-6, trace["link_gbps"] * 1e9)
    mm = MemoryManager(trace["pool_slots"], policy, link)
    pending = sorted(trace["jobs"], key=lambda j: j["arrival_s"])
    active: dict[int, dict] = {}
    held: dict[int, int] = {}
    done = []
    t = used_integral = busy_time = 0.0
    while pending or active:
        demands = [JobDemand(j["job"], j["arrival_s"], j["want_slots"],
                             None if j["deadline_s"] is None else j["arrival_s"] + j["deadline_s"],
                             int(j["model_mb"] * 1e6), j["left"], j["compute_s"]) for j in active.values()]
        held = mm.targets(demands, t, held) if demands else {}
        rates = {}
        for jid, j in active.items():
            thr = link.throughput(held.get(jid, 0))
            rates[jid] = 1.0 / (j["compute_s"] + j["model_mb"] * 1e6 / thr) if thr > 0 else 0.0
        horizon = [j["left"] / rates[jid] for jid, j in active.items() if rates[jid] > 0]
        t_next = min([t + h for h in horizon] + ([pending[0]["arrival_s"]] if pending else []))
        dt = t_next - t
        if active:
            used_integral += sum(held.values()) * dt
            busy_time += dt
        for jid, j in active.items():
            j["left"] -= rates[jid] * dt
        t = t_next
        for jid in [jid for jid, j in active.items() if j["left"] <= 1e-9]:
            j = active.pop(jid)
            held.pop(jid, None)
            jct = t - j["arrival_s"]
            done.append({"job": jid, "jct_s": jct, "deadline_s": j["deadline_s"],
                         "met": None if j["deadline_s"] is None else jct <= j["deadline_s"] + 1e-9})
        while pending and pending[0]["arrival_s"] <= t + 1e-12:
            j = dict(pending.pop(0))
            j["left"] = float(j["epochs"])
            active[j["job"]] = j
    with_dl = [d for d in done if d["deadline_s"] is not None]
    return {
        "policy": policy, "jobs": len(done),
        "avg_jct_s": sum(d["jct_s"] for d in done) / len(done),
        "avg_jct_deadline_jobs_s": (sum(d["jct_s"] for d in with_dl) / len(with_dl)) if with_dl else None,
        "deadline_jobs": len(with_dl),
        "deadlines_met": sum(d["met"] for d in with_dl),
        "deadline_satisfaction": (sum(d["met"] for d in with_dl) / len(with_dl)) if with_dl else None,
        "memory_utilisation": used_integral / (trace["pool_slots"] * busy_time) if busy_time else 0.0,
        "makespan_s": t,
        "per_job": done,
    }


def plot(results: list[dict], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        print("memsim: matplotlib not installed; no plot (scripts/setup.sh installs it)", file=sys.stderr)
        return False
    names = [r["policy"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.4))
    panels = (("avg_jct_s", "average JCT (s)"), ("deadline_satisfaction", "deadlines met"),
              ("memory_utilisation", "memory utilisation"))
    for a, (key, label) in zip(ax, panels):
        vals = [r[key] or 0 for r in results]
        a.bar(names, vals, color=["#777", "#49a", "#d62"][: len(names)])
        a.set_title(label)
        for i, v in enumerate(vals):
            a.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", help="job trace JSON (default: generate one)")
    p.add_argument("--save-trace", help="write the trace used here")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=60)
    p.add_argument("--pool-slots", type=int, default=1024)
    p.add_argument("--rtt-us", type=float, default=500.0)
    p.add_argument("--link-gbps", type=float, default=100.0)
    p.add_argument("--mean-gap-s", type=float, default=4.0, help="mean time between arrivals")
    p.add_argument("--deadline-frac", type=float, default=0.5, help="share of jobs with a deadline")
    p.add_argument("--out", default=str(ROOT / "results" / "memsim.json"))
    p.add_argument("--plot", default=str(ROOT / "results" / "memsim.png"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    try:
        trace = normalize(json.loads(Path(a.trace).read_text()) if a.trace else
                          make_trace(a.seed, a.jobs, a.pool_slots, a.rtt_us, a.link_gbps, a.mean_gap_s,
                                     a.deadline_frac))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        print(f"memsim: bad trace: {e}", file=sys.stderr)
        return 1
    if a.save_trace:
        Path(a.save_trace).write_text(json.dumps(trace, indent=1))
    policies = a.policies.split(",")
    bad = set(policies) - set(POLICIES)
    if bad:
        print(f"memsim: unknown policies {sorted(bad)}", file=sys.stderr)
        return 2
    results = [simulate(trace, pol) for pol in policies]
    out = {"trace": {k: v for k, v in trace.items() if k != "jobs"}, "jobs": len(trace["jobs"]),
           "results": results}
    save_json(a.out, out)
    plotted = plot(results, Path(a.plot), f"{len(trace['jobs'])} jobs, pool {trace['pool_slots']} slots, "
                   f"RTT {trace['rtt_us']} us, {trace['link_gbps']} Gbit/s")
    if a.json:
        print(json.dumps({**out, "results": [{k: v for k, v in r.items() if k != "per_job"} for r in results]}))
        return 0
    print(f"{'policy':>7} {'avg JCT s':>10} {'JCT dl s':>9} {'deadlines met':>14} {'mem util':>9} {'makespan s':>11}")
    for r in results:
        dl = f"{r['deadlines_met']}/{r['deadline_jobs']}"
        jd = f"{r['avg_jct_deadline_jobs_s']:.1f}" if r["avg_jct_deadline_jobs_s"] is not None else "-"
        print(f"{r['policy']:>7} {r['avg_jct_s']:>10.1f} {jd:>9} {dl:>14} {r['memory_utilisation']:>9.2f} "
              f"{r['makespan_s']:>11.1f}")
    base = {r["policy"]: r["avg_jct_s"] for r in results}
    if "fifo" in base and "edf" in base:
        print(f"EDF average JCT / FIFO: {base['edf'] / base['fifo']:.2f}")
    print(f"saved {a.out}" + (f" and {a.plot}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
