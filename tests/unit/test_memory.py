"""Properties of the switch memory manager (incd/memory.py), over random job mixes."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from incd.memory import MIN_SLOTS, POLICIES, JobDemand, Link, MemoryManager, needed_slots

LINK = Link(500e-6, 100e9)


@st.composite
def demand_sets(draw):
    n = draw(st.integers(0, 12))
    out = []
    for j in range(1, n + 1):
        has_dl = draw(st.booleans())
        out.append(JobDemand(
            job=j, arrival=draw(st.floats(0, 100)), want_slots=2 * draw(st.integers(1, 600)),
            deadline=draw(st.floats(1, 500)) if has_dl else None,
            model_bytes=draw(st.integers(0, 10**9)), epochs_left=draw(st.floats(0.5, 50)),
            compute_s=draw(st.floats(0, 2))))
    return out


pools = st.integers(2, 4096)


@settings(max_examples=300, deadline=None)
@given(demand_sets(), pools, st.sampled_from(POLICIES))
def test_targets_fit_the_pool_and_the_asks(demands, pool, policy):
    t = MemoryManager(pool, policy, LINK).targets(demands, 0.0)
    assert set(t) == {d.job for d in demands}
    assert sum(t.values()) <= pool
    for d in demands:
        assert t[d.job] == 0 or (MIN_SLOTS <= t[d.job] <= d.want_slots and t[d.job] % 2 == 0)


@settings(max_examples=200, deadline=None)
@given(demand_sets(), pools)
def test_freed_memory_is_reused(demands, pool):
    """EDF wastes nothing: if all asks fit, everyone gets its ask; otherwise at most
    a few slots per job are lost to rounding."""
    t = MemoryManager(pool, "edf", LINK).targets(demands, 0.0)
    ask = {d.job: min(d.want_slots, pool - pool % 2) for d in demands}  # nobody gets more than the pool
    if sum(ask.values()) <= pool:
        assert all(t[j] == ask[j] for j in ask)
    else:
        assert sum(t.values()) >= pool - 2 * len(demands) - MIN_SLOTS


@settings(max_examples=300, deadline=None)
@given(demand_sets(), pools)
def test_edf_serves_deadlines_in_order(demands, pool):
    """A deadline job that can be met is passed over only if, at its turn in
    deadline order, the earlier deadlines had already taken the memory it needs."""
    t = MemoryManager(pool, "edf", LINK).targets(demands, 0.0)
    taken = 0
    for d in sorted((d for d in demands if d.deadline is not None), key=lambda d: (d.deadline, d.arrival, d.job)):
        need = needed_slots(d, 0.0, LINK)
        if need is None or need > d.want_slots:
            continue
        if t[d.job] >= need:
            taken += need
        else:
            assert need > pool - taken, (d, need, taken)


def test_urgent_job_gets_memory_first():
    pool = 256
    big = JobDemand(1, 0.0, 256)                        # best effort, wants everything
    urgent = JobDemand(2, 5.0, 256, deadline=20.0, model_bytes=800_000_000, epochs_left=10, compute_s=0.1)
    need = needed_slots(urgent, 5.0, LINK)
    assert need is not None and need > 128
    edf = MemoryManager(pool, "edf", LINK).targets([big, urgent], 5.0)
    fifo = MemoryManager(pool, "fifo", LINK).targets([big, urgent], 5.0)
    assert edf[2] >= need and edf[1] == pool - edf[2]
    assert fifo == {1: 256, 2: 0}


def test_static_partitions_are_kept_by_their_holders():
    mm = MemoryManager(400, "static", LINK, partitions=4)
    ds = [JobDemand(j, float(j), 400) for j in range(1, 7)]
    t = mm.targets(ds, 0.0)
    assert sorted(t.values()) == [0, 0, 100, 100, 100, 100]
    assert [j for j in t if t[j]] == [1, 2, 3, 4]
    # job 1 leaves: the first waiting job (5) takes its partition; 2..4 keep theirs
    t2 = mm.targets(ds[1:], 1.0, t)
    assert {j for j in t2 if t2[j]} == {2, 3, 4, 5}


def test_no_job_gets_more_than_max_job_slots_deadline_or_not():
    """One host asking for the whole pool (or claiming an urgent deadline for a
    huge model) gets at most max_job_slots; the rest stays for the others."""
    for policy in POLICIES:
        mm = MemoryManager(256, policy, max_job_slots=64)
        hog = JobDemand(1, arrival=0.0, want_slots=256)
        urgent = JobDemand(2, arrival=1.0, want_slots=256, deadline=10.0, model_bytes=10**10, epochs_left=1.0)
        small = JobDemand(3, arrival=2.0, want_slots=32)
        got = mm.targets([hog, urgent, small], now=0.0)
        assert max(got.values()) <= 64 and got[3] == 32, (policy, got)
        assert sum(got.values()) <= 256


def test_the_jobs_of_one_host_hold_at_most_max_host_slots():
    """Many jobs from one host, each within max_job_slots, still get at most
    max_host_slots together (first come first kept); a job that shares no host
    with them is not cut; a job spanning two hosts counts against both."""
    for policy in POLICIES:
        mm = MemoryManager(256, policy, max_host_slots=64)
        ds = [JobDemand(j, arrival=float(j), want_slots=32, hosts=("10.0.0.1",)) for j in range(1, 5)]
        ds.append(JobDemand(5, arrival=5.0, want_slots=32, hosts=("10.0.0.2",)))
        ds.append(JobDemand(6, arrival=6.0, want_slots=32, hosts=("10.0.0.2", "10.0.0.3")))
        got = mm.targets(ds, now=0.0)
        one = sum(got[j] for j in range(1, 5))
        assert one <= 64 and got[1] == 32, (policy, got)
        assert got[5] + got[6] <= 64 and (got[5] == 32 or policy == "static"), (policy, got)
        assert all(v % 2 == 0 for v in got.values())
    unlimited = MemoryManager(256, "fifo").targets(ds, now=0.0)
    assert sum(unlimited[j] for j in range(1, 5)) == 128
