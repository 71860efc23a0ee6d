"""allreduce over the switch for int32 and float32 vectors."""
from __future__ import annotations

import numpy as np

from bpf import wire

from . import quantize
from .transport import Session


# float32 vectors whose ranks' blocks together fit in this many packets take
# _small_f32_sum: for them the round trip, not the bytes, is the cost.
SMALL_PACKETS = 4


class AllreduceError(RuntimeError):
    pass


class VectorAllreduce:
    """allreduce (sum) of whole int32 or float32 vectors over one Session: fp32
    through shared-exponent quantization, int32 exactly (widened to int64 when
    the sum does not fit)."""

    def __init__(self, session: Session):
        self.s = session
        self.world = session.params.world
        self.block = session.params.elems  # one shared scale per packet
        self.widened = 0  # int32 allreduces whose sum did not fit and came back as int64

    def allreduce(self, x: np.ndarray, owners=None) -> np.ndarray:
        """owners(first, stop): the bitmap of ranks that need the sum of
        elements first..stop-1 (Session.select_masks); the others' copy of those
        elements is not valid. None: everyone needs everything."""
        x = np.asarray(x)
        E = self.block
        select = None if owners is None else self.s.select_masks(max(1, -(-x.size // E)), owners)
        if x.dtype == np.int32:
            out, overflow = self.s.reduce(x.ravel(), wire.OP_SUM, select)
            if overflow:  # every rank sees the same flag on the same results, so all take this path
                return self._wide_sum(x.ravel()).reshape(x.shape)
            return out.reshape(x.shape)
        if x.dtype == np.float32 and x.size * self.world <= SMALL_PACKETS * self.block:
            return self._small_f32_sum(x.ravel()).reshape(x.shape)
        if x.dtype == np.float32:
            e_local = quantize.block_exponents(x, self.block)
            e_max, _ = self.s.reduce(e_local, wire.OP_MAX)
            q = quantize.quantize(x, e_max, self.world, self.block)
            rows, overflow = self.s.reduce_rows(q, wire.OP_SUM, select)
            if overflow:  # impossible with agreed exponents; never hand back a wrong sum
                raise AllreduceError("quantized sum overflowed in the switch")
            return quantize.dequantize_rows(rows, e_max, self.world, x.size).reshape(x.shape)
        raise AllreduceError(f"dtype {x.dtype} not supported (float32 or int32)")

    def _small_f32_sum(self, v: np.ndarray) -> np.ndarray:
        """A short float32 vector goes as raw bits, each rank in its own block
        of a zeroed vector, and every rank adds up all of them in the same
        order: one round trip instead of the exponent round and the data round,
        and no quantization error."""
        if not np.all(np.isfinite(v)):  # as the quantized path: same answer at every size
            raise quantize.QuantizeError("input contains NaN or Inf; it cannot be quantized")
        rows = np.zeros((self.world, v.size), dtype=np.int32)
        rows[self.s.rank] = v.view(np.int32)
        got, _ = self.s.reduce(rows.ravel(), wire.OP_SUM)
        return got.reshape(self.world, -1).view(np.float32).sum(axis=0, dtype=np.float64).astype(np.float32)

    def _wide_sum(self, v: np.ndarray) -> np.ndarray:
        """The exact sum of int32 vectors whose total does not fit in int32: the
        low and high 16-bit halves are reduced on their own (each sum fits in
        int32 for up to 2^15 ranks) and put together in int64."""
        v64 = v.astype(np.int64)
        lo, o1 = self.s.reduce((v64 & 0xFFFF).astype(np.int32), wire.OP_SUM)
        hi, o2 = self.s.reduce((v64 >> 16).astype(np.int32), wire.OP_SUM)
        if o1 or o2:  # cannot happen with <= 64 ranks; never hand back a wrong sum
            raise AllreduceError("int32 halves overflowed in the switch")
        self.widened += 1
        return hi.astype(np.int64) * 65536 + lo.astype(np.int64)
