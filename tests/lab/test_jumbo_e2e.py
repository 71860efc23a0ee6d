"""Jumbo frames end to end (inc-agent --frame jumbo, bpf/mode_jumbo.h): real
namespaces at MTU 65535, incd, agents on the XDP path. Results exact (int32)
and within the stated bound (fp32), clean and under loss, duplication,
corruption and reordering; the switch's counters show a jumbo frame per 20
psns and results passed along the chain instead of broadcast; bad set-ups
refused with a reason; an int32 sum that overflows comes back exact; incd
killed mid-job and restarted, the job finishes exactly."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from bpf import wire
from helpers.agents import Agent, assert_reclaimed
from helpers.allreduce import allreduce_files
from helpers.polling import wait_rejoined, wait_running
from incd import daemon
from netns_lab import impair
from netns_lab.agents import AgentRunError, run_allreduce
from netns_lab.harness import LabWithIncd
from netns_lab.plan import MTU_JUMBO

WORLD = 4
JUMBO = ["--datapath", "xdp", "--frame", "jumbo", "--window", "160"]


def finished(lab, job):
    return [j for j in lab.incd.status()["finished"] if j["job"] == job][-1]


@pytest.fixture(scope="module")
def jlab(root):
    with LabWithIncd("jb", workers=WORLD, mtu=MTU_JUMBO) as lab:
        yield lab


def test_jumbo_allreduce_is_exact_and_its_results_travel_the_chain(jlab):
    n = 3 * wire.JUMBO_ELEMS + 777  # three full frames and a short one
    res = run_allreduce(jlab, job=3, world=WORLD, numel=n, dtype="int32", iters=3,
                        extra=["--verify", *JUMBO], timeout=120)
    assert all(r["verified"] and r["frame"] == "jumbo" and r["datapath"] == "xdp" for r in res), res
    assert all(r["packets_per_iter"] == 4 for r in res), res  # 4 frames, not 62 packets
    j = finished(jlab, 3)
    c = j["counters"]
    frames = 4 * 3  # per rank: 4 frames x 3 iterations
    # Each frame's result went to rank 0 and along the chain to ranks 1..3;
    # nothing was cloned by the devmap broadcast.
    assert c["results_mcast"] == 0, c
    assert c["chained"] >= frames * (WORLD - 1), c
    assert c["slots_completed"] >= frames * wire.JUMBO_SUBS - 3 * 19, c  # the short frame takes 1 slot
    assert c["consumed"] >= WORLD * frames, c
    assert j["frame"] == "jumbo"
    # fp32 through the same frames: within the quantization bound (--verify)
    res = run_allreduce(jlab, job=4, world=WORLD, numel=2 * wire.JUMBO_ELEMS, dtype="float32", iters=2,
                        extra=["--verify", *JUMBO], timeout=120)
    assert all(r["verified"] and r["frame"] == "jumbo" for r in res), res


def test_an_overflowing_int32_sum_comes_back_exact(jlab, tmp_path):
    """The jumbo result's overflow flag: every rank redoes the sum in halves
    (themselves jumbo frames) and returns int64."""
    rng = np.random.default_rng(9)
    n = 2 * wire.JUMBO_ELEMS + 123
    xs = [rng.integers(2**29, 2**31 - 1, n, dtype=np.int32) for _ in range(WORLD)]
    xs[1][::3] = -(2**31)  # and large negative lanes
    xs[3][::5] = -(2**31)
    outs, res = allreduce_files(jlab, tmp_path, 9, xs, extra=JUMBO)
    expect = np.sum(np.stack(xs).astype(np.int64), axis=0)
    assert (expect > 2**31 - 1).any() and (expect < -(2**31)).any()
    assert all(y.dtype == np.int64 and np.array_equal(y, expect) for y in outs)
    assert all(r["widened_to_int64"] == 1 and r["frame"] == "jumbo" for r in res), res


def test_killed_incd_is_restarted_and_the_jumbo_job_finishes(jlab):
    """The switch keeps aggregating jumbo frames while incd is down (pinned maps
    and programs); the restarted incd takes the job back, frame included."""
    job, iters = 10, 3000
    ws = [Agent(jlab, f"h{r + 1}", "allreduce", "--job", str(job), "--rank", str(r), "--world", str(WORLD),
                "--numel", str(25 * wire.JUMBO_ELEMS), "--dtype", "int32", "--iters", str(iters), "--verify",
                "--json", *JUMBO) for r in range(WORLD)]
    try:
        before = wait_running(jlab, job, ws, completed=5000)
        jlab.incd.kill()
        assert daemon.recoverable(jlab.incd.instance)
        jlab.incd.start()
        after = wait_rejoined(jlab, job, ws)
        assert (after["offset"], after["slots"], after["gen"], after["frame"]) == \
            (before["offset"], before["slots"], before["gen"], "jumbo")
        assert all(a.proc.poll() is None for a in ws), "the job ended before incd was back; raise iters"
        res = []
        for a in ws:
            out, _ = a.proc.communicate(timeout=240)
            assert a.proc.returncode == 0, a.stderr()[-800:]
            res.append(json.loads(out.strip().splitlines()[-1]))
        assert all(r["verified"] and r["rejoins"] == 1 and r["frame"] == "jumbo" for r in res), res
        rec = assert_reclaimed(jlab, job)
        assert rec["counters"]["slots_completed"] == iters * 25 * wire.JUMBO_SUBS
    finally:
        for a in ws:
            a.kill()


def test_a_jumbo_job_resized_live_stays_exact_and_keeps_a_frames_window(root):
    """EDF shrinks a running jumbo job for a deadline job and grows it back:
    every iteration exact, and the region never below two frames' slots."""
    with LabWithIncd("jm", workers=WORLD, mtu=MTU_JUMBO,
                     incd_args=["--pool-slots", "160", "--policy", "edf"]) as lab:
        big = [Agent(lab, f"h{r + 1}", "allreduce", "--job", "3", "--rank", str(r), "--world", "2",
                     "--numel", str(13 * wire.JUMBO_ELEMS), "--dtype", "int32", "--iters", "400", "--verify",
                     "--json", "--quiet", "--datapath", "xdp", "--frame", "jumbo", "--window", "80")
               for r in range(2)]
        try:
            deadline = time.time() + 60
            while not any(j["job"] == 3 and j["slots"] == 160 for j in lab.incd.status()["jobs"]):
                assert time.time() < deadline and all(a.proc.poll() is None for a in big), \
                    [a.stderr()[-300:] for a in big]
                time.sleep(0.1)
            res = run_allreduce(lab, job=4, world=2, numel=200000, dtype="int32", iters=30,
                                extra=["--verify", "--window", "32", "--deadline", "30", "--model-bytes", "50000000",
                                       "--epochs", "5", "--compute-s", "0.1"], hosts=["h3", "h4"], timeout=120)
            assert all(r["verified"] for r in res)
            live = [j for j in lab.incd.status()["jobs"] if j["job"] == 3]
            assert live and live[0]["resizes"] >= 1, "the jumbo job should have been shrunk, and still run"
            assert live[0]["slots"] >= 2 * wire.JUMBO_SUBS
            outs = []
            for a in big:
                out, _ = a.proc.communicate(timeout=180)
                assert a.proc.returncode == 0, a.stderr()[-800:]
                outs.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for a in big:
                a.kill()
        assert all(o["verified"] and o["resizes"] >= 1 and o["frame"] == "jumbo" for o in outs), outs


def test_jumbo_allreduce_stays_exact_under_faults(root):
    """Loss, duplication, corruption and reordering at once on every link. They
    hit the frames on their way up (the results travel from XDP program to XDP
    program and pass no tc; what the programs do with damaged frames is tested
    under BPF_PROG_TEST_RUN, test_jumbo.py and test_host_rx_jumbo.py)."""
    faults = {"loss_pct": 3.0, "dup_pct": 3.0, "corrupt_pct": 3.0, "reorder_pct": 10.0}
    with LabWithIncd("jf", workers=WORLD, mtu=MTU_JUMBO, **faults) as lab:
        res = run_allreduce(lab, job=5, world=WORLD, numel=40 * wire.JUMBO_ELEMS, dtype="int32", iters=4,
                            extra=["--verify", "--seed", "5", *JUMBO], timeout=150)
        assert all(r["verified"] and r["frame"] == "jumbo" for r in res), res
        c = finished(lab, 5)["counters"]
        hit = {k: sum(v[d][k] for v in impair.read_counters(lab.state).values() for d in v)
               for k in impair.COUNTERS}
        print("impair", hit, "switch", c, "retx", [r["retransmits"] for r in res])
        assert hit["lost"] > 0 and hit["dup"] > 0 and hit["corrupt"] > 0 and hit["reorder"] > 0, hit
        assert sum(r["retransmits"] for r in res) > 0
        assert c["drops"]["bad_csum"] > 0 and c["drops"]["dup"] > 0, c  # damaged and repeated frames seen


def test_jumbo_set_ups_that_cannot_work_are_refused_with_the_reason(root):
    with LabWithIncd("jr", workers=2) as lab:  # the default MTU
        with pytest.raises(AgentRunError, match=f"MTU.*{wire.JUMBO_IP_BYTES}|{wire.JUMBO_IP_BYTES}.*MTU"):
            run_allreduce(lab, job=6, world=2, numel=100, dtype="int32", extra=JUMBO, timeout=60)
        with pytest.raises(AgentRunError, match="--frame jumbo needs modulo mode and the XDP data path"):
            run_allreduce(lab, job=7, world=1, numel=100, dtype="int32",
                          extra=["--frame", "jumbo", "--datapath", "socket"], timeout=60)
    with LabWithIncd("jr", workers=2, mtu=MTU_JUMBO) as lab:
        # Ranks that disagree: the second is told which field differs.
        with pytest.raises(AgentRunError, match="frame"):
            run_allreduce(lab, job=8, world=2, numel=100, dtype="int32", extra=["--datapath", "xdp"],
                          per_rank={1: ["--frame", "jumbo"]}, timeout=60)
