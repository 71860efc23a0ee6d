"""A DDP communication hook for people who keep another process group (Gloo,
say) and send only the gradient buckets through the switch:

    comm = Communicator(job=7, rank=r, world=n)
    register_inc_hook(ddp_model, comm)            # buckets averaged: sum / world
"""
# (no `from __future__ import annotations` here: DDP compares the hook's annotations)
import torch
import torch.distributed as dist
from torch.futures import Future

from .communicator import Communicator
from .torch_worker import Worker, unwrap

__all__ = ["IncHookState", "inc_allreduce_hook", "register_inc_hook"]


class IncHookState:
    """The hook's state: a Communicator used from one worker thread (don't use
    the Communicator yourself while the model trains through it)."""

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.world = comm.world
        self._worker = Worker(f"inc-hook-job{comm.job}", owns_comm=False)
        self._worker.comm = comm

    def close(self) -> None:
        """Stop the worker thread (the Communicator stays open: it is yours)."""
        self._worker.stop()

    def __getstate__(self):  # DDP pickles comm-hook state with the model only on request
        raise TypeError("IncHookState cannot be pickled: it holds a live Communicator")


def inc_allreduce_hook(state: IncHookState, bucket: dist.GradBucket) -> Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged over the ranks through
    the switch (sum / world), in place."""
    buf = bucket.buffer()
    return state._worker.submit(lambda comm: comm.allreduce(buf, "avg"), buf).then(unwrap)


def register_inc_hook(ddp_model, comm: Communicator) -> IncHookState:
    """Send ddp_model's gradient buckets through comm instead of its process
    group. comm.world must be the process group's size. Returns the state
    (close() it when done with the model)."""
    pg_size = ddp_model.process_group.size()
    if comm.world != pg_size:
        raise ValueError(f"the Communicator's world ({comm.world}) is not the process group's ({pg_size})")
    state = IncHookState(comm)
    ddp_model.register_comm_hook(state, inc_allreduce_hook)
    return state
