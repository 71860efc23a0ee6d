"""The Python API (hostagent.Communicator) in a real lab: every collective on
every rank checked against numpy (tests/helpers/comm_worker.py), in modulo and
hash mode, on both data paths, with 2 to 8 ranks and roots other than 0, and
under loss and reordering; bad input gives CommError, not a traceback or a
hang."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from netns_lab.agents import PSProcess
from netns_lab.harness import LabWithIncd

WORKER = str(Path(__file__).resolve().parent.parent / "helpers" / "comm_worker.py")
CASES = {  # name: (world, mode, datapath, lab faults)
    "modulo-xdp-4": (4, "modulo", "xdp", {}),
    "hash-socket-3": (3, "hash", "socket", {}),
    "modulo-socket-4-loss-reorder": (4, "modulo", "socket", {"loss_pct": 2.0, "reorder_pct": 10.0}),
    "hash-xdp-4-loss": (4, "hash", "xdp", {"loss_pct": 2.0}),
    "modulo-xdp-2-loss": (2, "modulo", "xdp", {"loss_pct": 2.0}),
    "modulo-socket-8": (8, "modulo", "socket", {}),
}


def run_ranks(lab, job: int, world: int, mode: str, datapath: str) -> list[dict]:
    procs = [lab.popen(f"h{r + 1}", [sys.executable, WORKER, str(job), str(r), str(world), mode, datapath],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    reports = []
    try:
        for r, p in enumerate(procs):
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, f"rank {r} exit {p.returncode}: {err[-2000:]}"
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return reports


@pytest.mark.parametrize("case", list(CASES))
def test_every_collective_matches_numpy(root, case):
    world, mode, datapath, faults = CASES[case]
    with LabWithIncd("cm", workers=world, ps=mode == "hash", **faults) as lab:
        ps = PSProcess(lab, 5, world) if mode == "hash" else None
        try:
            reports = run_ranks(lab, 5, world, mode, datapath)
        finally:
            if ps:
                ps.kill()
    for r, rep in enumerate(reports):
        bad = {k: v for k, v in rep.items() if not v[0]}
        assert not bad, f"rank {r}: {bad}"
        assert len(rep) == 19, sorted(rep)  # every check ran


BAD = """
import sys
from hostagent import CommError, Communicator
try:
    Communicator(job=None, rank=0, world=1)
except CommError as e:
    print("E1", e)
try:
    Communicator(job=3, rank=2, world=2)
except CommError as e:
    print("E2", e)
"""


def test_bad_arguments_are_comm_errors(root):
    r = subprocess.run([sys.executable, "-c", BAD], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "E1 no job id: pass it or set INC_JOB" in r.stdout
    assert "E2 rank 2 is not in 0..1" in r.stdout


LOOP = """
import sys, time
import numpy as np
from hostagent import CommError, Communicator
job, rank = int(sys.argv[1]), int(sys.argv[2])
c = Communicator(job, rank, 3, datapath="auto", fail_timeout=2.0)
x = np.ones(1 << 18, np.float32)
print("ready", flush=True)
t0 = time.monotonic()
try:
    while time.monotonic() - t0 < 60:
        c.allreduce(x)
except CommError as e:
    print("CommError:", e, flush=True)
    sys.exit(3)
print("no error", flush=True)
"""


def test_a_killed_rank_makes_the_others_raise(root):
    import time

    with LabWithIncd("ck", workers=3) as lab:
        procs = [lab.popen(f"h{r + 1}", [sys.executable, "-c", LOOP, "6", str(r)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for r in range(3)]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            time.sleep(1.0)
            procs[2].kill()
            killed = time.monotonic()
            for p in procs[:2]:
                out, err = p.communicate(timeout=30)
                took = time.monotonic() - killed
                assert p.returncode == 3, (out, err[-1500:])
                assert "CommError:" in out and "rank 2" in out, out
                assert took < 15, took  # fail_timeout 2 s plus detection, not the 60 s loop
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


SHARDS = """
import json, sys
import numpy as np
from hostagent import Communicator

def rx():
    return int(open("/sys/class/net/eth0/statistics/rx_bytes").read())

job, rank, world, datapath, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
x = np.random.default_rng(rank).integers(-1000, 1000, world * 250_000).astype(np.int32)
out = {}
with Communicator(job, rank, world, datapath=datapath, mode=mode) as c:
    for name, fn in (("allreduce", lambda: c.allreduce(x)), ("reduce_scatter", lambda: c.reduce_scatter(x)),
                     ("reduce", lambda: c.reduce(x, root=1))):
        before = rx()
        got = fn()
        out[name] = [rx() - before, None if got is None else got.tolist()[:3]]
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode,datapath", [("modulo", "socket"), ("modulo", "xdp"), ("hash", "xdp")])
def test_the_switch_sends_each_rank_only_its_shard(root, mode, datapath):
    """reduce_scatter and reduce: the switch gives the lanes of a psn only to
    the ranks that need them (its shard's owner, the root); the others get a
    bare completion. In hash mode the switch keeps the workers' mask in the
    slot and applies it to the PS's result. Each host receives about 1/world of
    the allreduce's bytes for reduce_scatter, and only the root the full sum
    for reduce; the results are right (checked against numpy in comm_worker)."""
    import numpy as np

    world = 4
    with LabWithIncd("cs", workers=world, ps=mode == "hash") as lab:
        ps = PSProcess(lab, 7, world, datapath=datapath) if mode == "hash" else None
        try:
            procs = [lab.popen(f"h{r + 1}", [sys.executable, "-c", SHARDS, "7", str(r), str(world), datapath, mode],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
            outs = [p.communicate(timeout=180) for p in procs]
        finally:
            if ps:
                ps.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    reps = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    xs = [np.random.default_rng(r).integers(-1000, 1000, world * 250_000).astype(np.int32) for r in range(world)]
    total = np.sum(xs, axis=0)
    print(mode, datapath, "rx bytes per rank:", [{k: v[0] for k, v in rep.items()} for rep in reps])
    for r, rep in enumerate(reps):
        full = rep["allreduce"][0]
        assert rep["allreduce"][1] == total[:3].tolist()
        assert rep["reduce_scatter"][1] == total[r * 250_000:r * 250_000 + 3].tolist()
        assert rep["reduce_scatter"][0] < 0.4 * full, (r, rep)  # a quarter of the lanes, plus bare headers
        if r == 1:
            assert rep["reduce"][1] == total[:3].tolist() and rep["reduce"][0] > 0.8 * full
        else:
            assert rep["reduce"][1] is None and rep["reduce"][0] < 0.1 * full, (r, rep)


BCAST = """
import json, sys
import numpy as np
from hostagent import Communicator

def counter(name):
    return int(open(f"/sys/class/net/eth0/statistics/{name}").read())

job, rank, world, root = (int(a) for a in sys.argv[1:5])
datapath = sys.argv[5]
src = np.random.default_rng(11).integers(-2**31, 2**31, 600_000, dtype=np.int64).astype(np.int32)
with Communicator(job, rank, world, datapath=datapath) as c:
    x = src.copy() if rank == root else np.zeros_like(src)
    c.barrier()
    # counted from before a barrier: the root leaves it first and its data may arrive
    # before this rank has left it (the broadcast keeps such data)
    tx, rx = counter("tx_bytes"), counter("rx_bytes")
    c.barrier()
    y = c.broadcast(x, root=root)
    out = {"tx": counter("tx_bytes") - tx, "rx": counter("rx_bytes") - rx, "ok": bool(np.array_equal(y, src))}
    block = np.random.default_rng(rank).integers(-2**31, 2**31, 150_000, dtype=np.int64).astype(np.int32)
    c.barrier()
    tx, rx = counter("tx_bytes"), counter("rx_bytes")
    c.barrier()
    g = c.allgather(block)
    want = [np.random.default_rng(r).integers(-2**31, 2**31, 150_000, dtype=np.int64).astype(np.int32)
            for r in range(world)]
    out["allgather"] = {"tx": counter("tx_bytes") - tx, "rx": counter("rx_bytes") - rx,
                        "ok": bool(np.array_equal(g, np.stack(want)))}
print(json.dumps(out))
"""


@pytest.mark.parametrize("datapath", ["socket", "xdp"])
def test_broadcast_root_sends_once_and_the_switch_replicates(root, datapath):
    """Modulo mode: the root's host sends the vector once and receives only
    header-only completions; every other host receives it once and sends
    only header-only ACKs (instead of a vector of zeros each). An allgather is
    a broadcast per rank: each block crosses its rank's link once."""
    world, root_rank, nbytes = 4, 2, 600_000 * 4
    with LabWithIncd("cb", workers=world) as lab:
        procs = [lab.popen(f"h{r + 1}", [sys.executable, "-c", BCAST, "8", str(r), str(world), str(root_rank),
                                         datapath], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        outs = [p.communicate(timeout=180) for p in procs]
        fin = [j for j in lab.incd.status()["finished"] if j["job"] == 8][-1]["counters"]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    reps = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    print(datapath, "bytes per rank:", reps, "switch:", fin)
    assert all(r["ok"] for r in reps), reps
    for r, rep in enumerate(reps):
        # bounds leave room for resends when the RTO fires early on a loaded machine
        if r == root_rank:
            assert nbytes <= rep["tx"] < 1.5 * nbytes and rep["rx"] < 0.05 * nbytes, rep
        else:
            assert nbytes <= rep["rx"] < 1.5 * nbytes and rep["tx"] < 0.05 * nbytes, (r, rep)
        # allgather: each rank's 600 kB block leaves its host once (plus ACKs), the others' come
        # in; summing zero-padded vectors would send world x 600 kB from every host
        ag, blk = rep["allgather"], 150_000 * 4
        assert ag["ok"], (r, ag)
        assert blk <= ag["tx"] < 0.6 * world * blk and ag["rx"] >= (world - 1) * blk, (r, ag)
