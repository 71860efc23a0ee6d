"""The parameter server's merging logic (hostagent/ps_merge.py), fed batches
of packets in random order, with repeats, overlaps and garbage mixed in."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from bpf import wire
from hostagent.ps_merge import RING, ROW, Merger

JOB, GEN = 7, 3
ADDRS = {r: f"10.77.{r + 1}.2" for r in range(wire.MAX_WORKERS)}


def ip_u32(addr: str) -> int:
    return int.from_bytes(bytes(int(x) for x in addr.split(".")), "little")


def packet(psn: int, lanes: np.ndarray, *, rank: int = 0, flags: int = 0, bitmap: int = 0,
           op: int = wire.OP_SUM, job: int = JOB, gen: int = GEN, typ: int = wire.T_DATA) -> bytes:
    hdr = np.zeros(1, wire.HDR_DTYPE)
    hdr[0] = (wire.VERSION, typ, flags, op, job, gen, psn, 0, rank, lanes.size, 0, bitmap)
    return wire.seal_bytes(hdr.tobytes() + lanes.astype("<i4").tobytes())


def flip(pkt: bytes, bit: int) -> bytes:
    b = bytearray(pkt)
    b[bit // 8] ^= 1 << bit % 8
    return bytes(b)


def feed(m: Merger, pkts: list[tuple[bytes, str]], results: dict, batch: int = 16) -> None:
    """Feeds (packet, source address) in batches; collects result packets by psn."""
    for i in range(0, len(pkts), batch):
        chunk = pkts[i:i + batch]
        rows = np.full((len(chunk), ROW + 64), 0xAB, dtype=np.uint8)  # stale bytes past each packet
        lens = np.zeros(len(chunk), dtype=np.int64)
        for j, (p, _) in enumerate(chunk):
            rows[j, :len(p)] = np.frombuffer(p, np.uint8)
            lens[j] = len(p)
        src = np.array([ip_u32(a) for _, a in chunk], dtype=np.int64)
        for d in m.feed(rows, lens, src, now=0.0):
            raw = m.done_rows[d, :m.done_len[d]].tobytes()
            assert wire.seal_bytes(raw) == raw, "result csum"
            h = wire.parse_header(raw)
            assert h["type"] == wire.T_RESULT and h["job"] == JOB and h["gen"] == GEN
            lanes = np.frombuffer(raw, "<i4", int(h["numel"]), wire.HDR_LEN)
            results.setdefault(int(h["psn"]), []).append((lanes.copy(), int(h["flags"])))


def contributions(rng, world, npsn, numel, lo=-1000, hi=1000):
    return rng.integers(lo, hi, size=(npsn, world, numel), dtype=np.int64)


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 8), npsn=st.integers(1, 40), numel=st.integers(1, wire.MAX_ELEMS),
       seed=st.integers(0, 2**31), dup=st.floats(0, 0.5), batch=st.integers(1, 64))
def test_ps_mode_sums_singles_in_any_order(world, npsn, numel, seed, dup, batch):
    rng = np.random.default_rng(seed)
    x = contributions(rng, world, npsn, numel)
    psn0 = int(rng.integers(0, 2**32 - 100))
    pkts = [(packet((psn0 + p) & 0xFFFFFFFF, x[p, r], rank=r), ADDRS[r])
            for p in range(npsn) for r in range(world)]
    pkts += [pkts[i] for i in rng.integers(0, len(pkts), int(dup * len(pkts)))]  # resends
    rng.shuffle(pkts)
    m = Merger(JOB, GEN, world, "ps", {r: ADDRS[r] for r in range(world)})
    results: dict = {}
    feed(m, pkts, results, batch)
    assert set(results) == {(psn0 + p) & 0xFFFFFFFF for p in range(npsn)}
    for p in range(npsn):
        for lanes, flags in results[(psn0 + p) & 0xFFFFFFFF]:
            assert np.array_equal(lanes, x[p].sum(axis=0)) and not flags & wire.F_OVERFLOW
    assert m.stats.results == npsn and m.stats.singles == npsn * world


def test_ps_mode_max_and_overflow_flag():
    m = Merger(JOB, GEN, 2, "ps", {0: ADDRS[0], 1: ADDRS[1]})
    res: dict = {}
    a, b = np.array([-5, 2**31 - 1, -9]), np.array([-7, 1, -3])
    feed(m, [(packet(1, a, rank=0, op=wire.OP_MAX), ADDRS[0]), (packet(1, b, rank=1, op=wire.OP_MAX), ADDRS[1]),
             (packet(2, a, rank=0), ADDRS[0]), (packet(2, b, rank=1), ADDRS[1])], res)
    assert res[1][0][0].tolist() == [-5, 2**31 - 1, -3] and not res[1][0][1] & wire.F_OVERFLOW
    assert res[2][0][1] & wire.F_OVERFLOW  # 2^31 - 1 + 1 does not fit in int32


def test_ps_mode_drops_strangers_and_garbage():
    m = Merger(JOB, GEN, 2, "ps", {0: ADDRS[0], 1: ADDRS[1]})
    res: dict = {}
    one = np.ones(4)
    bad = [
        (packet(1, one, rank=0), ADDRS[1]),           # rank 0 from rank 1's host
        (packet(1, one, rank=0), "10.9.9.9"),          # a stranger
        (packet(1, one, rank=2), ADDRS[0]),            # rank beyond the world
        (packet(1, one, rank=0, job=JOB + 1), ADDRS[0]),
        (packet(1, one, rank=0, gen=GEN + 1), ADDRS[0]),
        (packet(1, one, rank=0, typ=wire.T_RESULT), ADDRS[0]),
        (packet(1, one, rank=0, op=9), ADDRS[0]),
        (packet(1, one, rank=0)[:wire.HDR_LEN + 8], ADDRS[0]),  # numel beyond the datagram
        (packet(1, one, rank=0)[:10], ADDRS[0]),       # truncated header
        (packet(1, one, rank=0, flags=wire.F_AGGREGATE, bitmap=3), ADDRS[0]),  # no switch in ps mode
        (flip(packet(1, one, rank=0), 8 * wire.HDR_LEN + 9), ADDRS[0]),  # a lane corrupted
        (flip(packet(1, one, rank=0), 8 * 16 + 1), ADDRS[0]),  # rank 0 -> 2, corrupted
    ]
    feed(m, bad, res)
    assert res == {} and m.stats.ignored == len(bad) and m.stats.corrupt == 2
    feed(m, [(packet(1, one, rank=0), ADDRS[0]), (packet(1, 2 * one, rank=1), ADDRS[1])], res)
    assert res[1][0][0].tolist() == [3, 3, 3, 3]


def test_ps_mode_ring_alias_takes_the_slow_path():
    """Two psns RING apart share a ring entry; both still finish exactly."""
    m = Merger(JOB, GEN, 2, "ps", {0: ADDRS[0], 1: ADDRS[1]})
    res: dict = {}
    a, b = np.arange(5), np.arange(5) * 10
    feed(m, [(packet(3, a, rank=0), ADDRS[0]), (packet(3 + RING, b, rank=0), ADDRS[0]),
             (packet(3 + RING, a, rank=1), ADDRS[1]), (packet(3, b, rank=1), ADDRS[1])], res, batch=1)
    assert res[3][0][0].tolist() == (a + b).tolist() and res[3 + RING][0][0].tolist() == (a + b).tolist()
    assert m.stats.slow_path == 2


def test_ps_mode_resend_after_finish_gets_the_cached_result():
    m = Merger(JOB, GEN, 2, "ps", {0: ADDRS[0], 1: ADDRS[1]})
    res: dict = {}
    feed(m, [(packet(5, np.ones(3), rank=0), ADDRS[0]), (packet(5, np.ones(3), rank=1), ADDRS[1])], res)
    feed(m, [(packet(5, np.ones(3), rank=1, flags=wire.F_RETRANS), ADDRS[1])], res)
    assert len(res[5]) == 2 and all(lanes.tolist() == [2, 2, 2] for lanes, _ in res[5])
    assert m.stats.results == 1 and m.stats.results_resent == 1


@st.composite
def switch_outputs(draw):
    """What the switch can send a hash-mode PS for one psn: disjoint aggregates
    of first transmissions, plus singles (collisions, or resends of ranks that
    may also be in an aggregate)."""
    world = draw(st.integers(1, 8))
    ranks = list(range(world))
    groups, rest = [], draw(st.permutations(ranks))
    while rest:
        k = draw(st.integers(1, len(rest)))
        groups.append(sorted(rest[:k]))
        rest = rest[k:]
    aggs = [g for g in groups if draw(st.booleans()) or len(g) == world]
    covered = {r for g in aggs for r in g}
    singles = [r for r in ranks if r not in covered]
    singles += draw(st.lists(st.sampled_from(ranks), max_size=3))  # resends, also of aggregated ranks
    return world, aggs, singles


@settings(max_examples=60, deadline=None)
@given(case=switch_outputs(), npsn=st.integers(1, 12), numel=st.integers(1, 64),
       seed=st.integers(0, 2**31), batch=st.integers(1, 32))
def test_hash_mode_merges_aggregates_and_singles_exactly(case, npsn, numel, seed, batch):
    world, aggs, singles = case
    rng = np.random.default_rng(seed)
    x = contributions(rng, world, npsn, numel)
    pkts = []
    for p in range(npsn):
        for g in aggs:
            bitmap = sum(1 << r for r in g)
            pkts.append((packet(p, x[p, g].sum(axis=0), flags=wire.F_AGGREGATE, bitmap=bitmap), "10.77.1.1"))
        for r in singles:
            pkts.append((packet(p, x[p, r], rank=r, flags=wire.F_COLLISION), "10.77.1.1"))
    pkts += [pkts[i] for i in rng.integers(0, len(pkts), len(pkts) // 3)]  # duplicated on the way
    rng.shuffle(pkts)
    m = Merger(JOB, GEN, world, "hash")
    results: dict = {}
    feed(m, pkts, results, batch)
    assert set(results) == set(range(npsn))
    for p in range(npsn):
        for lanes, _ in results[p]:
            assert np.array_equal(lanes, x[p].sum(axis=0))
    assert m.stats.results == npsn


def test_hash_mode_evicts_a_psn_waiting_on_the_switch():
    m = Merger(JOB, GEN, 3, "hash")
    res: dict = {}
    feed(m, [(packet(9, np.ones(2), rank=0, flags=wire.F_COLLISION), "10.77.1.1")], res)
    assert m.evicts_due(0.0) == []
    ev = m.evicts_due(1.0)
    assert len(ev) == 1
    h = wire.parse_header(ev[0])
    assert wire.seal_bytes(ev[0]) == ev[0]
    assert h["type"] == wire.T_EVICT and h["psn"] == 9 and h["job"] == JOB
    # the switch answers with the partial of ranks 1 and 2: done, and nothing more to evict
    feed(m, [(packet(9, np.full(2, 5), flags=wire.F_AGGREGATE, bitmap=0b110), "10.77.1.1")], res)
    assert res[9][0][0].tolist() == [6, 6] and m.evicts_due(2.0) == []


def test_hash_mode_aggregate_overflow_flag_is_kept():
    m = Merger(JOB, GEN, 2, "hash")
    res: dict = {}
    feed(m, [(packet(1, np.ones(2), flags=wire.F_AGGREGATE | wire.F_OVERFLOW, bitmap=3), "10.77.1.1")], res)
    assert res[1][0][1] & wire.F_OVERFLOW
