"""A job and its members as the registry keeps them.

Words per mode: a job's PS is a parameter server in hash and ps mode and the
reducer in kv mode (`Job.reducer`); a kv mapper's rank is its flow id on the
switch (`Member.flow`); a kv job's offset/slots are its range of columns of
the switch's kv_pool (`Job.cols`), not aggregator slots."""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from bpf import wire

from .memory import MIN_SLOTS, JobDemand
from .netinfo import Path

MODE_CODE = {"modulo": wire.MODE_MODULO, "hash": wire.MODE_HASH, "kv": wire.MODE_KV}  # "ps": nothing on the switch


@dataclass
class Member:
    rank: int  # -1 for the PS (kv: the reducer)
    addr: str
    port: int
    path: Path
    ifname: str
    alive: bool = True
    send: object = None  # pushes an event to the member's control connection
    last_seen: float | None = None     # monotonic time of its last heartbeat (None: sends none)
    fail_timeout: float | None = None  # silent this long = hung (from its heartbeats)
    datapath: str | None = None  # "xdp" or "socket", as the member said when it registered
    # Given to the member alone in its join reply; a rejoin after an incd restart
    # must bring it back (recovery.py). None: restored from a state file without one.
    token: str | None = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def flow(self) -> int:
        """kv: the mapper's flow id on the switch (its rank)."""
        return self.rank

    @property
    def who(self) -> str:
        return f"the parameter server ({self.addr})" if self.rank == -1 else f"rank {self.rank} ({self.addr})"

    def public(self) -> dict:
        return {"rank": self.rank, "addr": self.addr, "port": self.port, "switch_port": self.ifname,
                "alive": self.alive, "datapath": self.datapath}


@dataclass
class Resize:
    """A live resize of a modulo job in progress (see resize.py)."""
    id: int
    size: int                      # slots the job gets
    started: float = field(default_factory=time.time)
    reports: dict = field(default_factory=dict)  # rank -> the next psn it would send
    passed: set = field(default_factory=set)     # ranks done with every psn < fence
    fence: int | None = None       # S: the largest reported psn, once all reported


@dataclass
class Job:
    id: int
    world: int
    mode: str
    window: int | None = None  # in effect; modulo: half the slots granted
    req_window: int | None = None  # asked for by the workers (modulo: wants 2x this)
    shape: str | None = None   # what the workers say they reduce, e.g. "1000xint32"; must agree
    frame: str = "std"         # "jumbo": 64 KB frames over JUMBO_SUBS slots each; must agree
    tiers: int = 1             # 2: across racks, summed at the leaves and the spine (incd/fabric.py)
    deadline: float | None = None  # absolute (time.time()); None = best effort
    model_bytes: int = 0
    epochs: float = 1.0
    compute_s: float = 0.0
    members: dict[int, Member] = field(default_factory=dict)
    ps: Member | None = None   # kv: the reducer
    token_digest: bytes = b""  # SHA-256 of the job token its first member brought (b"": none)
    state: str = "pending"  # pending -> (queued: waiting for memory) -> active -> ended
    gen: int = 0
    offset: int = -1           # kv: first column (see cols)
    slots: int = 0             # kv: number of columns (see cols)
    elems: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)
    resize: Resize | None = None  # a live resize in progress (modulo)
    resizes_done: int = 0
    rejoin_by: float | None = None  # recovered by a restarted incd: members must rejoin by then
    rejoin_wait: set = field(default_factory=set)  # ranks (-1: PS) not back yet
    last_beat: float | None = None  # monotonic time of the last heartbeat from any member
    # key-value mode
    req_cols: int | None = None  # columns asked for by the mappers (None: the default share)
    parts: int | None = None     # subspaces the columns are cut into (asked, then in effect)
    tuples: int = 0              # tuples per packet (from the members' MTU)
    kv_drains: int = 0
    kv_epoch: int = 0            # the active copy (mirrors the switch's job entry)
    kv_lock: threading.Lock = field(default_factory=threading.Lock)  # a drain vs. the job's end
    kv_cleared: bool = False     # its columns are cleared and freed (under kv_lock)

    @property
    def reducer(self) -> Member | None:
        """kv: the member that gets what the switch could not absorb and drains it."""
        return self.ps

    @property
    def cols(self) -> int:
        """kv: how many columns of kv_pool the job holds (from offset)."""
        return self.slots

    @property
    def needs_ps(self) -> bool:
        return self.mode in ("hash", "ps", "kv")

    @property
    def ok_reason(self) -> str:
        """How a job that ran to its end ended."""
        return "the reducer finished" if self.mode == "kv" else "all workers left"

    def all_members(self) -> list[Member]:
        return list(self.members.values()) + ([self.ps] if self.ps else [])

    def member(self, rank: int) -> Member | None:
        return self.ps if rank == -1 else self.members.get(rank)

    def complete(self) -> bool:
        return len(self.members) == self.world and (self.ps is not None or not self.needs_ps)

    def missing(self) -> list:
        out: list = sorted(set(range(self.world)) - set(self.members))
        if self.needs_ps and self.ps is None:
            out.append("ps")
        return out

    @property
    def min_slots(self) -> int:
        """The smallest region the job can run in: a window of one packet (a
        jumbo frame takes JUMBO_SUBS slots)."""
        return 2 * wire.JUMBO_SUBS if self.frame == "jumbo" else MIN_SLOTS

    def demand(self) -> JobDemand:
        return JobDemand(self.id, self.started, max(2 * (self.req_window or 1), self.min_slots), self.deadline,
                         self.model_bytes, self.epochs, self.compute_s,
                         tuple(sorted({m.addr for m in self.all_members()})))

    def public(self) -> dict:
        return {
            "job": self.id, "state": self.state, "mode": self.mode, "gen": self.gen,
            "world": self.world, "window": self.window, "req_window": self.req_window,
            "offset": self.offset, "slots": self.slots, "elems_per_packet": self.elems, "frame": self.frame,
            "tiers": self.tiers,
            "deadline_in_s": None if self.deadline is None else round(self.deadline - time.time(), 3),
            "model_bytes": self.model_bytes, "epochs": self.epochs, "compute_s": self.compute_s,
            "members": [m.public() for m in sorted(self.members.values(), key=lambda m: m.rank)],
            "ps": self.ps.public() if self.ps else None,
            "resizes": self.resizes_done,
            **({"cols": self.cols, "parts": self.parts, "req_cols": self.req_cols, "tuples_per_packet": self.tuples,
                "drains": self.kv_drains} if self.mode == "kv" else {}),
        }
