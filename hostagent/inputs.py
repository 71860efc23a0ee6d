"""Seeded inputs, so that any rank can recompute every rank's vector and check the sum."""
from __future__ import annotations

import numpy as np

from . import quantize

INT_RANGE = 1 << 20  # |x| < 2^20: a sum over 64 ranks stays far from int32 limits


def make_input(seed: int, rank: int, numel: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng([seed, rank])
    if dtype == "int32":
        return rng.integers(-INT_RANGE, INT_RANGE, numel, dtype=np.int32)
    if dtype == "float32":
        return rng.standard_normal(numel).astype(np.float32)
    raise ValueError(f"dtype {dtype} not supported")


def shifted(x: np.ndarray, it: int) -> np.ndarray:
    """Iteration it's input of a --verify run: x + it (x itself for it 0)."""
    return x if it == 0 else x + np.asarray(it, dtype=x.dtype)


def check_sum(result: np.ndarray, inputs: list[np.ndarray], block: int) -> tuple[bool, float]:
    """(ok, max abs error). int32: bit exact. float32: within the quantization bound
    plus the final float32 rounding."""
    if result.dtype.kind == "i":  # int32, or int64 when the sum needed more bits
        expect = np.sum(np.stack([x.astype(np.int64) for x in inputs]), axis=0)
        err = np.abs(result.astype(np.int64) - expect)
        return bool(np.all(err == 0)), float(err.max(initial=0))
    world = len(inputs)
    exact = np.sum(np.stack([x.astype(np.float64) for x in inputs]), axis=0)
    e_max = np.max(np.stack([quantize.block_exponents(x, block) for x in inputs]), axis=0)
    bound = quantize.error_bound(e_max, world, block, exact.size) + np.abs(exact) * 2.0**-23 + 1e-30
    err = np.abs(result.astype(np.float64) - exact)
    return bool(np.all(err <= bound)), float(err.max(initial=0))
