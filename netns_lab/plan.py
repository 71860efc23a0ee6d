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

# Two tiers (--racks R >= 2): leaf switches leaf1..leafR, one spine, and
# between leaf k and the spine a middle namespace ls{k} with a plain Linux
# bridge, where the spine link's impairments live (no XDP there).
MAX_RACKS = 8
SPINE = "spine"
UPLINK = "up"           # the leaf's port towards the spine
MID_LEAF_PORT = "a"     # bridge port in ls{k} facing the leaf
MID_SPINE_PORT = "b"    # bridge port in ls{k} facing the spine (spine faults here)
MID_BRIDGE = "br0"

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


def switch_netns(lab: str, racks: int = 1) -> str:
    """The state's "switch_netns": the switch, or with racks the spine."""
    return netns_name(lab, SWITCH if racks == 1 else SPINE)


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


def leaf_name(rack: int) -> str:
    return f"leaf{rack}"


def mid_name(rack: int) -> str:
    return f"ls{rack}"


def spine_port(rack: int) -> str:
    return f"l{rack}"


def validate_racks(racks, workers: int) -> int:
    if isinstance(racks, bool) or not isinstance(racks, int) or not 1 <= racks <= MAX_RACKS:
        raise LabConfigError(f"racks must be between 1 and {MAX_RACKS} (got {racks!r})")
    if workers < racks:
        raise LabConfigError(f"{racks} racks need at least {racks} workers (got {workers}): "
                             "every rack holds at least one worker")
    return racks


def rack_sizes(workers: int, racks: int) -> list[int]:
    """Workers per rack: N // R each, the first N % R racks one more."""
    validate_racks(racks, workers)
    return [workers // racks + (1 if k < workers % racks else 0) for k in range(racks)]


def rack_of(workers: int, racks: int) -> list[int]:
    """Rack (1..R) of worker h1..hN, in order: racks are filled contiguously."""
    return [k + 1 for k, n in enumerate(rack_sizes(workers, racks)) for _ in range(n)]


def host_switch(rack: int, racks: int) -> str:
    """Name of the switch a host of `rack` hangs off: "sw" in a one-rack lab."""
    return SWITCH if racks == 1 else leaf_name(rack)


def host_entry(lab: str, host: str, index: int, role: str, rack: int = 1,
               racks: int = 1) -> dict:
    return {
        "name": host,
        "netns": netns_name(lab, host),
        "ifname": HOST_IFNAME,
        "addr": f"10.77.{index}.2",
        "prefix": PREFIX_LEN,
        "gateway": f"10.77.{index}.1",
        "switch_port": f"p{host[1:] if role == 'worker' else host}",
        "role": role,
        "rack": rack,
        "switch": host_switch(rack, racks),
    }


def hosts(lab: str, workers: int, ps: bool, racks: int = 1) -> list[dict]:
    """Host entries in state-file order: h1..hN, then ps (in rack 1)."""
    out = [host_entry(lab, f"h{i}", i, "worker", rack, racks)
           for i, rack in enumerate(rack_of(workers, racks), start=1)]
    if ps:
        out.append(host_entry(lab, "ps", PS_INDEX, "ps", 1, racks))
    return out


def host_net(host: dict) -> str:
    """The host's /24, e.g. "10.77.3.0/24" (the spine routes it to the host's leaf)."""
    a, b, c, _ = host["addr"].split(".")
    return f"{a}.{b}.{c}.0/{host['prefix']}"


def uplink(lab: str, rack: int) -> dict:
    """Leaf `rack`'s link to the spine, through the bridge in {lab}-ls{rack}."""
    return {"port": UPLINK, "addr": f"10.76.{rack}.2", "peer_addr": f"10.76.{rack}.1",
            "peer_port": spine_port(rack), "mid_netns": netns_name(lab, mid_name(rack))}


def switches(lab: str, host_entries: list[dict], racks: int = 1) -> list[dict]:
    """Switch entries in state-file order: "sw" alone, or leaf1..leafR then the spine.

    "ports" are the ports facing hosts (leaf, single switch) or leaves (spine);
    a leaf's port towards the spine is in "uplink".
    """
    if racks == 1:
        return [{"name": SWITCH, "netns": netns_name(lab, SWITCH), "role": "single", "rack": 1,
                 "ports": [h["switch_port"] for h in host_entries], "uplink": None}]
    out = [{"name": leaf_name(k), "netns": netns_name(lab, leaf_name(k)), "role": "leaf",
            "rack": k, "ports": [h["switch_port"] for h in host_entries if h["rack"] == k],
            "uplink": uplink(lab, k)} for k in range(1, racks + 1)]
    out.append({"name": SPINE, "netns": netns_name(lab, SPINE), "role": "spine", "rack": 0,
                "ports": [spine_port(k) for k in range(1, racks + 1)], "uplink": None})
    return out


def switches_of(state: dict) -> list[dict]:
    """A state's switch entries; a state without "switches" (written before there
    were racks) is a one-rack lab."""
    if state.get("switches"):
        return state["switches"]
    return [{"name": SWITCH, "netns": state["switch_netns"], "role": "single", "rack": 1,
             "ports": [h["switch_port"] for h in state["hosts"]], "uplink": None}]


def lab_netns(state: dict) -> list[str]:
    """Every namespace a lab's state names: switches, middle namespaces, hosts."""
    sws = switches_of(state)
    return [*(s["netns"] for s in sws), *(s["uplink"]["mid_netns"] for s in sws if s["uplink"]),
            *(h["netns"] for h in state["hosts"])]

