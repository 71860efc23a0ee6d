"""Allreduce runs the way a user checks them: inputs from .npy files, results read back."""
from __future__ import annotations

import numpy as np

from netns_lab.agents import run_allreduce


def allreduce_files(lab, tmp_path, job, xs, extra=(), hosts=None):
    """Each rank's input from its own .npy; returns the outputs read back and the JSON results."""
    per_rank = {}
    for r, x in enumerate(xs):
        np.save(tmp_path / f"in{job}_{r}.npy", x)
        per_rank[r] = ["--in", str(tmp_path / f"in{job}_{r}.npy"), "--out", str(tmp_path / f"out{job}_{r}.npy")]
    res = run_allreduce(lab, job=job, world=len(xs), per_rank=per_rank, extra=list(extra), timeout=120,
                        hosts=hosts)
    return [np.load(tmp_path / f"out{job}_{r}.npy") for r in range(len(xs))], res


def int_inputs(world, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(-2**28, 2**28, n, dtype=np.int32) for _ in range(world)]
