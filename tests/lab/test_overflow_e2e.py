"""int32 overflow in the switch: flagged on the results, and every rank
recovers the exact sum (as int64) instead of handing back a wrapped one."""
from __future__ import annotations

import numpy as np
import pytest

from netns_lab.agents import PSProcess, run_allreduce
from netns_lab.harness import LabWithIncd


@pytest.fixture(scope="module")
def lab(root):
    with LabWithIncd("ov", workers=4, ps=True) as lab:
        yield lab


def run_files(lab, tmp_path, job, xs, mode):
    per_rank = {}
    for r, x in enumerate(xs):
        np.save(tmp_path / f"in{job}_{r}.npy", x)
        per_rank[r] = ["--in", str(tmp_path / f"in{job}_{r}.npy"), "--out", str(tmp_path / f"out{job}_{r}.npy")]
    ps = PSProcess(lab, job, len(xs), mode=mode) if mode != "modulo" else None
    try:
        res = run_allreduce(lab, job=job, world=len(xs), per_rank=per_rank, extra=["--mode", mode], timeout=120)
    except BaseException:
        if ps is not None:
            ps.kill()
        raise
    if ps is not None:
        ps.result()
    return [np.load(tmp_path / f"out{job}_{r}.npy") for r in range(len(xs))], res


@pytest.mark.parametrize("mode", ["modulo", "hash", "ps"])
def test_overflowing_int32_sum_comes_back_exact(lab, tmp_path, mode):
    rng = np.random.default_rng(7)
    n = 2001  # three packets, the last one short
    xs = [rng.integers(2**29, 2**31 - 1, n, dtype=np.int32) for _ in range(4)]
    xs[1][::3] = -(2**31)  # and large negative lanes
    xs[3][::5] = -(2**31)
    outs, res = run_files(lab, tmp_path, 40 + len(mode), xs, mode)
    expect = np.sum(np.stack(xs).astype(np.int64), axis=0)
    assert (expect > 2**31 - 1).any() and (expect < -(2**31)).any()  # the inputs do overflow
    for y in outs:
        assert y.dtype == np.int64 and np.array_equal(y, expect)
    assert all(r["widened_to_int64"] == 1 for r in res)


def test_fitting_int32_sum_stays_int32(lab, tmp_path):
    xs = [np.full(900, 2**29, dtype=np.int32), np.full(900, 2**29, dtype=np.int32)]
    outs, res = run_files(lab, tmp_path, 50, xs, "modulo")
    for y in outs:
        assert y.dtype == np.int32 and (y == 2**30).all()
    assert all(r["widened_to_int64"] == 0 for r in res)
