"""Network namespaces and running programs inside them.

Programs run through `ip netns exec`, which also gives them the namespace's
own /sys, exactly as a user typing the same command would get.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from .errors import LabError

NETNS_DIR = "/run/netns"


def list_netns(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def create(name: str) -> None:
    if exists(name):
        raise LabError(f"network namespace {name} already exists")
    pr_netns.create(name)


def delete(name: str) -> None:
    """Delete a namespace; its veths, qdiscs, filters and BPF programs go with it."""
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        pass


def iproute(name: str) -> IPRoute:
    """An rtnetlink socket inside namespace `name` (never creates the namespace)."""
    return IPRoute(netns=name, flags=0)


def ns_argv(name: str, argv: Sequence[str]) -> list[str]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a sequence of arguments, not a string")
    return ["ip", "netns", "exec", name, *argv]


def run_checked(argv: Sequence[str], what: str | None = None) -> str:
    """Run a command; on failure raise LabError carrying its last line of stderr."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True)
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: command not found") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        detail = msg[-1] if msg else f"exit code {proc.returncode}"
        raise LabError(f"{what or ' '.join(argv)}: {detail}")
    return proc.stdout


def check(name: str, argv: Sequence[str], what: str | None = None) -> str:
    """run_checked() inside namespace `name`."""
    return run_checked(ns_argv(name, argv), f"{what or ' '.join(argv)} (in {name})")


def sysctl(name: str, settings: dict[str, object]) -> None:
    check(name, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())],
          what="sysctl")
