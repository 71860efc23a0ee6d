"""The Python API: one job's collectives over the switch, on numpy arrays and
CPU torch tensors.

    from hostagent import Communicator
    with Communicator(job=7, rank=r, world=4, switch="10.0.0.254") as c:
        y = c.allreduce(x)            # numpy: a new array; torch: in place

Every collective rides on the switch's aggregation of int32 lanes:
- sums: int32 exactly, float32 by shared-exponent quantization (quantize.py),
  float16 and bfloat16 through float32;
- max and min: int32 by the switch's max (min as ~max(~x)); floats through an
  order-preserving int32 key of their bits, so both are exact;
- broadcast, allgather, scatter, alltoall: the bytes of any dtype as int32
  lanes, summed with zeros from the ranks that do not own them: exact.
Every rank calls the same collectives in the same order with the same sizes.
Errors are CommError with the messages the CLI prints.
"""
from __future__ import annotations

import os

import numpy as np

from bpf import wire

from .collective import AllreduceError, VectorAllreduce
from .incd_link import TransportError
from .quantize import QuantizeError
from .transport import Session

OPS = ("sum", "avg", "max", "min")
_FLOAT_VIA_F32 = ("float16", "bfloat16")  # reduced as float32, cast back


class CommError(RuntimeError):
    pass


def _setting(value, env: str, what: str, required: bool = True):
    if value is None:
        value = os.environ.get(env)
        if value is None:
            if required:
                raise CommError(f"no {what}: pass it or set {env}")
            return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CommError(f"{what} must be an integer, got {value!r}") from None


class _Arg:
    """A caller's array as numpy, and how to hand a result back to it."""

    def __init__(self, x):
        self.tensor = None
        if type(x).__module__.startswith("torch"):
            if x.device.type != "cpu":
                raise CommError(f"tensors must be on the CPU, not {x.device}")
            self.tensor = x
            self.dtype = str(x.dtype).replace("torch.", "")
            t = x.detach()
            self.a = (t.float() if self.dtype == "bfloat16" else t).contiguous().numpy()
        else:
            self.a = np.asarray(x)
            self.dtype = str(self.a.dtype)
        self.shape = tuple(self.a.shape)

    def reducible(self) -> np.ndarray:
        """The values as float32 or int32, flat."""
        if self.dtype in ("float32", "int32"):
            return np.ascontiguousarray(self.a).ravel()
        if self.dtype in _FLOAT_VIA_F32:
            return self.a.astype(np.float32).ravel()
        raise CommError(f"cannot reduce {self.dtype}: float32, int32, float16 or bfloat16")

    def new(self, a: np.ndarray):
        """a (numpy, in the reduced dtype) as what the caller passed in."""
        if self.tensor is None:
            return a.astype(self.dtype, copy=False) if self.dtype in _FLOAT_VIA_F32 else a
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(getattr(torch, self.dtype)) if self.dtype != str(a.dtype) else t

    def inplace(self, a: np.ndarray):
        """Numpy: the result as a new array; torch: copied into the tensor."""
        if self.tensor is None:
            return self.new(a).reshape(self.shape)
        import torch

        if a.dtype == np.int64 and self.dtype == "int32":
            raise CommError("the int32 sum does not fit in int32 (numpy callers get it as int64)")
        self.tensor.copy_(torch.from_numpy(np.ascontiguousarray(a)).reshape(self.shape))
        return self.tensor


def _bits(a: np.ndarray) -> np.ndarray:
    """The bytes of a as int32 lanes, zero-padded to a whole lane."""
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    out = np.zeros(-(-raw.size // 4), dtype=np.int32)
    out.view(np.uint8)[:raw.size] = raw
    return out


def _unbits(lanes: np.ndarray, dtype: np.dtype, shape: tuple) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return np.ascontiguousarray(lanes).view(np.uint8)[:n].view(dtype).reshape(shape).copy()


def _order_key(f: np.ndarray) -> np.ndarray:
    """float32 -> int32 with the same order (and back: the map is its own inverse)."""
    i = np.ascontiguousarray(f).view(np.int32)
    return i ^ ((i >> 31) & np.int32(0x7FFFFFFF))


class Communicator:
    """One rank of one job. job, rank, world and switch default to the
    environment: INC_JOB, RANK, WORLD_SIZE, INC_SWITCH (else the default
    gateway). Registering blocks until every rank of the job is there."""

    def __init__(self, job: int | None = None, rank: int | None = None, world: int | None = None,
                 switch: str | None = None, *, mode: str = "modulo", datapath: str = "auto", window: int = 64,
                 timeout: float = 10.0, fail_timeout: float = 2.0, register_timeout: float = 30.0,
                 frame: str = "std"):
        self.job = _setting(job, "INC_JOB", "job id")
        self.rank = _setting(rank, "RANK", "rank")
        self.world = _setting(world, "WORLD_SIZE", "world size")
        if not 0 <= self.rank < self.world:
            raise CommError(f"rank {self.rank} is not in 0..{self.world - 1}")
        switch = switch or os.environ.get("INC_SWITCH") or None
        try:
            self.s = Session(self.job, self.rank, self.world, window=window, switch=switch,
                             register_timeout=register_timeout, progress_timeout=timeout, mode=mode,
                             fail_timeout=fail_timeout, datapath=datapath, frame=frame)
        except TransportError as e:
            raise CommError(str(e)) from None
        self.datapath = self.s.datapath
        self._sum = VectorAllreduce(self.s)

    # --- plumbing -----------------------------------------------------------
    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (TransportError, AllreduceError, QuantizeError) as e:
            raise CommError(str(e)) from None

    def _raw(self, lanes: np.ndarray, op: int, owners=None) -> np.ndarray:
        select = None if owners is None else self.s.select_masks(
            max(1, -(-lanes.size // self.s.params.elems)), owners)
        out, _ = self._call(self.s.reduce, lanes, op, select)
        return out

    def _reduce(self, v: np.ndarray, op: str, owners=None) -> np.ndarray:
        """op over the ranks of a flat float32 or int32 vector. owners(first,
        stop): the bitmap of the ranks that need elements first..stop-1 of the
        result (the switch withholds the rest's lanes, modulo mode); None: all."""
        if op not in OPS:
            raise CommError(f"op must be one of {', '.join(OPS)}, not {op!r}")
        if not v.size:
            return v.copy()
        if op in ("sum", "avg"):
            if op == "avg" and v.dtype != np.float32:
                raise CommError(f"avg needs a floating-point dtype, not {v.dtype}")
            out = self._call(self._sum.allreduce, v, owners)
            return out / np.float32(self.world) if op == "avg" else out
        flip = v.dtype == np.float32
        keys = _order_key(v) if flip else v
        if op == "min":
            keys = ~keys
        m = self._raw(keys, wire.OP_MAX, owners)
        if op == "min":
            m = ~m
        return _order_key(m).view(np.float32) if flip else m

    def _share(self, lanes: np.ndarray, root: int) -> np.ndarray:
        """Everyone gets root's `lanes`: sent once by the root and replicated by
        the switch in modulo mode (Session.broadcast), else summed with the
        others' zeros (hash and ps mode)."""
        mine = self.rank == root
        if not lanes.size:
            return lanes.copy()
        if self.s.bcast_capable():
            return self._call(self.s.broadcast, lanes if mine else None, lanes.size, root)
        return self._raw(lanes if mine else np.zeros_like(lanes), wire.OP_SUM)

    # --- collectives ----------------------------------------------------------
    def allreduce(self, x, op: str = "sum"):
        a = _Arg(x)
        return a.inplace(self._reduce(a.reducible(), op))

    def reduce(self, x, root: int = 0, op: str = "sum"):
        """The result on root (torch: in place there); None on the others."""
        self._check_root(root)
        a = _Arg(x)
        out = self._reduce(a.reducible(), op, owners=lambda first, stop: 1 << root)
        return a.inplace(out) if self.rank == root else None

    def broadcast(self, x, root: int = 0):
        self._check_root(root)
        a = _Arg(x)
        got = _unbits(self._share(_bits(a.a), root), a.a.dtype, a.shape)
        return a.inplace(got)

    def allgather(self, x):
        """Shape (world,) + x.shape: row r is rank r's x."""
        a = _Arg(x)
        mine = _bits(a.a)
        if self.s.bcast_capable() and mine.size:  # each block sent once, by its rank, replicated by the switch
            got = [self._share(mine if r == self.rank else np.zeros_like(mine), r) for r in range(self.world)]
        else:
            rows = np.zeros((self.world, mine.size), dtype=np.int32)
            rows[self.rank] = mine
            got = self._raw(rows.ravel(), wire.OP_SUM).reshape(self.world, -1)
        return a.new(np.stack([_unbits(r, a.a.dtype, a.shape) for r in got]))

    def reduce_scatter(self, x, op: str = "sum"):
        """x.shape[0] divisible by world; this rank's shard of the reduced x."""
        a = _Arg(x)
        n = self._rows_per_rank(a.shape, "reduce_scatter")
        shard = a.a.size // self.world  # elements of each rank's share, in order

        def owners(first: int, stop: int) -> int:
            lo, hi = first // shard, min(self.world - 1, (stop - 1) // shard)
            return sum(1 << r for r in range(lo, hi + 1))

        out = self._reduce(a.reducible(), op, owners if shard else None).reshape(a.shape)
        return a.new(out[self.rank * n:(self.rank + 1) * n].copy())

    def scatter(self, x, root: int = 0):
        """x of shape (world, ...) on root (the others pass the same shape and
        dtype); returns x[rank] of root's."""
        self._check_root(root)
        a = _Arg(x)
        self._rows_per_rank(a.shape, "scatter", exact=True)
        got = _unbits(self._share(_bits(a.a), root), a.a.dtype, a.shape)
        return a.new(got[self.rank].copy())

    def alltoall(self, x):
        """x of shape (world, ...); out[j] is rank j's x[rank]."""
        a = _Arg(x)
        self._rows_per_rank(a.shape, "alltoall", exact=True)
        g = self.allgather(a.a)  # (world, world, ...)
        return a.new(np.ascontiguousarray(g[:, self.rank]))

    def barrier(self) -> None:
        self._raw(np.zeros(1, dtype=np.int32), wire.OP_SUM)

    # --- checks and lifetime ----------------------------------------------------
    def _check_root(self, root: int) -> None:
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.world:
            raise CommError(f"root {root!r} is not a rank of this job (0..{self.world - 1})")

    def _rows_per_rank(self, shape: tuple, what: str, exact: bool = False) -> int:
        if not shape or shape[0] % self.world or (exact and shape[0] != self.world):
            want = f"{self.world}" if exact else f"a multiple of {self.world}"
            raise CommError(f"{what}: the first dimension must be {want}, got shape {shape}")
        return shape[0] // self.world

    def close(self) -> None:
        """Leaves the job (the other ranks are not told it crashed)."""
        s = getattr(self, "s", None)
        if s is not None:
            try:
                s.done()
            except Exception:
                pass
            s.close()
            self.s = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # leaving on an error: close without telling incd we finished normally
            s, self.s = self.s, None
            if s is not None:
                s.close()
