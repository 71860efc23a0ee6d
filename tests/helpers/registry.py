"""The registry's view of ranks, without a lab: one fake path per port
(the dataplane fixture `dp` is in tests/conftest.py)."""
from __future__ import annotations

from incd.netinfo import Path

PATH = [Path(ifindex=i, mac=bytes(6), port_mac=bytes(6), switch_addr=f"10.77.{i}.1", mtu=3400)
        for i in range(10)]
