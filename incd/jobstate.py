"""The job table on disk, so that an incd killed mid-job can be restarted and
take its running jobs back.

incd rewrites /run/incd/<instance>.jobs.json whenever a job starts, moves or
ends. The switch state itself is not in the file: it is in the pinned maps,
which the XDP program kept using while incd was down. After a restart the
recovered jobs wait `grace_s` for their members to reconnect ("rejoin" on the
control API); a job whose members do not all come back in time is ended and its
memory freed, like a job whose member died.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path as FsPath

from .dataplane import BPF_DIR
from .jobs import Job, Member
from .netinfo import Path
from .registry import Registry

VERSION = 1


def fingerprint(pool_slots: int, hash_slots: int | None, ports: list[str]) -> str:
    """What must not change for pinned maps to be reused: their sizes and
    layouts (the BPF sources) and the ports the programs are attached to."""
    h = hashlib.sha256()
    for f in sorted(BPF_DIR.glob("*.h")) + [BPF_DIR / "inc_switch.bpf.c"]:
        h.update(f.read_bytes())
    h.update(json.dumps([pool_slots, hash_slots, ports]).encode())
    return h.hexdigest()[:16]


def _member(m: Member) -> dict:
    p = m.path
    return {"rank": m.rank, "addr": m.addr, "port": m.port, "ifname": m.ifname, "alive": m.alive,
            "datapath": m.datapath, "token": m.token,
            "path": {"ifindex": p.ifindex, "mac": p.mac.hex(), "port_mac": p.port_mac.hex(),
                     "switch_addr": p.switch_addr, "mtu": p.mtu, "switch": p.switch}}


def _unmember(d: dict) -> Member:
    p = d["path"]
    return Member(d["rank"], d["addr"], d["port"],
                  Path(p["ifindex"], bytes.fromhex(p["mac"]), bytes.fromhex(p["port_mac"]),
                       p["switch_addr"], p["mtu"], p.get("switch", "")),
                  d["ifname"], alive=d["alive"],  # connected when incd died: must rejoin
                  datapath=d.get("datapath"), token=d.get("token"))


def dump(reg: Registry, fp: str) -> dict:
    """The running jobs (caller holds reg.cond). Pending registrations are left
    out: their connections die with incd and the agents see that."""
    jobs = []
    for j in reg.jobs.values():
        if j.state != "active":
            continue
        jobs.append({
            "id": j.id, "world": j.world, "mode": j.mode, "window": j.window, "req_window": j.req_window,
            "shape": j.shape, "frame": j.frame, "tiers": j.tiers, "deadline": j.deadline, "model_bytes": j.model_bytes, "epochs": j.epochs,
            "compute_s": j.compute_s, "gen": j.gen, "offset": j.offset, "slots": j.slots,
            "elems": j.elems, "started": j.started, "remaps_done": j.resizes_done,  # the file's old name
            "members": [_member(m) for m in j.members.values()],
            "ps": _member(j.ps) if j.ps is not None else None,
            # key-value: offset/slots are its columns; the epoch and the flows' seen
            # state are in the pinned maps (jobs, kv_flows), the sums in kv_pool
            "req_cols": j.req_cols, "parts": j.parts, "tuples": j.tuples, "kv_drains": j.kv_drains,
        })
    return {"version": VERSION, "fingerprint": fp, "saved": time.time(), "gen": reg.last_gen,
            "hash_region": reg.hash_region, "jobs": jobs}


def save(path: FsPath, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    # Root only: the table holds each member's rejoin token.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data))
    os.chmod(tmp, 0o600)  # also when it existed before with other modes
    os.replace(tmp, path)  # a reader (the next incd) never sees half a file


def load(path: FsPath, fp: str) -> tuple[dict | None, str]:
    """The saved table if it can be adopted, else None and why not."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "no saved job table"
    except (OSError, ValueError) as e:
        return None, f"saved job table unreadable ({e})"
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None, "saved job table has another format"
    if data.get("fingerprint") != fp:
        return None, "the dataplane or its configuration changed since the job table was saved"
    return data, ""


def restore(reg: Registry, data: dict, grace_s: float) -> list[int]:
    """Puts the saved jobs back as running (Registry.restore), members absent
    until they rejoin. Returns the job ids."""
    jobs = []
    for d in data["jobs"]:
        j = Job(d["id"], d["world"], d["mode"])
        for k in ("window", "req_window", "shape", "deadline", "model_bytes", "epochs", "compute_s",
                  "gen", "offset", "slots", "elems", "started"):
            setattr(j, k, d[k])
        j.resizes_done = d["remaps_done"]
        for k, default in (("req_cols", None), ("parts", None), ("tuples", 0), ("kv_drains", 0), ("frame", "std"),
                         ("tiers", 1)):
            setattr(j, k, d.get(k, default))
        for md in d["members"]:
            j.members[md["rank"]] = _unmember(md)
        j.ps = _unmember(d["ps"]) if d["ps"] else None
        jobs.append(j)
    hash_region = tuple(data["hash_region"]) if data.get("hash_region") else None
    return reg.restore(int(data.get("gen", 0)), hash_region, jobs, grace_s)
