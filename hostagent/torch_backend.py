"""torch.distributed over the switch: backend "inc", and a DDP comm hook.

    import hostagent.torch_backend                # registers "inc" (CPU tensors)
    dist.init_process_group("inc", rank=r, world_size=n)   # usual rendezvous: env:// or tcp://
    model = DistributedDataParallel(model)        # unchanged

or keep Gloo (or anything) as the process group and send only the gradient
buckets through the switch:

    comm = Communicator(job=7, rank=r, world=n)
    register_inc_hook(ddp_model, comm)            # buckets averaged: sum / world

The process group is a Python ProcessGroup (what c10d's PyProcessGroup
trampoline dispatches to, also from C++: DDP's reducer, parameter broadcast
and shape check). Every collective runs on ONE worker thread in the order it
was issued, because a Communicator is not thread-safe and every rank must
issue the same collectives in the same order; each returns a Work whose
wait() and get_future() complete when the worker is done. A communication
error (a member died, incd gone, timeout) fails that Work with a RuntimeError
carrying the Communicator's message, and every later collective at once: the
job is gone, nothing will come back.

Leaving: destroy_process_group() tells incd this rank is done once its queued
collectives ran; so does the end of the process (atexit) for groups still
open, unless an uncaught exception ended it: then the rank leaves as a crash,
and the other ranks fail within the fail timeout instead of waiting.

Settings (environment, read when a group is made):
  INC_JOB                job id (1..1023) of the default group. Unset: rank 0 draws
                         one at random from 1..1023 and hands it to the others
                         through the rendezvous store (each new_group draws its
                         own, not one of its rank 0's other groups). When
                         several jobs share a switch, set it: incd refuses an
                         id in use ("job N is running"), and init fails.
  INC_SWITCH             incd's address (default: the host's default gateway)
  INC_DATAPATH           auto|xdp|socket (default auto)
  INC_TIMEOUT            s without progress before a collective fails (default 10)
  INC_FAIL_TIMEOUT       s to notice a dead or hung member (default 2)
  INC_REGISTER_TIMEOUT   s to wait for the other ranks (default: the group's
                         timeout, at most 600, incd's limit)
  INC_WINDOW             packets in flight (default 64)
  INC_FRAME              std|jumbo (default std): jumbo sends large sums in
                         64 KB frames (XDP path, modulo mode, MTU 65535 links)

Reductions: SUM, AVG, MAX, MIN. The switch adds float32, int32 (exact),
float16 and bfloat16 (through float32); fp32 sums are within the quantization
bound of docs/design.md. Other dtypes (int64 counters, float64 metrics,
uint8, bool) are all-gathered through the switch and reduced on every rank
in rank order: exact for integers, the same on every rank, world x the
traffic. broadcast, all_gather, scatter, all_to_all move bytes and are exact
for any dtype. No send/recv, no PREMUL_SUM/PRODUCT/bitwise ops.
"""
import atexit
import datetime
import os
import secrets
import weakref

import torch
import torch.distributed as dist

from .communicator import Communicator
from .ddp_hook import IncHookState, inc_allreduce_hook, register_inc_hook  # noqa: F401  (the module's API)
from .torch_worker import IncWork, Worker

__all__ = ["IncProcessGroup", "create_inc_process_group", "inc_allreduce_hook",
           "IncHookState", "register_inc_hook", "BACKEND"]

BACKEND = "inc"
JOB_MIN, JOB_MAX = 1, 1023  # incd's job ids
MAX_REGISTER_TIMEOUT = 600.0  # incd refuses a longer registration wait
REDUCIBLE = (torch.float32, torch.int32, torch.float16, torch.bfloat16)  # summed by the switch
_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg",
        dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    try:
        return float(v) if v else default
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {v!r}") from None


_live: "weakref.WeakSet[IncProcessGroup]" = weakref.WeakSet()
_groups_made = 0


class IncProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group whose collectives go through the
    switch (one incd job per group)."""

    def __init__(self, store, rank: int, world: int, timeout: datetime.timedelta | None = None,
                 job: int | None = None):
        global _groups_made
        super().__init__(rank, world)
        self._rank, self._world = rank, world
        first, _groups_made = _groups_made == 0, _groups_made + 1
        self.job = job if job is not None else self._pick_job(store, rank, first)
        limit = timeout.total_seconds() if timeout is not None else 30.0
        kw = dict(datapath=os.environ.get("INC_DATAPATH") or "auto",
                  window=int(os.environ.get("INC_WINDOW") or 64),
                  frame=os.environ.get("INC_FRAME") or "std",
                  timeout=_env_float("INC_TIMEOUT", 10.0),
                  fail_timeout=_env_float("INC_FAIL_TIMEOUT", 2.0),
                  register_timeout=_env_float("INC_REGISTER_TIMEOUT", min(limit, MAX_REGISTER_TIMEOUT)))
        self._worker = Worker(f"inc-pg-job{self.job}")

        def join(_):
            self._worker.comm = Communicator(self.job, rank, world, os.environ.get("INC_SWITCH") or None, **kw)
            return True

        ok, why = self._worker.submit(join).wait()  # registration: blocks until every rank is there
        if not ok:
            self._worker.stop()
            raise RuntimeError(f"{why} (job {self.job}, rank {rank} of {world})")
        self.datapath = self._worker.comm.datapath
        _live.add(self)

    @staticmethod
    def _pick_job(store, rank: int, first: bool) -> int:
        env = os.environ.get("INC_JOB")
        if env and first:
            job = int(env)
            if not JOB_MIN <= job <= JOB_MAX:
                raise ValueError(f"INC_JOB must be in {JOB_MIN}..{JOB_MAX}, got {job}")
            return job
        # store keys carry the group's prefix, so every group agrees on its own id
        if rank == 0:
            used = {pg.job for pg in _live}  # this process's other groups
            job = next(j for j in iter(lambda: JOB_MIN + secrets.randbelow(JOB_MAX - JOB_MIN + 1), None)
                       if j not in used)
            store.set("inc_job", str(job))
        return int(store.get("inc_job"))

    # -- identity --------------------------------------------------------------
    def getBackendName(self) -> str:
        return BACKEND

    def getRank(self) -> int:
        return self._rank

    def getSize(self) -> int:
        return self._world

    def __repr__(self) -> str:
        return f"IncProcessGroup(job={self.job}, rank={self._rank}, world={self._world})"

    # -- plumbing --------------------------------------------------------------
    def _run(self, fn, result) -> IncWork:
        return IncWork(self._worker.submit(fn, result), result)

    @staticmethod
    def _op(opts, dtype: torch.dtype) -> str:
        op = _OPS.get(opts.reduceOp.op)
        if op is None:
            raise ValueError(f"inc: reduce op {opts.reduceOp.op} is not supported (SUM, AVG, MAX, MIN)")
        if dtype.is_complex:  # torch.distributed passes complex tensors as real views
            raise ValueError(f"inc: cannot reduce {dtype}")
        if op == "avg" and not dtype.is_floating_point:
            raise ValueError(f"inc: AVG needs a floating-point tensor, not {dtype}")
        return op

    @staticmethod
    def _reduced(comm, t: torch.Tensor, op: str) -> torch.Tensor:
        """op over the ranks of t, as a new tensor (the switch's sum where it can)."""
        if t.dtype in REDUCIBLE:
            return comm.allreduce(t.detach().clone(), op)
        g = comm.allgather(t.detach())  # (world,) + shape, bit for bit
        if op == "max":
            r = g.amax(0) if t.dtype != torch.bool else g.any(0)
        elif op == "min":
            r = g.amin(0) if t.dtype != torch.bool else g.all(0)
        else:
            r = g.sum(0)
            if op == "avg":
                r = r / g.shape[0]
        return r.to(t.dtype)

    def _shard(self, comm, x: torch.Tensor, op: str) -> torch.Tensor:
        """This rank's row of op over the ranks of x, shape (world, ...)."""
        if x.dtype in REDUCIBLE:
            return comm.reduce_scatter(x, op)
        return self._reduced(comm, x, op)[self._rank]

    @staticmethod
    def _cpu(*tensors) -> None:
        for t in tensors:
            if t.device.type != "cpu":
                raise ValueError(f"inc: tensors must be on the CPU, not {t.device}")

    # -- collectives -----------------------------------------------------------
    def allreduce(self, tensors, opts=None):
        opts = opts or dist.AllreduceOptions()
        self._cpu(*tensors)
        ops = [self._op(opts, t.dtype) for t in tensors]

        def run(comm):
            for t, op in zip(tensors, ops):
                if t.dtype in REDUCIBLE:
                    comm.allreduce(t, op)  # in place
                else:
                    t.copy_(self._reduced(comm, t, op))
        return self._run(run, tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        opts = opts or dist.AllreduceCoalescedOptions()
        self._cpu(*tensors)
        ops = [self._op(opts, t.dtype) for t in tensors]

        def run(comm):
            # one collective per dtype: fewer, longer vectors fill the window better
            for dt in dict.fromkeys(t.dtype for t in tensors):
                group = [t for t in tensors if t.dtype == dt]
                flat = self._reduced(comm, torch.cat([t.detach().reshape(-1) for t in group]),
                                     ops[tensors.index(group[0])])
                for t, part in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(part.view_as(t))
        return self._run(run, tensors)

    def broadcast(self, tensors, opts=None):
        opts = opts or dist.BroadcastOptions()
        self._cpu(*tensors)
        root = opts.rootRank

        def run(comm):
            for t in tensors:
                comm.broadcast(t, root)
        return self._run(run, tensors)

    def reduce(self, tensors, opts=None):
        opts = opts or dist.ReduceOptions()
        self._cpu(*tensors)
        ops = [self._op(opts, t.dtype) for t in tensors]
        root = opts.rootRank

        def run(comm):
            for t, op in zip(tensors, ops):
                if t.dtype in REDUCIBLE:
                    comm.reduce(t, root, op)  # in place on root
                else:
                    r = self._reduced(comm, t, op)
                    if self._rank == root:
                        t.copy_(r)
        return self._run(run, tensors)

    def allgather(self, output_tensors, input_tensors, opts=None):
        self._cpu(*input_tensors)
        for outs, inp in zip(output_tensors, input_tensors):
            self._same(outs, inp, "all_gather")

        def run(comm):
            for outs, inp in zip(output_tensors, input_tensors):
                g = comm.allgather(inp.detach())
                for j, o in enumerate(outs):
                    o.copy_(g[j])
        return self._run(run, output_tensors)

    def _same(self, outs, inp, what: str) -> None:
        if len(outs) != self._world:
            raise ValueError(f"inc: {what} needs {self._world} output tensors, got {len(outs)}")
        for o in outs:
            self._cpu(o)
            if o.shape != inp.shape or o.dtype != inp.dtype:
                raise ValueError(f"inc: {what} needs equal shapes and dtypes on every rank "
                                 f"({tuple(o.shape)} {o.dtype} vs {tuple(inp.shape)} {inp.dtype})")

    def all_gather_single(self, output, input, opts=None):
        self._cpu(output, input)
        if output.numel() != input.numel() * self._world or output.dtype != input.dtype:
            raise ValueError(f"inc: all_gather_into_tensor: output must hold {self._world} x the input")

        def run(comm):
            output.copy_(comm.allgather(input.detach()).reshape(output.shape))
        return self._run(run, output)

    _allgather_base = all_gather_single  # older torch's name

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        return self.allgather(output_lists, input_list, opts)

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        self._cpu(*outputs, *inputs)

        def run(comm):
            for o, i in zip(outputs, inputs):
                o.copy_(comm.allgather(i.detach()).reshape(o.shape))
        return self._run(run, outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, output_tensors, input_tensors, opts=None):
        # an allgather that only root keeps: the switch sends every result to every member anyway
        root = (opts or dist.GatherOptions()).rootRank
        self._cpu(*input_tensors)
        if self._rank == root:
            self._same(output_tensors[0], input_tensors[0], "gather")

        def run(comm):
            g = comm.allgather(input_tensors[0].detach())
            if self._rank == root:
                for j, o in enumerate(output_tensors[0]):
                    o.copy_(g[j])
        return self._run(run, output_tensors)

    def scatter(self, output_tensors, input_tensors, opts=None):
        root = (opts or dist.ScatterOptions()).rootRank
        out = output_tensors[0]
        self._cpu(out)
        if self._rank == root:
            self._same(input_tensors[0], out, "scatter")

        def run(comm):
            if self._rank == root:
                x = torch.stack([t.detach() for t in input_tensors[0]])
            else:  # the Communicator wants the same shape everywhere; contents ignored
                x = torch.zeros((self._world, *out.shape), dtype=out.dtype)
            out.copy_(comm.scatter(x, root))
        return self._run(run, output_tensors)

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        for o, ins in zip(output_tensors, input_tensors):
            self._same(ins, o, "reduce_scatter")
        ops = [self._op(opts, o.dtype) for o in output_tensors]

        def run(comm):
            for o, ins, op in zip(output_tensors, input_tensors, ops):
                shard = self._shard(comm, torch.stack([t.detach() for t in ins]), op)
                o.copy_(shard.reshape(o.shape))
        return self._run(run, output_tensors)

    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        self._cpu(output, input)
        op = self._op(opts, input.dtype)
        if input.numel() != output.numel() * self._world or output.dtype != input.dtype:
            raise ValueError(f"inc: reduce_scatter_tensor: input must hold {self._world} x the output")

        def run(comm):
            shard = self._shard(comm, input.detach().reshape(self._world, -1), op)
            output.copy_(shard.reshape(output.shape))
        return self._run(run, output)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        self._cpu(*outputs, *inputs)
        ops = [self._op(opts, i.dtype) for i in inputs]

        def run(comm):
            for o, i, op in zip(outputs, inputs, ops):
                o.copy_(self._shard(comm, i.detach().reshape(self._world, -1), op).reshape(o.shape))
        return self._run(run, outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def alltoall(self, output_tensors, input_tensors, opts=None):
        self._same(output_tensors, input_tensors[0], "all_to_all")
        self._same(input_tensors, input_tensors[0], "all_to_all")

        def run(comm):
            got = comm.alltoall(torch.stack([t.detach() for t in input_tensors]))
            for j, o in enumerate(output_tensors):
                o.copy_(got[j])
        return self._run(run, output_tensors)

    def all_to_all_single(self, output, input, output_splits, input_splits, opts=None):
        self._cpu(output, input)
        n = input.shape[0] if input.dim() else 0
        even = [n // self._world] * self._world if n % self._world == 0 else None
        for splits in (output_splits, input_splits):
            if splits and list(splits) != even:
                raise ValueError("inc: all_to_all_single supports equal splits only")
        if output.shape != input.shape or output.dtype != input.dtype or even is None:
            raise ValueError(f"inc: all_to_all_single needs equal input and output shapes, "
                             f"first dimension divisible by {self._world}")

        def run(comm):
            output.copy_(comm.alltoall(input.detach().reshape(self._world, -1)).reshape(output.shape))
        return self._run(run, output)

    alltoall_base = all_to_all_single

    def barrier(self, opts=None):
        return self._run(lambda comm: comm.barrier(), [])

    def send(self, tensors, dst, tag=0):
        raise RuntimeError("inc: point-to-point send is not supported (collectives only)")

    def recv(self, tensors, src, tag=0):
        raise RuntimeError("inc: point-to-point recv is not supported (collectives only)")

    def recv_anysource(self, tensors, tag=0):
        raise RuntimeError("inc: point-to-point recv is not supported (collectives only)")

    # -- lifetime -----------------------------------------------------------------
    def shutdown(self) -> None:
        """destroy_process_group(): leave the job once queued collectives ran."""
        self._worker.stop()

    def abort(self) -> None:
        self._worker.stop(timeout=1.0)


def create_inc_process_group(store, rank: int, world: int, timeout) -> IncProcessGroup:
    """The creator torch.distributed calls for backend "inc"."""
    return IncProcessGroup(store, rank, world, timeout)


@atexit.register
def _leave_all() -> None:
    # A rank that exits without telling incd it is done fails the job for the
    # others; users often skip destroy_process_group().
    for pg in list(_live):
        pg._worker.stop(timeout=5.0)


dist.Backend.register_backend(BACKEND, create_inc_process_group, devices=["cpu"])
