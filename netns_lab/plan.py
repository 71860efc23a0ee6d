"""Names and addresses of a lab, computed from its parameters.

Everything here is pure (no root, no kernel), so other code and unit tests can
derive the same addresses the lab uses.
"""

from __future__ import annotations

import re

from .errors import LabConfigError

# '-' is not allowed: it separates the lab name from the host in namespace
# names, so "inc" must never be a prefix of another lab's namespaces.
NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,24}$")

# The XDP programs take multi-buffer frames (bpf/xdp_load.py), so a link may
# carry up to IPv4's largest packet; jumbo frames need MTU_JUMBO.
MTU_MIN, MTU_MAX, MTU_DEFAULT = 576, 65535, 3400
MTU_JUMBO = 65535
MAX_WORKERS = 99  # 10.77.{i}.0/24 with i = 100 kept for the PS
PS_INDEX = 100
PREFIX_LEN = 24
HOST_IFNAME = "eth0"
SWITCH = "sw"

# tc rate units (tc(8)): a bare number means bit/s; "bps" means bytes/s.
_RATE_UNITS = {
    "": 1, "bit": 1,
    "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
}
_RATE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([a-z]*)$")
RATE_MIN, RATE_MAX = 100 * 10**3, 10**12


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LabConfigError(
            f"invalid lab name {name!r}: use 1-24 letters, digits or '_' (no '-')")
    return name


def netns_name(lab: str, host: str) -> str:
    return f"{lab}-{host}"


def switch_netns(lab: str) -> str:
    return netns_name(lab, SWITCH)


def parse_rate(text: str) -> int:
    """tc-style rate ("50mbit", "1gbit", "10mbps") -> bits per second."""
    m = _RATE_RE.match(str(text).strip().lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise LabConfigError(
            f"invalid rate {text!r}: use tc syntax such as 500kbit, 50mbit, 1gbit")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if not RATE_MIN <= bits <= RATE_MAX:
        raise LabConfigError(f"rate {text!r} out of range (100kbit .. 1tbit)")
    return bits


def host_entry(lab: str, host: str, index: int, role: str) -> dict:
    return {
        "name": host,
        "netns": netns_name(lab, host),
        "ifname": HOST_IFNAME,
        "addr": f"10.77.{index}.2",
        "prefix": PREFIX_LEN,
        "gateway": f"10.77.{index}.1",
        "switch_port": f"p{host[1:] if role == 'worker' else host}",
        "role": role,
    }


def hosts(lab: str, workers: int, ps: bool) -> list[dict]:
    """Host entries in state-file order: h1..hN, then ps."""
    out = [host_entry(lab, f"h{i}", i, "worker") for i in range(1, workers + 1)]
    if ps:
        out.append(host_entry(lab, "ps", PS_INDEX, "ps"))
    return out

