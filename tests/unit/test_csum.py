"""The packet csum (bpf/csum_helpers.h; Python's side in bpf/wire.py): word j
of header and lanes weighs 2j + 1 and the weighted words sum to 0 mod 2^32.
Checked against a plain-Python reading of that definition, and for what it
must catch: every single-bit error, swapped lanes, and compensating changes
that a plain sum of the words misses."""
import numpy as np

from bpf import wire


def weighted(words) -> int:
    return sum((2 * j + 1) * int(w) for j, w in enumerate(words)) % 2**32


def packet(lanes, psn=7) -> bytearray:
    buf, sizes = wire.build_packets(np.asarray(lanes, np.int32), len(lanes), job=5, gen=2, rank=1, psn0=psn)
    return bytearray(buf.tobytes()[: int(sizes[0])])


def ok(pkt: bytes) -> bool:
    a = np.frombuffer(bytes(pkt), np.uint8)
    return bool(wire.csum_ok(a[None, :], np.array([a.size]))[0])


def words(pkt) -> np.ndarray:
    return np.frombuffer(bytes(pkt), "<u4")


def test_sealed_packets_meet_the_definition():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 8, 9, 100, wire.MAX_ELEMS):
        p = packet(rng.integers(-2**31, 2**31, n))
        assert weighted(words(p)) == 0 and ok(p)
        assert wire.seal_bytes(bytes(p)) == bytes(p)
        assert int(wire.lane_sums(np.frombuffer(bytes(p), wire.packet_dtype(n)))[0]) == \
            sum((2 * (8 + k) + 1) * int(w) for k, w in enumerate(words(p)[8:])) % 2**32


def test_every_single_bit_error_is_caught():
    p = packet(np.arange(-20, 20))
    for bit in range(len(p) * 8):
        q = bytearray(p)
        q[bit // 8] ^= 1 << (bit % 8)
        assert not ok(q), bit


def test_swapped_lanes_and_compensating_changes_are_caught():
    lanes = np.array([5, 9, -3, 1 << 20, 0, 77], np.int32)
    p = packet(lanes)
    sw = lanes.copy()
    sw[[1, 4]] = sw[[4, 1]]
    q = bytearray(p)
    q[wire.HDR_LEN:] = sw.tobytes()
    assert words(q).sum(dtype=np.uint64) % 2**32 == words(p).sum(dtype=np.uint64) % 2**32  # a plain sum passes
    assert not ok(q)
    h = wire.parse_header(bytes(p))
    q = bytearray(p)
    q[8:12] = (int(h["psn"]) + 1).to_bytes(4, "little")           # psn + 1 ...
    q[wire.HDR_LEN:wire.HDR_LEN + 4] = np.int32(lanes[0] - 1).tobytes()  # ... and a lane - 1
    assert words(q).sum(dtype=np.uint64) % 2**32 == words(p).sum(dtype=np.uint64) % 2**32
    assert not ok(q)


def test_what_it_misses_is_what_the_docs_say():
    """Changes whose weighted sum is 0 mod 2^32 pass: +x(2k+1) at word i with
    -x(2i+1) at word k (documented in docs/design.md)."""
    p = packet(np.zeros(10))
    w = words(p).copy()
    i, k, x = 9, 12, 3
    w[i] = (int(w[i]) + x * (2 * k + 1)) % 2**32
    w[k] = (int(w[k]) - x * (2 * i + 1)) % 2**32
    assert ok(w.tobytes())
