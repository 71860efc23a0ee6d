"""One measured allreduce size in a lab: `concurrent` jobs at once, every rank
verified. scripts/throughput.py, bench.py and faults.py are built on it."""
from __future__ import annotations

import threading

from .agents import AgentRunError, PSProcess, run_allreduce


def one_size(lab, *, mode: str, world: int, numel: int, concurrent: int, job0: int, args,
             datapath: str = "socket", extra: tuple = ()) -> dict:
    """`concurrent` jobs of `world` ranks each, all at once; hash/ps jobs get their own PS.
    args carries dtype, iters and timeout (the scripts' argparse namespace);
    extra: more inc-agent arguments."""
    results, errors, pss, ps_paths = {}, [], [], set()

    def job_thread(job):
        try:
            results[job] = run_allreduce(lab, job=job, world=world, numel=numel, dtype=args.dtype,
                                         iters=args.iters,
                                         extra=["--verify", "--mode", mode, "--datapath", datapath, *extra],
                                         timeout=args.timeout)
        except (AgentRunError, RuntimeError) as e:
            errors.append(str(e))

    jobs = [job0 + k for k in range(concurrent)]
    try:
        if mode != "modulo":
            # The PS's fast path serves hash mode; a ps-mode PS has only its socket.
            ps_dp = datapath if mode == "hash" else "socket"
            pss = [PSProcess(lab, j, world, mode=mode, datapath=ps_dp) for j in jobs]
        threads = [threading.Thread(target=job_thread, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ps in pss:
            ps_paths.add(ps.result()["datapath"])
    finally:
        for ps in pss:
            ps.kill()
    if errors:
        raise AgentRunError("; ".join(errors))
    per_job = [max(r["median_s"] for r in results[j]) for j in jobs]
    med = max(per_job)
    return {
        "mode": mode, "datapath": datapath, "workers": world, "concurrent": concurrent, "bytes": numel * 4, "numel": numel,
        "dtype": args.dtype, "iters": args.iters, "median_s": med,
        "goodput_gbps": numel * 4 * 8 / med / 1e9,
        "aggregate_goodput_gbps": concurrent * numel * 4 * 8 / med / 1e9,
        "per_job_median_s": per_job,
        "retransmits": sum(r["retransmits"] for j in jobs for r in results[j]),
        "verified": all(r["verified"] for j in jobs for r in results[j]),
        "elems_per_packet": results[jobs[0]][0]["elems_per_packet"],
        "datapaths": sorted({r["datapath"] for j in jobs for r in results[j]}),
        "frames": sorted({r.get("frame", "std") for j in jobs for r in results[j]}),
        "ps_datapaths": sorted(ps_paths),
        "pps_per_agent": min(r["pps"] for j in jobs for r in results[j]),
    }
