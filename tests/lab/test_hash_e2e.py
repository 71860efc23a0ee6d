"""Hash mode (ATP) and the PS baseline in the lab: a real PS process, the real
switch, several jobs at once sharing it."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.allreduce import allreduce_files, int_inputs
from netns_lab.harness import LabWithIncd, run_concurrently
from netns_lab.agents import PSProcess, run_allreduce


@pytest.fixture(scope="module")
def plab(root):
    with LabWithIncd("h", ps=True) as lab:
        yield lab


def finished(lab, job):
    return [j for j in lab.incd.status()["finished"] if j["job"] == job][-1]


def run_with_ps(lab, tmp_path, job, xs, mode="hash", hosts=None):
    ps = PSProcess(lab, job, len(xs), mode="hash" if mode == "hash" else "ps")
    try:
        outs, res = allreduce_files(lab, tmp_path, job, xs, extra=["--mode", mode], hosts=hosts)
        return outs, res, ps.result()
    finally:
        ps.kill()


def exact(xs):
    return np.sum(np.stack(xs).astype(np.int64), axis=0).astype(np.int32)


@pytest.mark.parametrize("mode", ["hash", "ps"])
def test_int32_exact(plab, tmp_path, mode):
    xs = int_inputs(4, 150001, seed=5)
    outs, res, ps = run_with_ps(plab, tmp_path, 40 if mode == "hash" else 41, xs, mode)
    for y in outs:
        assert np.array_equal(y, exact(xs))
    npk = -(-150001 // res[0]["elems_per_packet"])
    assert ps["results"] == npk
    if mode == "hash":
        c = finished(plab, 40)["counters"]
        # the switch did the work: most psns reached the PS as one complete aggregate,
        # and every complete aggregate's slot was released by the PS's result
        assert c["to_ps"] > npk // 2 and ps["aggregates"] >= c["to_ps"]
        assert c["releases"] == c["to_ps"]
        assert c["results_mcast"] >= 4 * npk
    else:
        assert ps["singles"] == 4 * npk and ps["aggregates"] == 0


def test_fp32_hash_verified(plab):
    ps = PSProcess(plab, 42, 4)
    try:
        res = run_allreduce(plab, job=42, world=4, numel=70001, dtype="float32", iters=2,
                            extra=["--mode", "hash", "--verify"])
        assert all(r["verified"] for r in res)
        ps.result()
    finally:
        ps.kill()


def exact_run(lab, tmp_path, job, mode, hosts, n):
    xs = int_inputs(len(hosts), n, seed=job)
    if mode == "modulo":
        outs, _ = allreduce_files(lab, tmp_path, job, xs, hosts=hosts)
        ps = None
    else:
        outs, _, ps = run_with_ps(lab, tmp_path, job, xs, hosts=hosts)
    return all(np.array_equal(y, exact(xs)) for y in outs), ps


def test_three_concurrent_jobs_mixed_modes(plab, tmp_path):
    """Different member sets at once: modulo on h1,h2; hash on h2,h3,h4; hash on h1,h3."""
    specs = {50: ("modulo", ["h1", "h2"]), 51: ("hash", ["h2", "h3", "h4"]), 52: ("hash", ["h1", "h3"])}
    res = run_concurrently({job: (lambda job=job, m=m, h=h: exact_run(plab, tmp_path, job, m, h, 90001 + job))
                            for job, (m, h) in specs.items()})
    assert {job: ok for job, (ok, _) in res.items()} == {50: True, 51: True, 52: True}
    st = plab.incd.status()
    assert not st["jobs"] and st["hash_region"] is None and st["free_slots"] == st["pool_slots"]


def test_tiny_pool_three_hash_jobs_collide_and_stay_exact(root, tmp_path):
    with LabWithIncd("t", ps=True, incd_args=["--pool-slots", "16", "--hash-slots", "8"]) as lab:
        specs = {60: ["h1", "h2", "h3"], 61: ["h2", "h4"], 62: ["h1", "h3", "h4"]}
        res = run_concurrently({job: (lambda job=job, h=h: exact_run(lab, tmp_path, job, "hash", h, 60001))
                                for job, h in specs.items()})
        assert {job: ok for job, (ok, _) in res.items()} == {60: True, 61: True, 62: True}
        st = lab.incd.status()
        counters = {j: finished(lab, j)["counters"] for j in specs}
        assert sum(c["collisions"] for c in counters.values()) > 100
        assert sum(ps["collisions"] for _, ps in res.values()) > 100
        # nothing is left held once the jobs are over
        assert not st["jobs"] and st["hash_region"] is None and st["held_slots"] == 0
        assert st["free_slots"] == st["pool_slots"] == 16


@pytest.mark.parametrize("impair", [{"loss_pct": 2.0}], ids=["loss2pct"])
def test_hash_exact_under_loss(root, tmp_path, impair):
    with LabWithIncd("l", ps=True, **impair) as lab:
        xs = int_inputs(4, 120001, seed=9)
        outs, res, ps = run_with_ps(lab, tmp_path, 70, xs)
        for y in outs:
            assert np.array_equal(y, exact(xs))
        assert sum(r["retransmits"] for r in res) > 0
        assert ps["results_resent"] + ps["singles"] > 0  # losses were repaired through the PS
