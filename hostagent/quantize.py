"""fp32 <-> int32 with a scale shared by all workers per block (SwitchML).

Each worker finds the exponent of its block's largest magnitude; the workers
agree on the block maximum of those exponents (a MAX reduction through the
switch), and all quantize the block with scale = 2^(30 - ceil(log2 N) - e_max).
Then every |q| <= 2^30 / N and the int32 sum of N of them cannot overflow. The
error of one summed element is at most N * 0.5 / scale.
"""
from __future__ import annotations

import math

import numpy as np

# Exponent reported for an all-zero block: below any finite float32 (2^-149).
ZERO_EXP = -160


class QuantizeError(ValueError):
    pass


def block_exponents(x: np.ndarray, block: int) -> np.ndarray:
    """Per block of `block` elements, e with max|x| < 2^e (frexp convention)."""
    x = np.asarray(x, dtype=np.float32).ravel()
    if not np.all(np.isfinite(x)):
        raise QuantizeError("input contains NaN or Inf; it cannot be quantized")
    nblk = max(1, -(-x.size // block))
    padded = np.zeros(nblk * block, dtype=np.float32)
    padded[: x.size] = np.abs(x)
    m = padded.reshape(nblk, block).max(axis=1)
    _, e = np.frexp(m)
    return np.where(m > 0, e, ZERO_EXP).astype(np.int32)


def headroom_bits(world: int) -> int:
    return max(0, math.ceil(math.log2(world))) if world > 1 else 0


def block_scales(e_max: np.ndarray, world: int) -> np.ndarray:
    """float64 scale per block; exact powers of two."""
    return np.ldexp(1.0, (30 - headroom_bits(world) - e_max.astype(np.int64)).astype(np.int32))


def quantize(x: np.ndarray, e_max: np.ndarray, world: int, block: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).ravel()
    scale = np.repeat(block_scales(e_max, world), block)[: x.size]
    q = np.rint(x.astype(np.float64) * scale)
    limit = 2.0 ** (30 - headroom_bits(world))
    if np.any(np.abs(q) > limit):
        # Only possible if e_max is not the max over all workers' exponents.
        raise QuantizeError("value exceeds the shared exponent; workers disagree on the scale")
    return q.astype(np.int32)


def dequantize(q: np.ndarray, e_max: np.ndarray, world: int, block: int) -> np.ndarray:
    q = np.asarray(q, dtype=np.int32).ravel()
    scale = np.repeat(block_scales(e_max, world), block)[: q.size]
    return (q.astype(np.float64) / scale).astype(np.float32)


def error_bound(e_max: np.ndarray, world: int, block: int, numel: int) -> np.ndarray:
    """Largest possible |result - exact sum| per element (before the fp32 cast)."""
    scale = np.repeat(block_scales(e_max, world), block)[:numel]
    return world * 0.5 / scale
