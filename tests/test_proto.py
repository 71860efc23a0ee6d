import numpy as np
import pytest

from hostagent import proto


def test_constants_come_from_the_header():
    text = proto.HEADER_PATH.read_text()
    assert f"#define INC_MAX_ELEMS {proto.MAX_ELEMS}" in text
    assert proto.DROP_REASONS[:3] == ["bad_hdr", "bad_len", "no_job"]
    assert len(proto.DROP_REASONS) == proto.C["INC_DROP__COUNT"]


@pytest.mark.parametrize("n,elems", [(1, 800), (800, 800), (801, 800), (2501, 362), (7, 3)])
def test_build_packets_round_trip(n, elems):
    x = np.arange(n, dtype=np.int32) * 7 - 3
    buf, sizes = proto.build_packets(x, elems, job=12, gen=3, rank=2, psn0=2**32 - 2)
    npk = -(-n // elems)
    assert len(buf) == len(sizes) == npk
    got = []
    for i in range(npk):
        pkt = buf[i : i + 1].tobytes()[: sizes[i]]
        h = proto.HDR_STRUCT.unpack_from(pkt)
        version, typ, flags, op, job, gen, psn, slot, rank, numel, _, _ = h
        assert (version, typ, flags, op, job, gen, rank) == (proto.VERSION, proto.T_DATA, 0, proto.OP_SUM, 12, 3, 2)
        assert psn == (2**32 - 2 + i) & 0xFFFFFFFF  # wraps
        assert sizes[i] == proto.HDR_LEN + 4 * numel
        got.append(np.frombuffer(pkt, "<i4", numel, proto.HDR_LEN))
    assert np.array_equal(np.concatenate(got), x)


def test_elems_for_mtu():
    assert proto.elems_for_mtu(1500) == (1500 - 28 - proto.HDR_LEN) // 4
    assert proto.elems_for_mtu(9000) == proto.MAX_ELEMS
    assert proto.elems_for_mtu(40) == 0
