"""Word count agents (inc-agent kv-map / kv-reduce): the pure logic without root
(tokenizer, combining into int32 tuples, the mapper's window and ACK parsing, the
reducer's dedupe, merge and collision handling), and the whole job in the lab:
three mappers and a reducer through the real switch and incd, also under loss,
duplication and reordering, checked against collections.Counter."""
from __future__ import annotations

import collections
import json
import random
import subprocess

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostagent import kv_flow, kv_merge, kv_messages
from hostagent import words as kv_words
from bpf import kv_wire as kv
from bpf import wire
from netns_lab.impair import read_counters

# --- tokenizer and combiner ---------------------------------------------------------


@pytest.mark.unit
def test_tokenize():
    assert kv_words.tokenize("The cat, the CAT's hat -- 42x_y!") == ["the", "cat", "the", "cat", "s", "hat", "42x", "y"]
    assert kv_words.tokenize("Ünïcode naïve café\tÉTÉ\n") == ["ünïcode", "naïve", "café", "été"]
    assert kv_words.tokenize("  ...  ") == [] and kv_words.tokenize("") == []


@pytest.mark.unit
def test_read_chunks_never_split_words(tmp_path):
    p = tmp_path / "t.txt"
    lines = [" ".join(f"w{i}x{j}é" for j in range(7)) for i in range(500)]
    p.write_text("\n".join(lines) + "\n")
    chunks = list(kv_words.read_chunks(str(p), 100))
    assert len(chunks) > 10 and b"".join(chunks) == p.read_bytes()
    assert sum((kv_words.count_words(c) for c in chunks), collections.Counter()) == \
        collections.Counter(w.encode() for w in kv_words.tokenize(p.read_text()))


@pytest.mark.unit
def test_read_chunks_cuts_a_long_line(tmp_path):
    """One 10 MB line is read in pieces of about chunk_bytes, not whole (the
    mapper's heartbeat stalls while one piece is counted)."""
    p = tmp_path / "line.txt"
    p.write_bytes(b"alpha beta, gamma " * 600_000)
    chunks = list(kv_words.read_chunks(str(p), 1 << 20))
    assert len(chunks) >= 10 and max(map(len, chunks)) <= 2 << 20
    assert sum((kv_words.count_words(c) for c in chunks), collections.Counter()) == \
        {b"alpha": 600_000, b"beta": 600_000, b"gamma": 600_000}


# the pieces that decide a cut: word characters, every ASCII separator (some of
# them case-ignorable next to a final sigma), combining marks, broken UTF-8
_CHUNK_TEXT = st.lists(st.sampled_from(["Σ", "Α", "a", "9", "é", "e\u0301", "İ", "日", "_", "\n", " ", "'", ".",
                                        ":", "^", "`", ",", "\x1c", "\x85", "\u3000"]).map(str.encode)
                       | st.binary(max_size=3), max_size=40)


@pytest.mark.unit
@settings(max_examples=500, deadline=None)
@given(_CHUNK_TEXT, st.integers(1, 8), st.sampled_from(kv_words.SPLITS))
@example([b"\xce\x91\xce\xa3.\xce\x91"], 5, "words")  # "ΑΣ.Α" cut after the '.': Σ would lower as final
@example([b"a,b\x1cc"], 2, "whitespace")  # a cut after ',' would make "a," and "b" of "a,b"
def test_read_chunks_count_as_the_whole(tmp_path_factory, parts, size, split):
    """Wherever read_chunks cuts, counting the pieces gives the whole text's words."""
    raw = b"".join(parts)
    p = tmp_path_factory.mktemp("c") / "t.bin"
    p.write_bytes(raw)
    chunks = list(kv_words.read_chunks(str(p), size, split))
    assert b"".join(chunks) == raw and all(chunks)
    assert sum((kv_words.count_words(c, split) for c in chunks), collections.Counter()) == kv_words.count_words(raw, split)


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=200)
       | st.text(max_size=60) | st.binary(max_size=80))
def test_count_words_is_tokenize(text):
    """The ASCII fast path and the Unicode path give tokenize()'s words, or
    str.split()'s with split "whitespace" (bytes as the mapper reads them:
    invalid UTF-8 replaced)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
    decoded = raw.decode("utf-8", errors="replace")
    assert kv_words.count_words(raw) == collections.Counter(w.encode() for w in kv_words.tokenize(decoded))
    assert kv_words.count_words(raw, "whitespace") == collections.Counter(w.encode() for w in decoded.split())


@pytest.mark.unit
def test_split_counts_big_values():
    M = kv_words.INT32_MAX
    k, v = kv_words.split_counts(np.array([5, 6, 7], np.uint64), np.array([3, 2 * M + 5, M], np.int64))
    assert k.tolist() == [5, 6, 6, 6, 7] and v.tolist() == [3, M, M, 5, M] and v.dtype == np.int32
    k, v = kv_words.split_counts(np.array([9], np.uint64), np.array([M + 1]))
    assert (k.tolist(), v.tolist()) == ([9, 9], [M, 1])
    with pytest.raises(ValueError):
        kv_words.split_counts(np.array([1], np.uint64), np.array([0]))


@pytest.mark.unit
def test_word_source_keys_dictionary_and_own_collisions():
    src = kv_words.WordSource([])
    k, v = src.add(collections.Counter({b"a": 3, "b".encode(): 2**32}))
    got = collections.defaultdict(int)
    for kk, vv in zip(k.tolist(), v.tolist()):
        got[kk] += vv
    assert got == {kv.word_key("a"): 3, kv.word_key("b"): 2**32} and v.dtype == np.int32
    assert src.dictionary == {kv.word_key("a"): "a", kv.word_key("b"): "b"} and src.collisions == []
    # each word is hashed once, however many chunks it is in
    calls = []
    src2 = kv_words.WordSource([], key_fn=lambda w: calls.append(w) or (7 if w in "xy" else 8))
    src2.add(collections.Counter({b"x": 1, b"y": 1, b"z": 1}))
    src2.add(collections.Counter({b"x": 2, "ü".encode(): 1}))
    assert sorted(calls) == ["x", "y", "z", "ü"]
    # "x" and "y" share key 7 (so do "z" and "ü", key 8): the mapper itself notices
    assert src2.collisions == [(7, "x", "y"), (8, "z", "ü")]


@pytest.mark.unit
def test_map_file_equals_counter(tmp_path):
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(300)] + ["Äpfel", "don't"]
    text = "\n".join(" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(400))
    p = tmp_path / "in.txt"
    p.write_text(text)
    keys, vals, d, col, words = kv_words.map_file([str(p)], chunk_bytes=1000)
    want = collections.Counter(kv_words.tokenize(text))
    got = collections.Counter()
    for k, v in zip(keys.tolist(), vals.tolist()):
        got[d[k]] += v
    assert got == want and words == sum(want.values()) and not col
    assert keys.size > len(want)  # combined per chunk, not per file


# --- mapper window and ACKs -----------------------------------------------------------


@pytest.mark.unit
def test_ack_window_send_ack_resend():
    w = kv_flow.AckWindow(10, 4)
    assert w.to_send() == (0, 4)
    w.mark_sent(0, 4, now=1.0)
    assert w.to_send() == (4, 4)  # window full
    assert w.ack([1, 2, 2, 99]).tolist() == [1, 2]  # dup counted once, unknown psn ignored
    assert w.base == 0 and w.to_send() == (4, 4)  # psn 0 still missing: no sliding
    assert w.due(now=1.01, rto=0.05).size == 0
    assert w.due(now=1.2, rto=0.05).tolist() == [0, 3]
    assert w.ack([0]).tolist() == [0] and w.base == 3 and w.to_send() == (4, 7)
    w.mark_sent(4, 7, now=2.0)
    assert w.ack([3, 4, 5, 6]).size == 4 and w.base == 7
    w.mark_sent(*w.to_send(), now=3.0)
    assert w.ack([7, 8, 9]).size == 3 and w.finished and w.ack([9]).size == 0
    with pytest.raises(ValueError):
        kv_flow.AckWindow(5, wire.KV_WINDOW + 1)


@pytest.mark.unit
def test_ack_window_grows_as_the_mapper_maps():
    w = kv_flow.AckWindow(0, 3)
    assert w.finished and w.idle and w.to_send() == (0, 0)
    w.extend(2)
    assert not w.finished and w.to_send() == (0, 2)
    w.mark_sent(0, 2, now=1.0)
    assert not w.idle and w.ack([0, 1]).size == 2 and w.finished and w.idle and w.base == 2
    w.extend(5)
    assert w.to_send() == (2, 5) and not w.finished
    w.mark_sent(2, 5, now=2.0)
    assert w.ack([3]).tolist() == [3] and w.base == 2 and w.due(2.1, 0.05).tolist() == [2, 4]
    assert w.ack([2, 4]).size == 2 and w.base == 5 and w.to_send() == (5, 7)


@pytest.mark.unit
def test_row_packer_places_each_key_at_its_row_hot_first():
    per = 7
    rng = np.random.default_rng(3)
    keys = rng.integers(1, 2**63, 200, dtype=np.uint64)
    vals = rng.integers(1, 1000, 200)
    p = kv.RowPacker(per)
    p.add(keys[:120], vals[:120])
    gk1, gv1 = p.take()
    rows = kv.kv_row(keys[:120], per)
    assert gk1.shape[0] == np.bincount(rows, minlength=per).min() > 0  # only full packets
    assert (gk1 != 0).all()
    p.add(keys[120:], vals[120:])
    gk2, gv2 = p.take(final=True)
    assert len(p) == 0 and (gk2 == 0).any()  # the last packets are padded
    gk, gv = np.concatenate([gk1, gk2]), np.concatenate([gv1, gv2])
    used = gk != 0
    # every tuple once, each at its key's row
    assert sorted(zip(gk[used].tolist(), gv[used].tolist())) == sorted(zip(keys.tolist(), vals.tolist()))
    assert (kv.kv_row(gk[used], per) == np.nonzero(used)[1]).all()
    # within a row the first add()'s tuples come first, larger values before smaller
    first = set(keys[:120].tolist())
    for r in range(per):
        col = [(k, v) for k, v in zip(gk[:, r].tolist(), gv[:, r].tolist()) if k]
        tags = [k in first for k, _ in col]
        assert tags == sorted(tags, reverse=True)
        v1 = [v for k, v in col if k in first]
        assert v1 == sorted(v1, reverse=True)
    with pytest.raises(ValueError):
        p.add([0], [1])


@pytest.mark.unit
def test_grid_packets_cut_trailing_padding():
    gk = np.array([[5, 0, 6, 0], [0, 0, 0, 9], [0, 3, 0, 0]], np.uint64)
    gv = np.array([[1, 0, 2, 0], [0, 0, 0, 4], [0, -7, 0, 0]], np.int64)
    rows, sizes = kv.build_kv_grid(gk, gv, job=2, gen=1, flow=1, psn0=10)
    assert (sizes - wire.HDR_LEN).tolist() == [3 * kv.TUPLE_BYTES, 4 * kv.TUPLE_BYTES, 2 * kv.TUPLE_BYTES]
    for i in range(3):
        h, t = kv.parse_kv(rows[i, :sizes[i]].tobytes())  # sealed: the csum holds
        assert int(h["psn"]) == 10 + i
        want = [(int(k), int(v)) for k, v in zip(gk[i], gv[i]) if k]
        assert list(zip(t["key"].tolist(), t["value"].tolist())) == want


@pytest.mark.unit
def test_dictionary_line_round_trip_and_bad_lines():
    d = {kv.word_key(w): w for w in ["a", "naïve", "42"]}
    line = kv_messages.dictionary_line(4, 2, d, [(7, "x", "y")])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    flow, keys, words, col = kv_messages.parse_dictionary(line, 4)
    assert flow == 2 and dict(zip(keys, words)) == d and col == [(7, "x", "y")]
    assert kv_messages.parse_dictionary(kv_messages.dictionary_line(4, 0, {}), 4) == (0, [], [], [])
    for bad in [b"{}", b"[1]", b"not json", kv_messages.dictionary_line(5, 0, d),
                b'{"job": 4, "flow": 0, "keys": "AAAA", "words": "a"}',          # 3 bytes of keys
                b'{"job": 4, "flow": 0, "keys": "!!!!", "words": "a"}',          # not base64
                b'{"job": 4, "flow": 0, "keys": "AQAAAAAAAAA=", "words": "a\\nb"}',  # 1 key, 2 words
                b'{"job": 4, "flow": true, "keys": "", "words": ""}',
                b'{"job": 4, "flow": 0, "keys": "", "words": "", "collisions": [["x", "a", "b"]]}']:
        with pytest.raises(ValueError):
            kv_messages.parse_dictionary(bad, 4)


@pytest.mark.unit
def test_part_owners_hottest_claims_and_the_switch_column():
    per, cols, parts, flow = 5, 12, 3, 2
    own = kv.PartOwners(per, cols // parts)
    rng = np.random.default_rng(9)
    keys = rng.integers(1, 2**64 - 1, 400, dtype=np.uint64)
    vals = rng.integers(1, 100, 400)
    # the aggregator's column is the one the switch computes (kv.column, from inc_kv_col)
    col = kv.column(keys, offset=7, cols=cols, parts=parts, flow=flow) - 7 - (flow % parts) * (cols // parts)
    assert (own.index(keys) % (cols // parts) == col).all()
    assert (own.index(keys) // (cols // parts) == kv.kv_row(keys, per)).all()
    held = own.claim(keys, vals)
    assert own.claimed == len(set(own.index(keys).tolist())) == held.sum()
    for a in set(own.index(keys).tolist()):  # each aggregator to its hottest key (first of equals)
        mine = np.nonzero(own.index(keys) == a)[0]
        best = mine[np.argmax(vals[mine])]
        assert own.owner[a] == keys[best] and held[best]
    # later chunks: the holders are still held, newcomers find everything taken
    again = own.claim(np.append(keys[held], np.uint64(12345)), np.append(vals[held], 10**6))
    assert again[:-1].all() and (again[-1] == (own.owner[own.index([12345])[0]] == 12345))


def _rows(pkts):
    width = max(len(p) for p in pkts) + 8
    rows = np.zeros((len(pkts), width), np.uint8)
    for i, p in enumerate(pkts):
        rows[i, :len(p)] = np.frombuffer(p, np.uint8)
    return rows, np.array([len(p) for p in pkts])


@pytest.mark.unit
def test_parse_acks_and_reducer_ack_format():
    a = kv_messages.build_ack(job=3, gen=2, flow=1, psn=5, tuples=4)
    h, t = kv.parse_kv(a)  # csum ok, header only
    assert (h["type"], h["job"], h["gen"], h["rank"], h["psn"], h["slot"], h["numel"], len(t)) == \
        (wire.T_KV_ACK, 3, 2, 1, 5, 4, 0, 0)
    bad = bytearray(kv_messages.build_ack(job=3, gen=2, flow=1, psn=6))
    bad[8] ^= 1
    pkts = [a, kv_messages.build_ack(job=3, gen=1, flow=1, psn=7), kv_messages.build_ack(job=3, gen=2, flow=0, psn=8),
            kv_messages.build_ack(job=4, gen=2, flow=1, psn=9), bytes(bad), kv_messages.build_ack(job=3, gen=2, flow=1, psn=50),
            kv.build_kv_packet([1], [1], job=3, gen=2, flow=1, psn=10), kv_messages.build_ack(job=3, gen=2, flow=1, psn=11)]
    rows, lens = _rows(pkts)
    assert kv_messages.parse_acks(rows, lens, job=3, gen=2, flow=1, n=20).tolist() == [5, 11]


# --- reducer state ------------------------------------------------------------------------


def leftover(flow, psn, pairs, *, job=9, gen=4, flags=0):
    k = [kv.word_key(w) for w, _ in pairs]
    return kv.build_kv_packet(k, [c for _, c in pairs], job=job, gen=gen, flow=flow, psn=psn, flags=flags)


@pytest.mark.unit
def test_reducer_dedupe_drain_and_merge():
    s = kv_merge.ReducerState(job=9, gen=4, mappers=2)
    assert s.packet(leftover(0, 0, [("a", 2), ("b", 1)])) == (0, 0, 2)
    assert s.packet(leftover(0, 0, [("a", 2), ("b", 1)], flags=wire.F_RETRANS)) == (0, 0, 2)  # replay
    assert s.packet(leftover(1, 0, [("a", 5)], flags=wire.F_KV_PARTIAL)) == (1, 0, 1)  # other flow, same psn
    assert s.packet(leftover(1, 0, [("a", 5)])) == (1, 0, 1)  # duplicate: ACKed, not added
    assert s.packet(leftover(1, 1, [], flags=wire.F_KV_PARTIAL)) == (1, 1, 0)
    assert s.packet(leftover(0, 1, [("a", 1)], gen=3)) is None  # older run
    assert s.packet(leftover(0, 1, [("a", 1)], job=8)) is None
    assert s.packet(leftover(2, 1, [("a", 1)])) is None  # no such mapper
    assert s.packet(b"\x01" * 10) is None
    assert (s.s.leftover_packets, s.s.dup_packets, s.s.bad_packets, s.s.partial_packets) == (3, 2, 4, 2)
    s.drained([kv.word_key("a"), kv.word_key("c")], [10, 7])
    s.drained([], [])
    assert not s.complete
    s.dictionary(0, {str(kv.word_key("a")): "a", str(kv.word_key("b")): "b"})
    s.dictionary(1, {kv.word_key("a"): "a", kv.word_key("c"): "c"})
    s.dictionary(1, {kv.word_key("a"): "a"})  # the same mapper again: no effect
    assert s.complete
    counts, col = s.counts()
    assert counts == {"a": 17, "b": 1, "c": 7} and col == []
    assert (s.s.drains, s.s.drain_total, s.s.leftover_total, s.s.words) == (2, 17, 8, 3)


@pytest.mark.unit
def test_reducer_batch_is_packet_by_packet():
    """packets() on a batch (as the reducer receives them) does what packet() does
    one at a time; key-0 places (padding) are not tuples; acks come out sealed."""
    gk = np.array([[0, kv.word_key("p"), 0]], np.uint64)
    rows_g, sizes_g = kv.build_kv_grid(gk, np.array([[0, 3, 0]]), job=9, gen=4, flow=1, psn0=7)
    pkts = [leftover(0, 0, [("a", 2), ("b", 1)]), leftover(0, 0, [("a", 2)]), b"\x01" * 10,
            leftover(1, 3, [("c", 4)], gen=3), rows_g[0, :sizes_g[0]].tobytes(), leftover(1, 4, [("a", 1)])]
    one = kv_merge.ReducerState(job=9, gen=4, mappers=2)
    want = [r for r in (one.packet(p) for p in pkts) if r is not None]
    many = kv_merge.ReducerState(job=9, gen=4, mappers=2)
    rows, lens = _rows(pkts)
    assert many.packets(rows, lens) == want == [(0, 0, 2), (0, 0, 1), (1, 7, 2), (1, 4, 1)]
    assert one.s == many.s and (many.s.leftover_tuples, many.s.leftover_total, many.s.dup_packets,
                                many.s.bad_packets) == (4, 7, 1, 2)
    acks = kv_messages.build_acks(job=9, gen=4, flows=[0, 1], psns=[0, 2**32 + 5], tuples=[2, 0])
    assert kv_messages.parse_acks(acks, np.full(2, acks.shape[1]), job=9, gen=4, flow=1, n=10).tolist() == [5]
    assert acks[0].tobytes() == kv_messages.build_ack(job=9, gen=4, flow=0, psn=0, tuples=2)


@pytest.mark.unit
def test_reducer_collision_reported_never_merged():
    s = kv_merge.ReducerState(job=1, gen=1, mappers=3)
    s.packet(kv.build_kv_packet([7, 8], [2, 3], job=1, gen=1, flow=0, psn=0))
    s.drained([7], [10])
    s.dictionary(0, {"7": "x", "8": "y"})
    s.dictionary(1, {"7": "other"})           # key 7 claimed by a second word
    s.dictionary(2, {"7": "third"}, [["8", "y", "why"]])  # and a mapper's own collision on 8
    counts, col = s.counts()
    assert counts == {}  # neither 7 nor 8 is counted under any word
    assert sorted(col) == [(7, "x", "other"), (7, "x", "third"), (8, "y", "why")]
    with pytest.raises(kv_messages.KVError, match="flow 5"):
        s.dictionary(5, {})


@pytest.mark.unit
def test_reducer_key_without_word_is_an_error():
    s = kv_merge.ReducerState(job=1, gen=1, mappers=1)
    s.drained([kv.word_key("a"), 12345], [1, 2])
    s.dictionary(0, {kv.word_key("a"): "a"})
    with pytest.raises(kv_messages.KVError, match="no word"):
        s.counts()


# --- the job in the lab ---------------------------------------------------------------------

def make_corpus(tmp_path, mappers, seed, lines=1500, vocab=3000):
    """Zipf-ish text per mapper: a few very common words (absorbed by the switch),
    a long tail (many leftovers), mixed case and punctuation."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)] + ["The", "tHe", "naïve", "café", "don't", "x_y", "42"]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    files, total = [], collections.Counter()
    for m in range(mappers):
        text = "\n".join(" ".join(rng.choices(words, weights, k=12)) + rng.choice([".", ",", "!", ""])
                         for _ in range(lines)) + "\n"
        p = tmp_path / f"in{m}.txt"
        p.write_text(text, encoding="utf-8")
        files.append(str(p))
        total += collections.Counter(kv_words.tokenize(text))
    return files, total


def run_wordcount(lab, tmp_path, job, files, *, window=64, timeout=180, map_args=()):
    from netns_lab import agents

    out = tmp_path / f"counts{job}.json"
    try:
        maps, red = agents.run_wordcount(lab, job=job, files=files, out=str(out), timeout=timeout,
                                         map_args=["--window", str(window), *map_args])
    except agents.AgentRunError as e:
        raise AssertionError(str(e)) from None
    return maps, red, json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def kvlab(root):
    from netns_lab.harness import LabWithIncd

    with LabWithIncd("k", workers=3, ps=True) as lab:
        yield lab


def test_wordcount_exact(kvlab, tmp_path):
    files, want = make_corpus(tmp_path, 3, seed=1)
    # small chunks: the same key is sent in many packets, at the same row each time
    maps, red, counts = run_wordcount(kvlab, tmp_path, 80, files, map_args=["--chunk-kb", "16"])
    assert counts == dict(want)
    assert red["collisions"] == [] and red["dictionaries"] == 3
    # both paths did work: the switch absorbed most, the tail went to the reducer
    assert red["drain_total"] > 0 and red["leftover_total"] > 0
    assert red["drain_total"] + red["leftover_total"] == sum(want.values())
    assert sum(m["acks_switch"] for m in maps) > 0 and sum(m["acks_reducer"] for m in maps) > 0
    assert sum(m["packets"] for m in maps) == sum(m["acks_switch"] + m["acks_reducer"] for m in maps)
    # each mapper has a part of its own and knew which keys hold an aggregator there:
    # what it sent through the switch was all absorbed, the rest came straight
    for m in maps:
        assert m["route"] == "owned" and 0 < m["claimed"] <= m["aggregators"]
        assert m["acks_switch"] == m["packets_to_switch"] > 0, m
        assert m["tuples_to_switch"] > 2 * m["claimed"]  # keys came back chunk after chunk: all absorbed
    assert red["partial_packets"] == 0
    assert red["leftover_tuples"] == sum(m["tuples"] - m["tuples_to_switch"] for m in maps)
    fin = [j for j in kvlab.incd.status()["finished"] if j["job"] == 80][-1]
    assert fin["end_reason"] == "the reducer finished"
    # (the switch counts the padding places, key 0, as absorbed)
    assert fin["counters"]["kv_leftover"] == 0 and fin["counters"]["kv_absorbed"] == \
        sum(m["tuples_to_switch"] + m["padding"] for m in maps)


def test_wordcount_all_via_switch_small_part(kvlab, tmp_path):
    """--all-via-switch with few columns: every tuple goes through the switch at its
    key's row, the keys that find their aggregator taken are passed on to the
    reducer (partial packets), and the counts are exact."""
    files, want = make_corpus(tmp_path, 3, seed=7, lines=600)
    maps, red, counts = run_wordcount(kvlab, tmp_path, 86, files, map_args=["--all-via-switch", "--cols", "3"])
    assert counts == dict(want)
    assert all(m["route"] == "switch" and m["tuples_to_switch"] == m["tuples"] for m in maps)
    assert red["partial_packets"] > 0 and red["drain_total"] > 0 and red["leftover_total"] > 0
    c = [j for j in kvlab.incd.status()["finished"] if j["job"] == 86][-1]
    assert c["cols"] == 3 and c["counters"]["kv_leftover"] == red["leftover_tuples"]


def test_wordcount_direct_switch_aggregation_off(kvlab, tmp_path):
    """kv-map --direct (the benchmark's baseline): the tuples go straight to the
    reducer; the switch forwards them, absorbs nothing, and the counts are exact."""
    files, want = make_corpus(tmp_path, 3, seed=6, lines=400)
    maps, red, counts = run_wordcount(kvlab, tmp_path, 85, files, map_args=["--direct"])
    assert counts == dict(want)
    assert red["drain_total"] == 0 and red["drain_keys"] == 0 and red["partial_packets"] == 0
    assert red["leftover_total"] == sum(want.values())
    assert red["leftover_tuples"] == sum(m["tuples"] for m in maps)
    assert sum(m["acks_switch"] for m in maps) == 0
    assert sum(m["acks_reducer"] for m in maps) == sum(m["packets"] for m in maps) > 0
    c = [j for j in kvlab.incd.status()["finished"] if j["job"] == 85][-1]["counters"]
    assert c["kv_absorbed"] == 0 and c["kv_leftover"] == 0 and c["kv_acks"] == 0


def test_wordcount_twice_same_lab_small_window(kvlab, tmp_path):
    """A second job after the first (columns freed and reused), window 1, and a
    mapper with an empty input (no packets, an empty dictionary)."""
    files, want = make_corpus(tmp_path, 3, seed=2, lines=200)
    want -= collections.Counter(kv_words.tokenize(open(files[0], encoding="utf-8").read()))
    open(files[0], "w").close()
    _, _, counts = run_wordcount(kvlab, tmp_path, 81, files, window=1)
    assert counts == dict(want)


def test_two_wordcounts_at_once_share_the_switch(kvlab, tmp_path):
    """Job 88 is held active (its reducer stopped once registered: the mappers
    wait for its acknowledgements) while job 89 runs from start to end on the
    same hosts: 89 gets columns of its own, and both counts are exact."""
    import signal
    import time

    from netns_lab.agents import agent_argv, collect

    def reducer(job, *opts):
        return kvlab.popen("ps", agent_argv("kv-reduce", "--job", str(job), "--mappers", "3", "--out",
                                            str(tmp_path / f"c{job}.json"), "--json", *opts),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mappers(job, seed, *opts):
        (tmp_path / str(job)).mkdir()
        files, want = make_corpus(tmp_path / str(job), 3, seed=seed, lines=800)
        return want, [(f"mapper {r}", kvlab.popen(f"h{r + 1}", agent_argv(
            "kv-map", "--job", str(job), "--rank", str(r), "--mappers", "3", "--input", f, "--json", *opts),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for r, f in enumerate(files)]

    def job_now(job):
        return next((j for j in kvlab.incd.status()["jobs"] if j["job"] == job), None)

    def wait_for(what, cond):
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    red88 = reducer(88, "--fail-timeout", "60")
    procs88 = [("reducer", red88)]
    try:
        wait_for("job 88's reducer never registered", lambda: (job_now(88) or {}).get("ps"))
        red88.send_signal(signal.SIGSTOP)
        want88, maps88 = mappers(88, 11, "--timeout", "60", "--fail-timeout", "60")
        procs88 += maps88
        wait_for("job 88 never became active", lambda: (job_now(88) or {}).get("state") == "active")
        red89 = reducer(89)
        want89, maps89 = mappers(89, 12)
        collect([("reducer", red89), *maps89], job=89, timeout=120)
        assert (job_now(88) or {}).get("state") == "active"  # it held its columns all along
    finally:
        red88.send_signal(signal.SIGCONT)
        if len(procs88) == 1:
            red88.kill()
    collect(procs88, job=88, timeout=120)
    for job, want in ((88, want88), (89, want89)):
        assert json.loads((tmp_path / f"c{job}.json").read_text(encoding="utf-8")) == dict(want), job
    fin = {j["job"]: j for j in kvlab.incd.status()["finished"] if j["job"] in (88, 89)}
    (a, b) = sorted((j["offset"], j["offset"] + j["cols"]) for j in fin.values())
    assert a[1] <= b[0] and all(j["counters"]["kv_absorbed"] > 0 for j in fin.values()), fin


def test_wordcount_split_whitespace(kvlab, tmp_path):
    """--split whitespace: the words are str.split()'s (case and punctuation kept,
    Unicode whitespace separates), also in a long line cut into small chunks."""
    files, _ = make_corpus(tmp_path, 3, seed=9, lines=300)
    with open(files[2], "a", encoding="utf-8") as f:
        f.write(" ".join(["The", "the,", "the", "naïve\u3000café", "a\x1cb", "c\x85d", "e\u2028F"] * 4000))
    want = collections.Counter()
    for p in files:
        want.update(open(p, encoding="utf-8", newline="").read().split())
    _, _, counts = run_wordcount(kvlab, tmp_path, 87, files, map_args=["--split", "whitespace", "--chunk-kb", "8"])
    assert counts == dict(want)
    # what the default split would have merged or cut stays apart
    assert counts["the,"] == 4000 and counts["F"] == 4000 and counts["naïve"] == 4000
    assert counts["the"] == 4000 and "a\x1cb" not in counts and counts["b"] == 4000


@pytest.mark.parametrize("impair", [{"loss_pct": 2.0}, {"dup_pct": 5.0}, {"reorder_pct": 20.0}],
                         ids=["loss2", "dup5", "reorder20"])
def test_wordcount_exact_under_faults(root, tmp_path, impair):
    from netns_lab.harness import LabWithIncd

    with LabWithIncd("kf", workers=3, ps=True, **impair) as lab:
        # a large vocabulary: ~60 packets per mapper, so that 2 % loss surely hits some
        files, want = make_corpus(tmp_path, 3, seed=3, lines=3000, vocab=30000)
        maps, red, counts = run_wordcount(lab, tmp_path, 82, files)
        assert counts == dict(want)
        if "loss_pct" in impair:
            # the job's were the lab's only UDP packets: a lost data packet or ACK is a resend
            lost = sum(d["lost"] for h in read_counters(lab.state).values() for d in h.values())
            assert lost > 0 and sum(m["retransmits"] for m in maps) > 0, (lost, maps)
        if "dup_pct" in impair:
            # copies reached the switch (re-acked or replayed, or dropped while pending) or
            # the reducer (acknowledged, not added): they happened and changed no count
            c = [j for j in lab.incd.status()["finished"] if j["job"] == 82][-1]["counters"]
            assert red["dup_packets"] + c["kv_resent"] + c["drops"]["dup"] > 0, (red, c)


# --- command line -----------------------------------------------------------------------


@pytest.mark.parametrize("argv,msg", [
    (["kv-map", "--job", "1", "--rank", "0", "--mappers", "2", "--input", "/nonexistent/x.txt"], "no such file"),
    (["kv-map", "--job", "1", "--rank", "2", "--mappers", "2", "--input", "x"], "--rank must be in 0..1"),
    (["kv-map", "--job", "1", "--rank", "0", "--mappers", "2", "--input", __file__, "--window", "129"],
     "--window must be in 1..128"),
    (["kv-reduce", "--job", "0", "--mappers", "2", "--out", "c.json"], "--job must be in"),
    (["kv-reduce", "--job", "1", "--mappers", "2", "--out", "/nonexistent/c.json"], "does not exist"),
])
@pytest.mark.unit
def test_cli_errors_without_traceback(capsys, argv, msg):
    from hostagent import cli

    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_missing_mapper_fails_in_time_with_a_message(kvlab, tmp_path):
    """Only two of three mappers come: everyone gives up after the registration
    timeout with a message, no traceback, nothing left on the switch."""
    from netns_lab.agents import agent_argv

    files, _ = make_corpus(tmp_path, 2, seed=4, lines=50)
    procs = [kvlab.popen("ps", agent_argv("kv-reduce", "--job", "83", "--mappers", "3", "--out",
                                          str(tmp_path / "c.json"), "--register-timeout", "2"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs += [kvlab.popen(f"h{r + 1}", agent_argv("kv-map", "--job", "83", "--rank", str(r), "--mappers", "3",
                                                  "--input", f, "--register-timeout", "2"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for r, f in enumerate(files)]
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("inc-agent: incd refused register: timed out"), err
    assert not (tmp_path / "c.json").exists()
    assert not kvlab.incd.status()["jobs"]


def test_stopped_reducer_fails_the_mappers_with_a_message(kvlab, tmp_path):
    """The reducer is SIGSTOPped before the job starts: leftovers are never
    acknowledged; the mappers give up (their --timeout, or incd reporting the
    reducer hung) with a message and no traceback, and the job is gone."""
    import signal
    import time

    from netns_lab.agents import agent_argv

    files, _ = make_corpus(tmp_path, 3, seed=5, lines=300)
    red = kvlab.popen("ps", agent_argv("kv-reduce", "--job", "84", "--mappers", "3", "--out",
                                       str(tmp_path / "c.json")),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # registered, waiting for the mappers
        red.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        maps = [kvlab.popen(f"h{r + 1}", agent_argv("kv-map", "--job", "84", "--rank", str(r), "--mappers", "3",
                                                    "--input", f, "--timeout", "3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r, f in enumerate(files)]
        blamed_reducer = 0
        for p in maps:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 1 and "Traceback" not in err, err
            last = err.strip().splitlines()[-1]
            # the first mapper to give up blames the reducer; incd may then tell
            # the others that it left before they gave up themselves
            own = "reducer" in last or "acknowledgement" in last
            assert last.startswith("inc-agent: job 84") and (own or "left before finishing" in last), err
            blamed_reducer += own
        assert blamed_reducer >= 1
        assert time.monotonic() - t0 < 15
    finally:
        red.send_signal(signal.SIGCONT)
        red.kill()
        red.wait()
    deadline = time.monotonic() + 10
    while kvlab.incd.status()["jobs"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not kvlab.incd.status()["jobs"]
