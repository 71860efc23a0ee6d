"""The one thread that runs a Communicator's collectives for torch, in the
order they were issued (every rank must issue the same collectives in the
same order, and a Communicator is not thread-safe), and the Work objects
torch waits on. Used by the "inc" process group (torch_backend.py) and the
DDP comm hook (ddp_hook.py)."""
import queue
import sys
import threading

import torch.distributed as dist
from torch.futures import Future

from .communicator import CommError, Communicator

_crashed = False  # an exception ended the main thread: don't tell incd we are done
_prev_excepthook = sys.excepthook


def _excepthook(*exc) -> None:
    global _crashed
    _crashed = True
    _prev_excepthook(*exc)


sys.excepthook = _excepthook


def unwrap(base: Future):
    ok, value = base.value()
    if not ok:
        raise RuntimeError(value)
    return value


class Worker:
    """One thread that owns a Communicator and runs collectives in submission
    order. Each collective completes a base future with (True, value) or
    (False, message); what callers get is base.then(unwrap).

    Why not Future.set_exception: in Python it only stores the exception as
    the future's *value* (raised by Python's wait()); C++ waiters such as DDP's
    reducer would take it for a result (and crash). An exception raised in a
    then() callback is a real error of the child future, in C++ too."""

    def __init__(self, name: str, owns_comm: bool = True):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.comm: Communicator | None = None
        self.owns_comm = owns_comm  # close it when stopping (the hook's belongs to the user)
        self.error: str | None = None  # the first failure: the job is gone after it
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn, result=None) -> Future:
        """fn(comm) on the worker; the base future gets (True, result) (fn's
        value when result is None) or (False, why)."""
        base: Future = Future()
        if self.error is not None:
            base.set_result((False, self.error))
        else:
            self.q.put((fn, result, base))
        return base

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                if self.owns_comm and self.comm is not None:
                    comm, self.comm = self.comm, None
                    if _crashed:  # leave as a crash: the others fail now instead of timing out
                        comm.__exit__(RuntimeError, None, None)
                    else:
                        comm.close()  # tells incd this rank is done (after a failure: harmless)
                return
            fn, result, base = item
            if self.error is not None:
                base.set_result((False, self.error))
                continue
            try:
                value = fn(self.comm)
            except Exception as e:  # CommError mostly; anything else must not kill the thread
                what = str(e) if isinstance(e, CommError) else f"{type(e).__name__}: {e}"
                self.error = f"inc: {what}"
                base.set_result((False, self.error))
            else:
                base.set_result((True, value if result is None else result))

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the job cleanly (incd is told this rank is done, so the others
        are not failed) once what is queued has run."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join(timeout)


class IncWork(dist.Work):
    """A collective queued on the worker: wait() raises its error."""

    def __init__(self, base: Future, result):
        super().__init__()
        self.base = base
        self.fut = base.then(unwrap)
        self.res = result

    def wait(self, timeout=None) -> bool:
        ok, value = self.base.wait()
        if not ok:
            raise RuntimeError(value)  # the plain message; get_future()'s error says more
        return True

    def get_future(self) -> Future:
        return self.fut

    def is_completed(self) -> bool:
        return self.base.done()

    def is_success(self) -> bool:
        return self.base.done() and self.base.value()[0]

    def result(self):
        self.wait()
        return self.res
