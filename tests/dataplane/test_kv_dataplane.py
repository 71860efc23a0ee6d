"""Key-value mode (word count through the switch): the codec, and the XDP
program loaded into the kernel and fed real packets with BPF_PROG_TEST_RUN:
claim, add, other key left for the reducer, ACK, partial forward, seen state,
flow subspaces, epochs and drains, bad packets; and random streams whose
drained aggregators plus leftovers must equal the Counter of the input."""
from __future__ import annotations

import collections
import ctypes as ct
import json
import socket
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bpf.testrun import XDP_DROP, XDP_REDIRECT, prog_test_run
from bpf import kv_wire as kv
from bpf import wire

W_MAC, SW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
W_IP, SW_IP = "10.77.1.2", "10.77.1.1"
W_PORT = 40000
R_IP, R_MAC, R_PORT = "10.77.100.2", "02:00:00:00:00:99", 40100
R_SW_IP, R_SW_MAC = "10.77.100.1", "02:00:00:00:00:9e"
KV_COLS = 64
ETH_IP_UDP = 42


# --- codec (no root) -----------------------------------------------------------

def test_constants_and_frame_limit():
    assert kv.TUPLE_BYTES == 12 and wire.KV_TUPLE_WORDS == 3
    assert wire.KV_MAX_TUPLES * wire.KV_TUPLE_WORDS <= wire.MAX_ELEMS
    assert wire.KV_MASK_WORDS * 64 >= wire.KV_MAX_TUPLES
    assert wire.KV_WINDOW & (wire.KV_WINDOW - 1) == 0  # the switch indexes the ring with psn & (W-1)
    # a full packet stays under the ~3.5 KiB XDP sees linearly on veth
    assert 14 + wire.IP_UDP_OVERHEAD + wire.HDR_LEN + wire.KV_MAX_TUPLES * kv.TUPLE_BYTES <= 3500
    assert kv.tuples_for_mtu(1500) == (1500 - 28 - wire.HDR_LEN) // 12
    assert kv.tuples_for_mtu(9000) == wire.KV_MAX_TUPLES and kv.tuples_for_mtu(40) == 0
    assert "kv_old" in wire.DROP_REASONS


def test_word_keys():
    assert kv.word_key("the") == kv.word_key("the") != kv.word_key("The")
    assert kv.word_key("héllo") == int.from_bytes(
        __import__("hashlib").blake2b("héllo".encode(), digest_size=8).digest(), "little")
    keys = kv.word_keys(["a", "b", "c", ""])
    assert keys.dtype == np.uint64 and np.all(keys != 0) and len(set(keys.tolist())) == 4


def test_merge_dictionary_reports_collisions():
    acc: dict[int, str] = {}
    assert kv.merge_dictionary(acc, {1: "x", 2: "y"}) == []
    assert kv.merge_dictionary(acc, {2: "y", 3: "z"}) == []
    assert kv.merge_dictionary(acc, {3: "w", 4: "v"}) == [(3, "z", "w")]
    assert acc == {1: "x", 2: "y", 3: "z", 4: "v"}


@pytest.mark.parametrize("n,per", [(1, 266), (266, 266), (267, 266), (1000, 37), (5, 1)])
def test_build_parse_round_trip(n, per):
    rng = np.random.default_rng(n)
    keys = rng.integers(1, 2**64 - 1, n, dtype=np.uint64)
    vals = rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64)
    rows, sizes = kv.build_kv_packets(keys, vals, per, job=3, gen=2, flow=5, psn0=2**32 - 1)
    assert len(rows) == -(-n // per)
    got_k, got_v = [], []
    for i in range(len(rows)):
        data = rows[i, : sizes[i]].tobytes()
        assert wire.csum_ok(rows[i:i + 1], sizes[i:i + 1])[0]
        h, t = kv.parse_kv(data)
        assert (h["type"], h["job"], h["gen"], h["rank"], h["psn"]) == (wire.T_KV, 3, 2, 5, (2**32 - 1 + i) % 2**32)
        assert sizes[i] == wire.HDR_LEN + 12 * len(t) and h["numel"] == 3 * len(t)
        got_k.append(t["key"])
        got_v.append(t["value"])
    assert np.array_equal(np.concatenate(got_k), keys) and np.array_equal(np.concatenate(got_v), vals)


def test_codec_refuses_bad_input():
    with pytest.raises(ValueError):
        kv.build_kv_packets([0], [1], job=1, gen=1, flow=0, psn0=0)
    with pytest.raises(ValueError):
        kv.build_kv_packets([1], [2**31], job=1, gen=1, flow=0, psn0=0)
    good = kv.build_kv_packet([5, 6], [1, 2], job=1, gen=1, flow=0, psn=0)
    bad = bytearray(good)
    bad[-1] ^= 4
    with pytest.raises(ValueError, match="csum"):
        kv.parse_kv(bytes(bad))
    with pytest.raises(ValueError, match="beyond"):
        kv.parse_kv(good[:-4])


def _compile_run(tmp_path, prog: str) -> str:
    src, exe = tmp_path / "p.c", tmp_path / "p"
    src.write_text(prog)
    subprocess.run(["gcc", "-I", str(wire.HEADER_PATH.parent), "-o", str(exe), str(src)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_kv_layouts_and_column_hash_match_c(tmp_path):
    from incd.dataplane import KV_AGG_DTYPE

    out = json.loads(_compile_run(tmp_path, r'''
#include <stdio.h>
#include <stddef.h>
#include "inc_proto.h"
#include "inc_state.h"
int main(void) {
  unsigned long long keys[] = {1, 0xffffffffffffffffULL, 0x123456789abcdef0ULL, 0x8000000000000001ULL};
  printf("{\"tuple\": [%zu, %zu, %zu, %zu], \"agg\": [%zu, %zu, %zu], \"cols\": [",
         sizeof(struct inc_kv_tuple), offsetof(struct inc_kv_tuple, key_lo), offsetof(struct inc_kv_tuple, key_hi),
         offsetof(struct inc_kv_tuple, value), sizeof(struct inc_kv_agg), offsetof(struct inc_kv_agg, key),
         offsetof(struct inc_kv_agg, value));
  for (int i = 0; i < 4; i++) printf("%s[\"%llu\", %u]", i ? "," : "", keys[i], inc_kv_col(keys[i]));
  printf("]}");
  return 0;
}'''))
    assert out["tuple"] == [kv.TUPLE_BYTES, 0, 4, 8]
    assert kv.TUPLE_DTYPE.fields["key"][1] == 0 and kv.TUPLE_DTYPE.fields["value"][1] == 8
    assert out["agg"] == [KV_AGG_DTYPE.itemsize, KV_AGG_DTYPE.fields["key"][1], KV_AGG_DTYPE.fields["value"][1]]
    for k, col in out["cols"]:
        assert int(kv.kv_col([int(k)])[0]) == col


# --- the dataplane ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dp(root):
    from incd.dataplane import Dataplane

    d = Dataplane(pool_slots=16, kv_cols=KV_COLS)
    yield d
    d.close()


def kv_job(dp, job, *, offset, cols, world=2, parts=1, gen=1, reducer=True):
    for r in range(world):
        dp.set_source(job, r, socket.inet_aton(W_IP), W_PORT, 1)
    dp.set_kv_job(job, offset=offset, cols=cols, gen=gen, world=world, parts=parts)
    dp.clear_kv(job, 0)
    dp.clear_kv(job, 1)
    if reducer:
        dp.set_ps(job, mac=bytes.fromhex(R_MAC.replace(":", "")), port_mac=bytes.fromhex(R_SW_MAC.replace(":", "")),
                  addr=socket.inet_aton(R_IP), switch_addr=socket.inet_aton(R_SW_IP), port=R_PORT, rank=0,
                  ifindex=1)
    else:
        dp.clear_ps(job)
    dp.reset_stats(job)
    return job


def kvpkt(job, gen, flow, psn, keys, vals=None, *, flags=0, typ=None, numel=None, cut=0, src=W_IP,
          sport=W_PORT, flip_bit=None) -> bytes:
    keys = np.asarray(keys, dtype=np.uint64)
    vals = np.ones(len(keys), np.int64) if vals is None else vals
    payload = kv.build_kv_packet(keys, vals, job=job, gen=gen, flow=flow, psn=psn, flags=flags)
    if typ is not None or numel is not None:
        b = bytearray(payload)
        at = wire.HDR_DTYPE.fields["numel"][1]
        if typ is not None:
            b[1] = typ
        if numel is not None:
            b[at:at + 2] = numel.to_bytes(2, "little")
        words = wire.HDR_LEN + 4 * (int.from_bytes(b[at:at + 2], "little") if numel is not None else 0)
        if numel is None or words > len(b):
            payload = wire.seal_bytes(bytes(b))
        else:  # the csum covers the words numel names, as the switch reads them
            payload = wire.seal_bytes(bytes(b[:words])) + bytes(b[words:])
    if flip_bit is not None:
        b = bytearray(payload)
        b[flip_bit // 8] ^= 1 << flip_bit % 8
        payload = bytes(b)
    pkt = bytes(Ether(src=W_MAC, dst=SW_MAC) / IP(src=src, dst=SW_IP) / UDP(sport=sport, dport=wire.PORT)
                / Raw(payload))
    return pkt[: len(pkt) - cut] if cut else pkt


def run(dp, pkt):
    return prog_test_run(dp.ingress.fd, pkt)


def flat(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if k != "drops"}
    out.update({f"drops.{k}": v for k, v in stats["drops"].items()})
    return out


class Delta:
    def __init__(self, dp, job):
        self.dp, self.job, self.before = dp, job, flat(dp.read_stats(job))

    def __call__(self):
        after = flat(self.dp.read_stats(self.job))
        d = {k: after[k] - self.before[k] for k in after if after[k] != self.before[k]}
        self.before = after
        return d


def is_ack(r, psn, absorbed, flow=0, retrans=False):
    """The switch answered with a header-only KV ACK back to the sender."""
    assert r.verdict == XDP_REDIRECT, r.verdict_name
    assert len(r.data) == ETH_IP_UDP + wire.HDR_LEN
    out = Ether(r.data)
    assert (out.src, out.dst, out[IP].src, out[IP].dst) == (SW_MAC, W_MAC, SW_IP, W_IP)
    assert (out[UDP].sport, out[UDP].dport) == (wire.PORT, W_PORT)
    assert out[IP].len == 20 + 8 + wire.HDR_LEN and out[UDP].len == 8 + wire.HDR_LEN
    chk = IP(bytes(out[IP]))
    del chk.chksum
    assert IP(bytes(chk)).chksum == out[IP].chksum
    h, t = kv.parse_kv(r.data[ETH_IP_UDP:])  # checks the csum
    assert (h["type"], h["psn"], h["rank"], h["slot"], h["numel"], len(t)) == (wire.T_KV_ACK, psn, flow, absorbed, 0, 0)
    assert bool(h["flags"] & wire.F_RETRANS) == retrans
    return True


def to_reducer(r):
    """A packet the switch sent on to the reducer: (header, leftover tuples)."""
    assert r.verdict == XDP_REDIRECT, r.verdict_name
    out = Ether(r.data)
    assert (out.dst, out.src) == (R_MAC, R_SW_MAC)
    assert (out[IP].dst, out[IP].src, out[UDP].dport, out[UDP].sport) == (R_IP, R_SW_IP, R_PORT, wire.PORT)
    chk = IP(bytes(out[IP]))
    del chk.chksum
    assert IP(bytes(chk)).chksum == out[IP].chksum
    h, t = kv.parse_kv(r.data[ETH_IP_UDP:])
    # exactly the leftovers: no absorbed tuple is left in (compacted), lengths agree
    assert len(r.data) == ETH_IP_UDP + wire.HDR_LEN + 12 * len(t) and h["numel"] == 3 * len(t)
    assert out[IP].len == len(r.data) - 14 and out[UDP].len == len(r.data) - 34
    return h, t


def agg_at(dp, job, epoch, offset, col, row):
    a = dp.read_kv(job, epoch)
    return int(a[col - offset, row]["key"]), int(a[col - offset, row]["value"])


def same_column_keys(n, *, offset, cols, parts=1, flow=0, start=1):
    """n distinct nonzero keys that all map to the same column."""
    want, out, k = None, [], start
    while len(out) < n:
        c = int(kv.column([k], offset=offset, cols=cols, parts=parts, flow=flow)[0])
        if want is None:
            want = c
        if c == want:
            out.append(k)
        k += 1
    return out, want


def test_claim_add_ack_other_key_partial_and_resends(dp):
    job, off, cols = kv_job(dp, 101, offset=0, cols=8), 0, 8
    (k1, k2, k3), col = same_column_keys(3, offset=off, cols=cols)
    d = Delta(dp, job)

    assert is_ack(run(dp, kvpkt(job, 1, 0, 0, [k1], [5])), psn=0, absorbed=1)       # claim
    assert agg_at(dp, job, 0, off, col, 0) == (k1, 5)
    assert d() == {"pkts_in": 1, "kv_absorbed": 1, "kv_claimed": 1, "kv_acks": 1}

    assert is_ack(run(dp, kvpkt(job, 1, 0, 1, [k1], [3])), psn=1, absorbed=1)       # same key adds
    assert agg_at(dp, job, 0, off, col, 0) == (k1, 8)
    assert d() == {"pkts_in": 1, "kv_absorbed": 1, "kv_acks": 1}

    h, t = to_reducer(run(dp, kvpkt(job, 1, 0, 2, [k2], [7])))                     # other key: left
    assert (h["flags"], h["slot"], t.tolist()) == (0, 0, [(k2, 7)])
    assert agg_at(dp, job, 0, off, col, 0) == (k1, 8)
    assert d() == {"pkts_in": 1, "kv_leftover": 1, "kv_to_reducer": 1}

    # partial: row 0 collides (k3 vs k1), row 1 claims, row 2 holds nothing yet either
    pkt3 = kvpkt(job, 1, 0, 3, [k3, k2, k1], [1, 2, 4])
    r3 = run(dp, pkt3)
    h, t = to_reducer(r3)
    assert (h["flags"], h["slot"], h["numel"], t.tolist()) == (wire.F_KV_PARTIAL, 2, 3, [(k3, 1)])
    assert len(r3.data) == ETH_IP_UDP + wire.HDR_LEN + 12 == len(pkt3) - 24  # absorbed tuples cut out
    assert agg_at(dp, job, 0, off, col, 1) == (k2, 2) and agg_at(dp, job, 0, off, col, 2) == (k1, 4)
    assert d() == {"pkts_in": 1, "kv_absorbed": 2, "kv_claimed": 2, "kv_leftover": 1, "kv_to_reducer": 1}
    seen = dp.read_kv_seen(job, 0)
    assert {p: e["state"] for p, e in seen.items()} == {0: "all", 1: "all", 2: "partial", 3: "partial"}
    assert (seen[3]["absorbed"], seen[3]["mask"]) == (2, 0b110)

    before = dp.read_kv(job, 0).copy()
    # resends are never added twice: a fully absorbed psn is acknowledged again,
    r = run(dp, kvpkt(job, 1, 0, 1, [k1], [3], flags=wire.F_RETRANS))
    assert is_ack(r, psn=1, absorbed=1, retrans=True)
    assert d() == {"pkts_in": 1, "kv_resent": 1, "kv_acks": 1}
    # a partial one goes to the reducer again with the same leftovers, marked as a resend
    h2, t2 = to_reducer(run(dp, kvpkt(job, 1, 0, 3, [k3, k2, k1], [1, 2, 4], flags=wire.F_RETRANS)))
    assert (h2["flags"], h2["slot"], t2.tolist()) == (wire.F_KV_PARTIAL | wire.F_RETRANS, 2, [(k3, 1)])
    assert d() == {"pkts_in": 1, "kv_resent": 1, "kv_to_reducer": 1}
    # and a duplicate without the flag (the network copied it) is recognised all the same
    assert is_ack(run(dp, kvpkt(job, 1, 0, 0, [k1], [5])), psn=0, absorbed=1)
    assert d() == {"pkts_in": 1, "kv_resent": 1, "kv_acks": 1}
    assert np.array_equal(dp.read_kv(job, 0), before)


def test_leftovers_keep_their_order(dp):
    off, cols = 60, 4
    job = kv_job(dp, 108, offset=off, cols=cols)
    ks, col = same_column_keys(7, offset=off, cols=cols)
    assert is_ack(run(dp, kvpkt(job, 1, 0, 0, ks[:4], [1, 2, 3, 4])), psn=0, absorbed=4)
    # rows: 0 collides, 1 adds, 2 collides, 3 adds, 4 claims
    pkt = kvpkt(job, 1, 0, 1, [ks[4], ks[1], ks[5], ks[3], ks[6]], [10, 20, 30, 40, 50])
    h, t = to_reducer(run(dp, pkt))
    assert (h["flags"], h["slot"], t.tolist()) == (wire.F_KV_PARTIAL, 3, [(ks[4], 10), (ks[5], 30)])
    a = dp.read_kv(job, 0)[col - off]
    assert [(int(x["key"]), int(x["value"])) for x in a[:5]] == [(ks[0], 1), (ks[1], 22), (ks[2], 3), (ks[3], 44),
                                                                 (ks[6], 50)]
    assert dp.read_kv_seen(job, 0)[1]["mask"] == 0b11010
    # the replay of that psn cuts the same tuples out
    h2, t2 = to_reducer(run(dp, pkt))
    assert (h2["slot"], t2.tolist()) == (3, t.tolist())


def test_seen_window_pending_and_old(dp):
    job = kv_job(dp, 102, offset=8, cols=8)
    d = Delta(dp, job)
    assert is_ack(run(dp, kvpkt(job, 1, 0, 5, [11])), psn=5, absorbed=1)
    # psn 5 + WINDOW takes psn 5's ring entry: 5 is then older than the window
    assert is_ack(run(dp, kvpkt(job, 1, 0, 5 + wire.KV_WINDOW, [11])), psn=5 + wire.KV_WINDOW, absorbed=1)
    assert run(dp, kvpkt(job, 1, 0, 5, [11], flags=wire.F_RETRANS)).verdict == XDP_DROP
    assert d() == {"pkts_in": 3, "kv_absorbed": 2, "kv_claimed": 1, "kv_acks": 2, "drops.kv_old": 1}
    # a psn being absorbed on another CPU right now (PENDING): a copy is dropped as dup
    k = dp._flow_key(job, 0)
    v = dp.kv_flows[k]
    e = v.ring[9 % wire.KV_WINDOW]
    e.psn, e.state = 9, wire.KV_PENDING
    dp.kv_flows[k] = v
    assert run(dp, kvpkt(job, 1, 0, 9, [11])).verdict == XDP_DROP
    assert d() == {"pkts_in": 1, "drops.dup": 1}
    assert int(dp.read_kv(job, 0)["value"].sum()) == 2
    # psn wrap: 2^32 - 1 then 0 are both new
    assert is_ack(run(dp, kvpkt(job, 1, 1, 2**32 - 1, [11])), psn=2**32 - 1, absorbed=1, flow=1)
    assert is_ack(run(dp, kvpkt(job, 1, 1, 2**32 - 1 + wire.KV_WINDOW - 2**32, [11])),
                  psn=wire.KV_WINDOW - 1, absorbed=1, flow=1)
    # seen state is per flow: flow 1's psn 5 is new
    assert is_ack(run(dp, kvpkt(job, 1, 1, 5, [11])), psn=5, absorbed=1, flow=1)
    # reset (a new run of the job) forgets everything
    dp.reset_kv_flows(job, 2)
    assert dp.read_kv_seen(job, 0) == {}


def test_two_flows_in_disjoint_subspaces(dp):
    off, cols = 16, 8
    job = kv_job(dp, 103, offset=off, cols=cols, world=2, parts=2)
    keys = list(range(100, 140))
    vals0, vals1 = np.arange(40) + 1, (np.arange(40) + 1) * 100
    for i, k in enumerate(keys):  # the same keys from both flows, one tuple a packet, row 0
        r0, r1 = run(dp, kvpkt(job, 1, 0, i, [k], [vals0[i]])), run(dp, kvpkt(job, 1, 1, i, [k], [vals1[i]]))
        # each flow has its own half of the columns: what flow 0 holds never blocks flow 1
        assert (r0.verdict, r1.verdict) == (XDP_REDIRECT, XDP_REDIRECT)
    a = dp.read_kv(job, 0)
    half = cols // 2
    got0 = collections.Counter()
    got1 = collections.Counter()
    for c in range(cols):
        if a[c, 0]["key"]:
            (got0 if c < half else got1)[int(a[c, 0]["key"])] += int(a[c, 0]["value"])
    for k, c in zip(keys, kv.column(keys, offset=off, cols=cols, parts=2, flow=0)):
        assert off <= c < off + half
    for k, c in zip(keys, kv.column(keys, offset=off, cols=cols, parts=2, flow=1)):
        assert off + half <= c < off + cols
    # flow 1's values are 100 x flow 0's for the same keys: no aggregator mixes the two flows
    assert set(got0) == set(got1) and all(got1[k] == 100 * got0[k] for k in got0)
    # parts = 1: the flows share the columns, so the same key from both adds into one aggregator
    job2 = kv_job(dp, 104, offset=24, cols=8, world=2, parts=1)
    is_ack(run(dp, kvpkt(job2, 1, 0, 0, [777], [1])), psn=0, absorbed=1)
    is_ack(run(dp, kvpkt(job2, 1, 1, 0, [777], [2])), psn=0, absorbed=1, flow=1)
    a = dp.read_kv(job2, 0)
    assert a["key"][a["key"] != 0].tolist() == [777] and int(a["value"].sum()) == 3


def test_epoch_flip_and_drain(dp):
    off, cols = 32, 4
    job = kv_job(dp, 105, offset=off, cols=cols)
    assert dp.kv_epoch(job) == 0
    for p, (k, v) in enumerate([(1001, 5), (1002, 6), (1001, 7)]):
        run(dp, kvpkt(job, 1, 0, p, [k], [v]))
    assert dp.flip_kv_epoch(job, grace_s=0) == 0 and dp.kv_epoch(job) == 1
    for p, (k, v) in enumerate([(1001, 1), (1003, 2)], start=3):
        run(dp, kvpkt(job, 1, 0, p, [k], [v]))
    keys, vals = dp.drain_kv(job, 0)
    assert sorted(zip(keys.tolist(), vals.tolist())) == [(1001, 12), (1002, 6)]
    assert dp.drain_kv(job, 0)[0].size == 0  # drained means cleared
    assert int(dp.read_kv(job, 1)["value"].sum()) == 3  # the active copy untouched
    assert dp.flip_kv_epoch(job, grace_s=0) == 1
    run(dp, kvpkt(job, 1, 0, 5, [1004], [9]))
    keys, vals = dp.drain_kv(job, 1)
    assert sorted(zip(keys.tolist(), vals.tolist())) == [(1001, 1), (1003, 2)]
    keys, vals = dp.drain_kv(job, 0)
    assert (keys.tolist(), vals.tolist()) == ([1004], [9])
    # a resend of a psn absorbed in the old epoch is not added into the new one
    assert is_ack(run(dp, kvpkt(job, 1, 0, 0, [1001], [5], flags=wire.F_RETRANS)), psn=0, absorbed=1,
                  retrans=True)
    assert dp.drain_kv(job, 0)[0].size == 0 and dp.drain_kv(job, 1)[0].size == 0
    # other jobs' columns are not touched by a drain
    neighbour = kv_job(dp, 106, offset=off + cols, cols=4)
    run(dp, kvpkt(neighbour, 1, 0, 0, [5], [5]))
    dp.drain_kv(job, 0)
    assert int(dp.read_kv(neighbour, 0)["value"].sum()) == 5


def test_full_packet(dp):
    off, cols = 40, 8
    job = kv_job(dp, 107, offset=off, cols=cols)
    rng = np.random.default_rng(7)
    keys = rng.integers(1, 2**64 - 1, wire.KV_MAX_TUPLES, dtype=np.uint64)
    vals = rng.integers(-2**31, 2**31 - 1, wire.KV_MAX_TUPLES, dtype=np.int64)
    pkt = kvpkt(job, 1, 0, 0, keys, vals)
    assert len(pkt) <= 3500
    assert is_ack(run(dp, pkt), psn=0, absorbed=wire.KV_MAX_TUPLES)  # every row was empty
    a = dp.read_kv(job, 0)
    cols_of = kv.column(keys, offset=off, cols=cols, parts=1, flow=0) - off
    assert np.array_equal(a["key"][cols_of, np.arange(wire.KV_MAX_TUPLES)], keys)
    assert np.array_equal(a["value"][cols_of, np.arange(wire.KV_MAX_TUPLES)], vals)
    # the same packet again as new data (another psn): every tuple adds; values are 64-bit
    assert is_ack(run(dp, kvpkt(job, 1, 0, 1, keys, vals)), psn=1, absorbed=wire.KV_MAX_TUPLES)
    a = dp.read_kv(job, 0)
    assert np.array_equal(a["value"][cols_of, np.arange(wire.KV_MAX_TUPLES)], 2 * vals)
    # fresh keys in the same rows: all collide and all go on, none absorbed
    keys2 = keys ^ np.uint64(1 << 40)
    keys2 = keys2[kv.column(keys2, offset=off, cols=cols, parts=1, flow=0) == cols_of + off]
    h, t = to_reducer(run(dp, kvpkt(job, 1, 0, 2, keys2, np.ones(len(keys2)))))
    assert h["flags"] == 0 and t["key"].tolist() == keys2.tolist()


def bad_cases():
    J = 110
    return [
        ("numel not whole tuples", dict(numel=4), J, "bad_len"),
        ("count beyond the packet", dict(numel=9), J, "bad_len"),
        ("tuple list cut short", dict(cut=4), J, "bad_len"),
        ("unknown job", dict(job=500), 0, "no_job"),
        ("other host as the mapper", dict(src="10.77.2.2"), J, "bad_source"),
        ("other process on the mapper's host", dict(sport=W_PORT + 1), J, "bad_source"),
        ("flow beyond world", dict(flow=2), J, "bad_rank"),
        ("old generation", dict(gen=0), J, "bad_gen"),
        ("key bit flipped", dict(flip_bit=8 * (wire.HDR_LEN + 2)), J, "bad_csum"),
        ("value bit flipped", dict(flip_bit=8 * (wire.HDR_LEN + 8) + 5), J, "bad_csum"),
        ("psn bit flipped", dict(flip_bit=8 * 8 + 1), J, "bad_csum"),
        ("data packet to a KV job", dict(typ=wire.T_DATA), 0, "bad_hdr"),
        ("ACK sent to the switch", dict(typ=wire.T_KV_ACK), 0, "bad_hdr"),
    ]


@pytest.mark.parametrize("what,mods,cjob,reason", bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_packets_dropped_by_reason(dp, what, mods, cjob, reason):
    J = kv_job(dp, 110, offset=48, cols=4)
    args = dict(job=J, gen=1, flow=0)
    args.update({k: mods.pop(k) for k in ("job", "gen", "flow") if k in mods})
    before = dp.read_stats(cjob)["drops"]
    r = run(dp, kvpkt(args["job"], args["gen"], args["flow"], 3, [42, 43], [1, 2], **mods))
    assert r.verdict == XDP_DROP, what
    after = dp.read_stats(cjob)["drops"]
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {reason: 1}
    assert not dp.read_kv(J, 0)["key"].any() and not dp.read_kv(J, 1)["key"].any()  # nothing absorbed
    assert dp.read_kv_seen(J, 0) == {}  # and nothing marked seen


def test_kv_and_other_modes_do_not_mix(dp):
    """A KV packet for a modulo job, a KV job without a reducer, no seen state for the flow."""
    dp.set_job(111, offset=0, slots=8, gen=1, world=2)
    dp.set_source(111, 0, socket.inet_aton(W_IP), W_PORT, 1)
    b = dp.read_stats(0)["drops"]["bad_hdr"]
    assert run(dp, kvpkt(111, 1, 0, 0, [1])).verdict == XDP_DROP
    assert dp.read_stats(0)["drops"]["bad_hdr"] == b + 1
    dp.clear_job(111)
    job = kv_job(dp, 112, offset=52, cols=4, reducer=False)
    d = Delta(dp, job)
    assert run(dp, kvpkt(job, 1, 0, 0, [1])).verdict == XDP_DROP
    dp.clear_kv_flows(job)
    dp.set_ps(job, mac=b"\x02" * 6, port_mac=b"\x02" * 6, addr=socket.inet_aton(R_IP),
              switch_addr=socket.inet_aton(R_SW_IP), port=R_PORT, rank=0, ifindex=1)
    assert run(dp, kvpkt(job, 1, 0, 0, [1])).verdict == XDP_DROP
    assert d() == {"pkts_in": 2, "drops.bad_source": 2}
    assert not dp.read_kv(job, 0)["key"].any()


# --- random streams: drained aggregators + leftovers == Counter(input) -------------

class Reducer:
    """What the reducer host will do with the switch's output: keep each
    (flow, psn)'s leftovers once (a replayed resend must carry the same ones)."""

    def __init__(self):
        self.left: dict[tuple[int, int], list] = {}

    def take(self, h, t):
        key = (int(h["rank"]), int(h["psn"]))
        got = t.tolist()
        if key in self.left:
            assert self.left[key] == got, "a replay carried other leftovers"
        else:
            self.left[key] = got

    def counter(self):
        c = collections.Counter()
        for tuples in self.left.values():
            for k, v in tuples:
                c[k] += v
        return c


def stream_case(dp, job, off, cols, parts, world, vocab, packets, resend_p, flip_p, seed):
    dp.set_kv_job(job, offset=off, cols=cols, gen=1, world=world, parts=parts)
    dp.clear_kv(job, 0)
    dp.clear_kv(job, 1)
    rng = np.random.default_rng(seed)
    want = collections.Counter()
    red = Reducer()
    drained = collections.Counter()
    sent = []  # (flow, psn, keys, vals)
    next_psn = [0] * world
    d = Delta(dp, job)
    acks = 0
    for ntup in packets:
        flow = int(rng.integers(world))
        # a mapper combines its batch: distinct keys within a packet
        keys = rng.choice(vocab, size=min(ntup, len(vocab)), replace=False).astype(np.uint64)
        vals = rng.integers(-1000, 1000, len(keys))
        psn = next_psn[flow]
        next_psn[flow] += 1
        for k, v in zip(keys.tolist(), vals.tolist()):
            want[k] += v
        sent.append((flow, psn, keys, vals))
        todo = [(flow, psn, keys, vals, 0)]
        if sent and rng.random() < resend_p:  # a resend of a recent psn of some flow (within the window)
            f2, p2, k2, v2 = sent[int(rng.integers(max(0, len(sent) - 20), len(sent)))]
            todo.append((f2, p2, k2, v2, wire.F_RETRANS))
        for f, p, k, v, fl in todo:
            r = run(dp, kvpkt(job, 1, f, p, k, v, flags=fl))
            assert r.verdict == XDP_REDIRECT, r.verdict_name
            if len(r.data) == ETH_IP_UDP + wire.HDR_LEN:
                h, t = kv.parse_kv(r.data[ETH_IP_UDP:])
                assert h["type"] == wire.T_KV_ACK and h["slot"] == len(k)
                acks += 1
            else:
                h, t = to_reducer(r)
                red.take(h, t)
        if rng.random() < flip_p:
            old = dp.flip_kv_epoch(job, grace_s=0)
            ks, vs = dp.drain_kv(job, old)
            for kk, vv in zip(ks.tolist(), vs.tolist()):
                drained[kk] += vv
    for e in (0, 1):
        ks, vs = dp.drain_kv(job, e)
        for kk, vv in zip(ks.tolist(), vs.tolist()):
            drained[kk] += vv
    total = collections.Counter()
    for c in (drained, red.counter()):
        for k, v in c.items():
            total[k] += v
    assert {k: v for k, v in total.items() if v} == {k: v for k, v in want.items() if v}
    st = d()
    ntuples = sum(len(s[2]) for s in sent)
    assert st.get("kv_absorbed", 0) + st.get("kv_leftover", 0) == ntuples
    assert st.get("kv_acks", 0) == acks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=hs.integers(0, 2**32 - 1), cols=hs.sampled_from([1, 2, 3, 8]), parts=hs.sampled_from([1, 2]),
       world=hs.integers(1, 3), vocab=hs.integers(1, 60), npk=hs.integers(1, 40),
       maxt=hs.sampled_from([1, 5, 40, wire.KV_MAX_TUPLES]), resend_p=hs.sampled_from([0.0, 0.3]),
       flip_p=hs.sampled_from([0.0, 0.2]))
def test_random_streams_counted_exactly(dp, seed, cols, parts, world, vocab, npk, maxt, resend_p, flip_p):
    parts = min(parts, cols)
    job = 120
    for r in range(world):
        dp.set_source(job, r, socket.inet_aton(W_IP), W_PORT, 1)
    if not dp.job_ps[ct.c_int(job)].ifindex:
        kv_job(dp, job, offset=56, cols=8)
    rng = np.random.default_rng(seed)
    voc = np.unique(rng.integers(1, 2**64 - 1, vocab, dtype=np.uint64))
    packets = rng.integers(1, maxt + 1, npk).tolist()
    stream_case(dp, job, 56, cols, parts, world, voc, packets, resend_p, flip_p, seed)
