import random

import pytest

from incd.allocator import AllocError, RegionAllocator


def test_first_fit_and_coalescing():
    a = RegionAllocator(100)
    x, y, z = a.alloc(30), a.alloc(30), a.alloc(40)
    assert (x, y, z) == (0, 30, 60)
    with pytest.raises(AllocError, match="full"):
        a.alloc(1)
    a.free(30)
    a.free(0)
    assert a.largest_free() == 60  # the two holes merged
    assert a.alloc(60) == 0


def test_random_alloc_free_never_overlaps():
    rng = random.Random(7)
    a = RegionAllocator(1000)
    live = {}
    for _ in range(5000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            a.free(off)
            del live[off]
        else:
            n = rng.randint(1, 120)
            try:
                off = a.alloc(n)
            except AllocError:
                assert a.largest_free() < n
                continue
            live[off] = n
        spans = sorted(live.items())
        for (o1, n1), (o2, _) in zip(spans, spans[1:]):
            assert o1 + n1 <= o2
        assert all(0 <= o and o + n <= 1000 for o, n in spans)
        assert a.free_slots() == 1000 - sum(live.values())
    for off in list(live):
        a.free(off)
    assert a.largest_free() == 1000


def test_bad_requests():
    a = RegionAllocator(10)
    with pytest.raises(AllocError):
        a.alloc(0)
    with pytest.raises(AllocError):
        a.free(3)


def test_reserve_and_fits_if_moved():
    a = RegionAllocator(100)
    a.reserve(10, 20)
    assert a.alloc(10) == 0 and a.alloc(15) == 30
    with pytest.raises(AllocError):
        a.reserve(25, 10)  # overlaps the reserved region
    # 10..29 can grow to 25 only by moving into the free tail; 70 cannot fit anywhere
    assert a.fits_if_moved(10, 55) and not a.fits_if_moved(10, 70)
    assert a.regions() == {0: 10, 10: 20, 30: 15}  # unchanged by the question


def test_lower_fit_finds_compacting_moves():
    a = RegionAllocator(100)
    x, y, z = a.alloc(20), a.alloc(20), a.alloc(20)
    a.free(x)
    assert a.lower_fit(z) == 0       # z fits in the hole at 0
    assert a.lower_fit(y) == 0       # so does y (it would merge with its own space)
    a.free(y)
    assert a.lower_fit(z) == 0
    assert a.regions() == {40: 20}
    b = RegionAllocator(50)
    p, q = b.alloc(30), b.alloc(20)
    assert b.lower_fit(q) is None    # nothing lower is free
