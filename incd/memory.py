"""Switch memory manager: how many aggregator slots each job gets.

Where the slots are is the allocator's business (incd/allocator.py), and
moving jobs to compact the pool is the registry's (incd/registry.py).

The same code runs inside incd (real time) and in scripts/memsim.py
(simulated time), so what the simulator reports is what the daemon does.

Sizing, from the seed: Memory_switch = Throughput x RTT, and
Time_job = Epochs x (Time_comp + Size_model / Throughput). A modulo job with S
slots keeps W = S/2 packets in flight, so it moves W x packet bytes per RTT.
A deadline job needs the throughput that finishes its remaining epochs in time;
that fixes its slots.

Policies:
- fifo:   in arrival order each job gets what it asks for; a job that does
          not fit waits, and so does everyone behind it.
- static: the pool is cut into equal partitions; a job takes a free one.
- edf:    deadline jobs, earliest deadline first, get the slots they need if
          those fit; then what is left is shared equally by all jobs up to
          their ask (water-filling), so best-effort jobs and deadline jobs
          that cannot be satisfied run on the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


POLICIES = ("fifo", "static", "edf")
PACKET_BYTES = 3200          # payload of a full INC packet (800 int32 lanes)
MIN_SLOTS = 2                # a window of one packet


@dataclass
class JobDemand:
    job: int
    arrival: float
    want_slots: int                  # the most it can use (2 x its window)
    deadline: float | None = None    # absolute time; None = best effort
    model_bytes: int = 0
    epochs_left: float = 1.0
    compute_s: float = 0.0           # per epoch
    hosts: tuple = ()                # addresses of its members (max_host_slots)

    @property
    def has_deadline(self) -> bool:
        return self.deadline is not None


@dataclass
class Link:
    rtt_s: float = 200e-6
    bps: float = 10e9                # bytes/s cap from the hosts' links, in bits/s

    def throughput(self, slots: int) -> float:
        """Bytes/s a modulo job moves with this many slots."""
        if slots < MIN_SLOTS:
            return 0.0
        return min(self.bps / 8, (slots // 2) * PACKET_BYTES / self.rtt_s)

    def slots_for(self, bytes_per_s: float) -> int:
        if bytes_per_s > self.bps / 8:
            return math.inf  # the link cannot carry it, whatever the memory
        return max(MIN_SLOTS, 2 * math.ceil(bytes_per_s * self.rtt_s / PACKET_BYTES))


def needed_slots(d: JobDemand, now: float, link: Link) -> int | None:
    """Slots that meet the deadline; None if no amount of memory can."""
    if not d.has_deadline:
        return None
    per_epoch = (d.deadline - now) / max(d.epochs_left, 1e-9)
    comm = per_epoch - d.compute_s
    if comm <= 0:
        return None
    if d.model_bytes == 0:
        return MIN_SLOTS
    need = link.slots_for(d.model_bytes / comm)
    return None if need == math.inf else need


def _water_fill(demands: list[JobDemand], free: int) -> dict[int, int]:
    """Equal shares of `free`, none above its ask; what a small ask leaves over
    goes to the others."""
    out = {d.job: 0 for d in demands}
    left = sorted(demands, key=lambda d: d.want_slots)
    while left and free >= MIN_SLOTS:
        share = free // len(left)
        d = left[0]
        if d.want_slots <= share:
            out[d.job] = d.want_slots
            free -= d.want_slots
            left.pop(0)
            continue
        share -= share % 2  # regions are 2W
        for d in left:
            out[d.job] = share if share >= MIN_SLOTS else 0
        break
    return out


@dataclass
class MemoryManager:
    pool_slots: int
    policy: str = "edf"
    link: Link = field(default_factory=Link)
    partitions: int = 4              # static policy
    max_job_slots: int | None = None  # no job gets more, deadline or not (None: the pool)
    max_host_slots: int | None = None  # the jobs with a member on one host hold at most this together

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")

    def targets(self, demands: list[JobDemand], now: float,
                current: dict[int, int] | None = None) -> dict[int, int]:
        """Slots per job (0 = waits). `current` is what jobs hold now (static keeps
        partitions where they are)."""
        cap = min(self.pool_slots, self.max_job_slots or self.pool_slots)  # nobody uses more than the pool
        cap -= cap % 2
        demands = sorted((d if d.want_slots <= cap else JobDemand(**{**d.__dict__, "want_slots": cap})
                          for d in demands), key=lambda d: (d.arrival, d.job))
        if self.policy == "fifo":
            out = self._fifo(demands)
        elif self.policy == "static":
            out = self._static(demands, current or {})
        else:
            out = self._edf(demands, now)
        return self._host_caps(out, demands) if self.max_host_slots else out

    def _host_caps(self, out: dict[int, int], demands: list[JobDemand]) -> dict[int, int]:
        """Cuts what the policy gave so that the jobs of any one host hold at
        most max_host_slots together, first come first kept; a job cut below
        MIN_SLOTS waits. What is cut is not handed to others in this round."""
        used: dict[str, int] = {}
        for d in demands:  # arrival order
            g = out.get(d.job, 0)
            for h in d.hosts:
                g = min(g, self.max_host_slots - used.get(h, 0))
            g -= g % 2
            g = g if g >= MIN_SLOTS else 0
            out[d.job] = g
            for h in d.hosts:
                used[h] = used.get(h, 0) + g
        return out

    def _fifo(self, demands):
        out, free, blocked = {}, self.pool_slots, False
        for d in demands:
            if not blocked and d.want_slots <= free:
                out[d.job] = d.want_slots
                free -= d.want_slots
            else:
                out[d.job] = 0
                blocked = True  # no overtaking
        return out

    def _static(self, demands, current):
        part = self.pool_slots // self.partitions
        part -= part % 2
        out = {}
        holders = [d for d in demands if current.get(d.job, 0) > 0][: self.partitions]
        waiting = [d for d in demands if d not in holders]
        for d in holders + waiting:
            fits = len([j for j in out.values() if j > 0]) < self.partitions and part >= MIN_SLOTS
            out[d.job] = min(d.want_slots, part) if fits else 0
        return out

    def _edf(self, demands, now):
        out, free = {d.job: 0 for d in demands}, self.pool_slots
        for d in sorted((d for d in demands if d.has_deadline), key=lambda d: (d.deadline, d.arrival, d.job)):
            need = needed_slots(d, now, self.link)
            if need is not None and need <= min(free, d.want_slots):
                out[d.job] = need
                free -= need
            # else: it cannot be satisfied now and competes as best effort below
        # What is left is shared by everyone up to their ask, deadline jobs included:
        # memory nobody is promised should not sit idle.
        residual = [JobDemand(d.job, d.arrival, d.want_slots - out[d.job]) for d in demands
                    if d.want_slots > out[d.job]]
        for job, extra in _water_fill(residual, free).items():
            out[job] += extra
        return out
