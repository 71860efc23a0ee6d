"""The lab state file, /run/inc-lab/{name}.json: the contract with incd and the agents.

Format (keys and order are fixed; "hosts" lists h1..hN, then ps if present):
    {"name": "inc", "switch_netns": "inc-sw", "mtu": 3400,
     "impair": {"loss_pct": 0.0, "reorder_pct": 0.0, "rate": null, "delay_ms": null},
     "hosts": [{"name": "h1", "netns": "inc-h1", "ifname": "eth0", "addr": "10.77.1.2",
                "prefix": 24, "gateway": "10.77.1.1", "switch_port": "p1", "role": "worker"},
               ...]}

Every host entry ends with "rack": k and "switch": "sw" (or "leaf{k}"), and
after "hosts" come the racks and the switches:
     "racks": 1,
     "switches": [{"name": "sw", "netns": "inc-sw", "role": "single", "rack": 1,
                   "ports": ["p1", "p2"], "uplink": null}],
     "spine_impair": null}

With racks R >= 2, "switch_netns" is the spine's, the hosts are split rack by
rack and "switches" lists leaf1..leafR, then the spine:
     {"name": "leaf1", "netns": "inc-leaf1", "role": "leaf", "rack": 1,
      "ports": ["p1", "p2"],            (host-facing ports; the uplink separately)
      "uplink": {"port": "up", "addr": "10.76.1.2", "peer_addr": "10.76.1.1",
                 "peer_port": "l1", "mid_netns": "inc-ls1"}},
     ...
     {"name": "spine", "netns": "inc-spine", "role": "spine", "rack": 0,
      "ports": ["l1", "l2"], "uplink": null}
"spine_impair" is then the spine links' faults, in the format of "impair"
(applied in each mid_netns on bridge port "b", both directions).
A state without "racks"/"switches" (written before racks existed) is a
one-rack lab.

"impair" has the four keys above always, and after them "dup_pct",
"corrupt_pct" and "jitter_ms" when those impairments are set (so files of
labs without them read as before); impair.Impairments.from_state() reads both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LabError

STATE_DIR = Path("/run/inc-lab")


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def write(state: dict) -> Path:
    path = state_path(state["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def read(name: str) -> dict | None:
    """The state of lab `name`, None if there is no state file; LabError if unreadable."""
    path = state_path(name)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"state file {path} is unreadable ({e}); run `inc-lab --name {name} down`")
    if not isinstance(state, dict) or not isinstance(state.get("hosts"), list) \
            or state.get("name") != name or "switch_netns" not in state:
        raise LabError(f"state file {path} is malformed; run `inc-lab --name {name} down`")
    return state


def remove(name: str) -> bool:
    """Remove the state file (and any leftover temporary); True if there was one."""
    path = state_path(name)
    path.with_suffix(".json.tmp").unlink(missing_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
