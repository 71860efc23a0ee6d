"""fp32 <-> int32 with a scale shared by all workers per block (SwitchML).

Each worker finds the exponent of its block's largest magnitude; the workers
agree on the block maximum of those exponents (a MAX reduction through the
switch), and all quantize the block with scale = 2^(30 - ceil(log2 N) - e_max).
Then every |q| <= 2^30 / N and the int32 sum of N of them cannot overflow. The
error of one summed element is at most N * 0.5 / scale.

The scale is a power of two, so scaling is exact in float32 (np.ldexp) and the
work stays in float32, block by block through a 2-D view: no float64
temporaries and no per-element scale array. Quantizing goes a chunk of blocks
at a time, so that its passes (scale, round, range check, cast) find the chunk
in cache instead of streaming the whole vector from memory four times.
"""
from __future__ import annotations

import math

import numpy as np

# Exponent reported for an all-zero block: below any finite float32 (2^-149).
ZERO_EXP = -160
CHUNK_BLOCKS = 1024  # blocks quantized at a time (3.2 MB of float32 at 800 a block)


class QuantizeError(ValueError):
    pass


def _blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(full blocks as a 2-D view, the partial last block as 1-D)."""
    full = x.size - x.size % block
    return x[:full].reshape(-1, block), x[full:]


def block_exponents(x: np.ndarray, block: int) -> np.ndarray:
    """Per block of `block` elements, e with max|x| < 2^e (frexp convention)."""
    x = np.asarray(x, dtype=np.float32).ravel()
    body, tail = _blocks(x, block)
    hi = body.max(axis=1, initial=-np.inf)
    lo = body.min(axis=1, initial=np.inf)
    if tail.size or not x.size:
        hi = np.append(hi, tail.max(initial=0.0))
        lo = np.append(lo, tail.min(initial=0.0))
    m = np.maximum(hi, -lo)  # NaN anywhere in a block makes its max or min NaN
    if not np.all(np.isfinite(m)):
        raise QuantizeError("input contains NaN or Inf; it cannot be quantized")
    _, e = np.frexp(m)
    return np.where(m > 0, e, ZERO_EXP).astype(np.int32)


def headroom_bits(world: int) -> int:
    return max(0, math.ceil(math.log2(world))) if world > 1 else 0


def scale_exponents(e_max: np.ndarray, world: int) -> np.ndarray:
    """log2 of each block's scale."""
    return (30 - headroom_bits(world) - np.asarray(e_max, dtype=np.int32)).astype(np.int32)


def block_scales(e_max: np.ndarray, world: int) -> np.ndarray:
    """float64 scale per block; exact powers of two."""
    return np.ldexp(1.0, scale_exponents(e_max, world))


def _ldexp_blocks(x: np.ndarray, k: np.ndarray, block: int, out: np.ndarray) -> None:
    body, tail = _blocks(x, block)
    obody, otail = _blocks(out, block)
    np.ldexp(body, k[: body.shape[0], None], out=obody)
    if tail.size:
        np.ldexp(tail, k[body.shape[0]], out=otail)


def quantize(x: np.ndarray, e_max: np.ndarray, world: int, block: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).ravel()
    k = scale_exponents(e_max, world)
    q = np.empty(x.size, dtype=np.int32)
    limit = np.float32(2.0 ** (30 - headroom_bits(world)))
    step = block * CHUNK_BLOCKS
    f = np.empty(min(step, x.size), dtype=np.float32)
    for at in range(0, x.size, step):
        xs = x[at:at + step]
        fs = f[:xs.size]
        _ldexp_blocks(xs, k[at // block:], block, fs)
        np.rint(fs, out=fs)
        if fs.max() > limit or fs.min() < -limit:
            # Only possible if e_max is not the max over all workers' exponents.
            raise QuantizeError("value exceeds the shared exponent; workers disagree on the scale")
        np.copyto(q[at:at + xs.size], fs, casting="unsafe")
    return q


def dequantize(q: np.ndarray, e_max: np.ndarray, world: int, block: int) -> np.ndarray:
    """The float32 nearest each q / scale (q is rounded to float32 once; the
    power-of-two scaling is exact except for subnormal results)."""
    q = np.asarray(q, dtype=np.int32).ravel()
    out = q.astype(np.float32)
    _ldexp_blocks(out, -scale_exponents(e_max, world), block, out)
    return out


def dequantize_rows(pieces: list[np.ndarray], e_max: np.ndarray, world: int, n: int) -> np.ndarray:
    """dequantize() of a sum that arrived as rows of one block each (Session.
    reduce_rows), converted where it lies: one pass, no copy of the int32 sum."""
    k = -scale_exponents(e_max, world)
    out = np.empty(sum(p.shape[0] * p.shape[1] for p in pieces), dtype=np.float32)
    at = blk = 0
    for p in pieces:
        width = p.shape[1]
        for c in range(0, p.shape[0], CHUNK_BLOCKS):  # cast and scale while the chunk is in cache
            part = p[c:c + CHUNK_BLOCKS]
            rows = part.shape[0]
            o = out[at:at + rows * width].reshape(rows, width)
            np.copyto(o, part, casting="unsafe")  # int32 -> float32, rounded once
            np.ldexp(o, k[blk:blk + rows, None], out=o)
            at, blk = at + rows * width, blk + rows
    return out[:n]


def error_bound(e_max: np.ndarray, world: int, block: int, numel: int) -> np.ndarray:
    """Largest possible |result - exact sum| per element (before the fp32 cast)."""
    scale = np.repeat(block_scales(e_max, world), block)[:numel]
    return world * 0.5 / scale
