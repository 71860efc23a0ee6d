"""Network namespaces per thread: one incd serves the switches of a two-tier
fabric, each in its own namespace. A namespace switch (setns) is per thread,
and a thread starts in its creator's namespace, so a server thread started in
a switch's namespace serves, and resolves peers, there."""
from __future__ import annotations

import ctypes
import os
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(netns: str) -> None:
    """Moves the calling thread into namespace netns (/run/netns/<netns>)."""
    try:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except FileNotFoundError:
        raise RuntimeError(f"network namespace {netns!r} does not exist") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
    finally:
        os.close(fd)


def call_in(netns: str | None, fn):
    """fn() in namespace netns (None: here), from a thread of its own; its result or error."""
    if netns is None:
        return fn()
    out: dict = {}

    def run():
        try:
            enter(netns)
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, name=f"in-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def thread_in(netns: str | None, fn, name: str) -> threading.Thread:
    """A daemon thread running fn() in namespace netns; threads it starts stay there."""
    def run():
        if netns is not None:
            enter(netns)
        fn()
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t
