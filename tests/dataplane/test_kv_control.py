"""incd's control plane for key-value (word count) jobs: registration of the
mappers and the reducer, the column allocator, kv_drain (epoch flips), the
job's end and failures. First against the registry with the real dataplane
loaded (packets through BPF_PROG_TEST_RUN), then with the real daemon in a lab:
KV packets from the hosts' UDP sockets through the switch, leftovers to the
reducer's socket, and the drains over the control API."""
from __future__ import annotations

import collections
import ctypes as ct
import json
import socket
import threading
import time

import numpy as np
import pytest

from bpf.testrun import XDP_REDIRECT, prog_test_run
from bpf import kv_wire as kv
from bpf import wire
from incd.netinfo import Path
from incd.registry import Registry
from incd.requests import KV_WINDOW, RegistrationError, validate_register
from incd.server import joined_reply

KV_COLS = 64
W_IP, R_IP = "10.77.1.2", "10.77.9.2"
W_PORT, R_PORT = 40000, 41000
ETH_IP_UDP = 42
# every member behind ifindex 1 (lo: where BPF_PROG_TEST_RUN packets come in)
W_PATH = Path(ifindex=1, mac=bytes.fromhex("020000000001"), port_mac=bytes.fromhex("0200000000fe"),
              switch_addr="10.77.1.1", mtu=3400)
R_PATH = Path(ifindex=1, mac=bytes.fromhex("020000000099"), port_mac=bytes.fromhex("02000000009e"),
              switch_addr="10.77.9.1", mtu=3400)


@pytest.fixture(scope="module")
def dp(root):
    from incd.dataplane import Dataplane

    d = Dataplane(pool_slots=16, kv_cols=KV_COLS)
    yield d
    d.close()


@pytest.fixture
def reg(dp):
    r = Registry(dp, 16, {1: "lo"})
    yield r
    r.shutdown()


class Member:
    """A mapper (rank >= 0) or the reducer (rank -1) registering in a thread."""

    def __init__(self, reg: Registry, req: dict, addr: str, path: Path, timeout: float = 5.0):
        self.reg, self.req, self.events = reg, req, []
        self.job = self.rank = self.error = None
        self.t = threading.Thread(target=self._run, args=(addr, path, timeout))
        self.t.start()

    def _run(self, addr, path, timeout):
        try:
            self.job, self.rank = self.reg.register(self.req, addr, path, timeout)
            m = self.job.ps if self.rank == -1 else self.job.members[self.rank]
            m.send = self.events.append
        except RegistrationError as e:
            self.error = str(e)

    def wait(self) -> dict:
        self.t.join(10)
        assert not self.t.is_alive()
        if self.error is not None:
            return {"ok": False, "error": self.error}
        return joined_reply(self.job, self.rank)


def kv_job(reg, job: int, world: int, *, window: int = 64, reducer: bool = True, timeout: float = 5.0, **extra):
    """Registers world mappers (rank r from W_IP:W_PORT+r) and the reducer;
    returns (replies of the mappers, reply of the reducer, Member objects)."""
    ms = [Member(reg, {"op": "register", "job": job, "rank": r, "world": world, "mode": "kv", "port": W_PORT + r,
                       "window": window, **extra}, W_IP, W_PATH, timeout) for r in range(world)]
    red = (Member(reg, {"op": "register", "role": "ps", "job": job, "world": world, "mode": "kv", "port": R_PORT},
                  R_IP, R_PATH, timeout) if reducer else None)
    return [m.wait() for m in ms], (red.wait() if red else None), ms + ([red] if red else [])


def send(dp, job: int, gen: int, flow: int, psn: int, keys, vals) -> tuple[str, list]:
    """One KV packet of mapper `flow` through the switch: ("ack", []) or ("reducer", leftover tuples)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    payload = kv.build_kv_packet(np.asarray(keys, np.uint64), np.asarray(vals, np.int64), job=job, gen=gen,
                                 flow=flow, psn=psn)
    pkt = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:fe") / IP(src=W_IP, dst="10.77.1.1")
                / UDP(sport=W_PORT + flow, dport=wire.PORT) / Raw(payload))
    r = prog_test_run(dp.ingress.fd, pkt)
    assert r.verdict == XDP_REDIRECT, r.verdict_name
    h, t = kv.parse_kv(r.data[ETH_IP_UDP:])
    if h["type"] == wire.T_KV_ACK:
        return "ack", []
    return "reducer", list(zip(t["key"].tolist(), t["value"].tolist()))


def add(c: collections.Counter, pairs) -> None:
    for k, v in pairs:
        c[int(k)] += int(v)


def nz(c) -> dict:
    return {k: v for k, v in c.items() if v}


# --- registration ---------------------------------------------------------------

@pytest.mark.unit
def test_validate_register_kv_fields():
    base = {"job": 5, "rank": 0, "world": 2, "mode": "kv", "port": 1, "window": KV_WINDOW}
    assert validate_register(base).window == KV_WINDOW
    with pytest.raises(RegistrationError, match="at most 128"):
        validate_register({**base, "window": KV_WINDOW + 1})
    r = validate_register({**base, "cols": 10, "parts": 2})
    assert (r.cols, r.parts) == (10, 2)
    with pytest.raises(RegistrationError, match="'parts'"):
        validate_register({**base, "parts": 3})  # more parts than mappers
    with pytest.raises(RegistrationError, match="'cols'"):
        validate_register({**base, "cols": 0})
    with pytest.raises(RegistrationError, match="'cols' 1 is fewer than the job's 2 parts"):
        validate_register({**base, "cols": 1})  # a column per mapper at least
    with pytest.raises(RegistrationError, match="'cols' 1 is fewer than the job's 2 parts"):
        validate_register({**base, "cols": 1, "parts": 2})
    assert validate_register({**base, "cols": 1, "parts": 1}).cols == 1
    assert validate_register({"job": 5, "world": 2, "mode": "kv", "port": 9, "role": "ps"}).rank == -1


def test_registration_programs_the_switch_and_answers_everyone(reg, dp):
    maps, red, _ = kv_job(reg, 21, 3, window=100)
    assert all(r["ok"] for r in maps + [red]), maps + [red]
    job = reg.jobs[21]
    for r in maps + [red]:
        assert (r["mode"], r["job"], r["world"], r["gen"]) == ("kv", 21, 3, job.gen)
        assert (r["cols"], r["parts"], r["epoch"], r["window"], r["kv_window"]) == (30, 3, 0, 100, 128)
        assert r["offset"] == job.offset and r["slots"] == 30
        assert r["tuples"] == kv.tuples_for_mtu(3400) and r["data_port"] == wire.PORT
        assert r["ps"] == {"addr": R_IP, "port": R_PORT}
        assert [m["rank"] for m in r["members"]] == [0, 1, 2]
    assert maps[0]["data_addr"] == "10.77.1.1" and red["data_addr"] == "10.77.9.1"
    # default share: half the columns, rounded down to a multiple of the parts (one per mapper)
    v = dp.jobs[ct.c_int(21)]
    assert (v.mode, v.offset, v.slots, v.parts, v.epoch, v.world, v.gen) == (
        wire.MODE_KV, job.offset, 30, 3, 0, 3, job.gen)
    assert dp.job_ps[ct.c_int(21)].port == socket.htons(R_PORT)
    for r in range(3):
        src = dp.sources[ct.c_int(21 * wire.MAX_WORKERS + r)]
        assert (src.addr, src.port, src.ifindex) == (
            int.from_bytes(socket.inet_aton(W_IP), "little"), socket.htons(W_PORT + r), 1)
    assert sorted(k.flow for k in dp.kv_flows.keys() if k.job == 21) == [0, 1, 2]
    snap = reg.snapshot()
    j = next(j for j in snap["jobs"] if j["job"] == 21)
    assert (j["cols"], j["parts"], j["epoch"], j["drains"]) == (30, 3, 0, 0)
    assert "kv_absorbed" in j["counters"]
    assert (snap["kv_cols"], snap["kv_free_cols"], snap["kv_flows"]) == (KV_COLS, KV_COLS - 30, 3)
    json.dumps(snap)


def test_requested_columns_and_refusals(reg, dp):
    maps, red, _ = kv_job(reg, 22, 2, cols=KV_COLS - 4, parts=1)
    assert red["ok"] and (red["cols"], red["parts"]) == (KV_COLS - 4, 1)
    # fewer columns free than asked: the job gets what is free (a multiple of its parts)
    maps, red, _ = kv_job(reg, 23, 3, cols=40)
    assert red["ok"] and (red["cols"], red["parts"]) == (3, 3), red
    # none free
    maps, red, _ = kv_job(reg, 24, 2)  # 1 column left, 2 parts
    for r in maps + [red]:
        assert not r["ok"] and "no free key-value columns for job 24: it needs at least 2" in r["error"], r
    assert 24 not in reg.jobs
    # mappers that disagree on the columns
    a = Member(reg, {"job": 25, "rank": 0, "world": 2, "mode": "kv", "port": 1, "window": 8, "cols": 4}, W_IP, W_PATH)
    time.sleep(0.2)
    b = Member(reg, {"job": 25, "rank": 1, "world": 2, "mode": "kv", "port": 2, "window": 8, "cols": 5}, W_IP, W_PATH)
    assert "with another cols (see incd status); this request says cols=5" in b.wait()["error"]
    # a modulo worker, or a modulo job's PS, for a kv job; a kv reducer for a hash job
    c = Member(reg, {"job": 25, "rank": 1, "world": 2, "mode": "modulo", "port": 2, "window": 8}, W_IP, W_PATH)
    assert "another mode (see incd status); this request says mode=modulo" in c.wait()["error"]
    d = Member(reg, {"job": 25, "role": "ps", "world": 2, "mode": "hash", "port": 2}, R_IP, R_PATH)
    assert "another mode (see incd status); this request says mode=hash" in d.wait()["error"]
    e = Member(reg, {"job": 25, "role": "ps", "world": 3, "mode": "kv", "port": 2}, R_IP, R_PATH)
    assert "another world (see incd status); this request says world=3" in e.wait()["error"]
    reg.shutdown()
    assert "incd stop" in a.wait()["error"]
    # after the end of every job all columns are free and the switch forgets the jobs
    assert reg.kv_alloc.free_slots() == KV_COLS and not reg.kv_alloc.regions()
    for j in (22, 23):
        assert dp.jobs[ct.c_int(j)].mode == 0 and not [k for k in dp.kv_flows.keys() if k.job == j]


def test_mappers_of_all_jobs_share_the_flow_table(dp, monkeypatch):
    import incd.kv_jobs as kv_jobs

    monkeypatch.setattr(kv_jobs, "KV_MAX_FLOWS", 3)
    reg = Registry(dp, 16, {1: "lo"})
    try:
        assert kv_job(reg, 26, 2, cols=4)[1]["ok"]
        maps, red, _ = kv_job(reg, 27, 2, cols=4)
        assert "the switch keeps state for 3 key-value flows and running jobs use 2" in red["error"]
    finally:
        reg.shutdown()


# --- drains -----------------------------------------------------------------------

def test_drain_returns_exactly_what_the_switch_absorbed_and_epochs_alternate(reg, dp):
    maps, red, members = kv_job(reg, 31, 2, cols=8, parts=2)
    job, gen = reg.jobs[31], red["gen"]
    rng = np.random.default_rng(7)
    vocab = rng.integers(1, 2**64 - 1, 60, dtype=np.uint64)
    sent, left, drained = collections.Counter(), collections.Counter(), collections.Counter()
    epochs, psn, n_sent, n_left = [], [0, 0], 0, 0
    for rnd in range(6):
        for _ in range(5):
            flow = int(rng.integers(2))
            keys = rng.choice(vocab, size=int(rng.integers(1, 40)), replace=False)
            vals = rng.integers(-5, 100, len(keys))
            add(sent, zip(keys.tolist(), vals.tolist()))
            _, lo = send(dp, 31, gen, flow, psn[flow], keys, vals)
            psn[flow] += 1
            add(left, lo)
            n_sent, n_left = n_sent + len(keys), n_left + len(lo)
        d = reg.kv_drain(job, -1)
        assert d["ok"] and d["epoch"] == rnd % 2 and d["active"] == (rnd + 1) % 2
        assert dp.kv_epoch(31) == (rnd + 1) % 2 and job.kv_epoch == (rnd + 1) % 2
        assert d["keys"] == sorted(set(d["keys"])) and len(d["keys"]) == len(d["values"])
        assert all(isinstance(k, int) and 0 < k < 2**64 for k in d["keys"])
        epochs.append(d["epoch"])
        add(drained, zip(d["keys"], d["values"]))
    # each drain took the copy that was active: nothing is left in either
    d1, d2 = reg.kv_drain(job, -1), reg.kv_drain(job, -1)
    assert d1["keys"] == [] and d2["keys"] == []
    assert epochs == [0, 1, 0, 1, 0, 1]
    total = drained + collections.Counter()
    for k, v in left.items():
        total[k] += v
    assert nz(total) == nz(sent)
    st = dp.read_stats(31)
    assert n_left > 0 and (st["kv_absorbed"], st["kv_leftover"]) == (n_sent - n_left, n_left)
    assert next(j for j in reg.snapshot()["jobs"] if j["job"] == 31)["drains"] == 8
    # only the reducer drains, and only its own job
    with pytest.raises(RegistrationError, match="only job 31's reducer"):
        reg.kv_drain(job, 0)


def test_two_drains_after_the_mappers_finish_get_everything(reg, dp):
    maps, red, _ = kv_job(reg, 32, 1, cols=4)
    job, gen = reg.jobs[32], red["gen"]
    sent, left = collections.Counter(), collections.Counter()
    for p in range(3):
        keys = [1000 + p, 2000, 3000 + 7 * p]
        add(sent, zip(keys, [p + 1] * 3))
        add(left, send(dp, 32, gen, 0, p, keys, [p + 1] * 3)[1])
        if p == 1:
            dp.flip_kv_epoch(32, 0)  # some tuples in each copy
    got = collections.Counter()
    for d in (reg.kv_drain(job, -1), reg.kv_drain(job, -1)):
        add(got, zip(d["keys"], d["values"]))
    got.update(left)
    assert nz(got) == nz(sent)


def test_drain_of_a_job_that_ended_is_refused(reg, dp):
    maps, red, members = kv_job(reg, 33, 1, cols=2)
    job = reg.jobs[33]
    reg.leave(job, 0, done=True)
    reg.leave(job, -1, done=True)
    with pytest.raises(RegistrationError, match="job 33 is ended"):
        reg.kv_drain(job, -1)


# --- the end of a job ----------------------------------------------------------------

def test_job_ends_when_the_reducer_leaves_and_frees_everything(reg, dp):
    maps, red, members = kv_job(reg, 41, 2, cols=6)
    job, gen = reg.jobs[41], red["gen"]
    send(dp, 41, gen, 0, 0, [5, 6, 7], [1, 2, 3])
    reg.leave(job, 0, done=True)
    reg.leave(job, 1, done=True)          # mappers done: the job runs on for the reducer's drains
    assert job.state == "active" and 41 in reg.jobs and dp.jobs[ct.c_int(41)].mode
    # the job id is not free while the reducer drains, even though that mapper is gone
    again = Member(reg, {"job": 41, "rank": 0, "world": 2, "mode": "kv", "port": 1, "window": 8}, W_IP, W_PATH)
    assert "job 41 is running (its reducer has not finished)" in again.wait()["error"]
    d = reg.kv_drain(job, -1)
    assert sorted(zip(d["keys"], d["values"])) == [(5, 1), (6, 2), (7, 3)]
    send(dp, 41, gen, 0, 1, [8], [1])     # (a straggler in the other copy: the end clears it)
    reg.leave(job, -1, done=True)
    assert job.state == "ended" and job.error is None and 41 not in reg.jobs
    assert reg.kv_alloc.free_slots() == KV_COLS
    assert dp.jobs[ct.c_int(41)].mode == 0 and dp.job_ps[ct.c_int(41)].ifindex == 0
    assert not [k for k in dp.kv_flows.keys() if k.job == 41]
    assert all(dp.sources[ct.c_int(41 * wire.MAX_WORKERS + r)].addr == 0 for r in (0, 1))
    a = dp.kv_pool  # both copies of its columns are empty
    for e in (0, 1):
        base = e * KV_COLS * wire.KV_MAX_TUPLES + job.offset * wire.KV_MAX_TUPLES
        assert all(a[ct.c_int(base + i)].key == 0 for i in range(0, 6 * wire.KV_MAX_TUPLES, 7))
    rec = reg.finished[-1]
    assert rec["job"] == 41 and rec["end_reason"] == "the reducer finished"
    assert rec["counters"]["kv_absorbed"] == 4 and rec["counters"]["drains"] == 1
    assert reg.wait_end(job) == "the reducer finished"


def test_a_mapper_killed_fails_the_job_and_the_reducer_is_told(reg, dp):
    maps, red, members = kv_job(reg, 42, 3, cols=6)
    job, reducer = reg.jobs[42], members[-1]
    reg.leave(job, 0, done=True)       # a mapper that finished is fine
    assert job.state == "active"
    reg.leave(job, 2)                  # connection closed without "done"
    assert job.state == "ended" and 42 not in reg.jobs
    ev = [e for e in reducer.events if e["event"] == "job_failed"]
    assert ev and ev[0]["ranks"] == [2] and "rank 2 (10.77.1.2) left before finishing" in ev[0]["error"]
    assert [e["event"] for e in members[1].events] == ["job_failed"]
    assert reg.kv_alloc.free_slots() == KV_COLS and dp.jobs[ct.c_int(42)].mode == 0
    assert not [k for k in dp.kv_flows.keys() if k.job == 42]


def test_the_reducer_leaving_early_fails_the_job(reg, dp):
    maps, red, members = kv_job(reg, 43, 2, cols=4)
    job = reg.jobs[43]
    reg.leave(job, -1)
    assert job.state == "ended" and "left while mappers [0, 1] were still running" in job.error
    assert [e["ranks"] for e in members[0].events] == [[-1]]
    assert reg.kv_alloc.free_slots() == KV_COLS


def test_a_hung_mapper_fails_the_job(reg, dp):
    maps, red, members = kv_job(reg, 44, 1, cols=2)
    job = reg.jobs[44]
    reg.heartbeat(job, -1, 0.2)
    reg.heartbeat(job, 0, 0.2)
    for _ in range(8):
        time.sleep(0.05)
        reg.heartbeat(job, -1, 0.2)  # the reducer keeps beating, the mapper does not
    assert job.state == "ended" and "rank 0" in job.error and reg.kv_alloc.free_slots() == KV_COLS


def test_saved_job_table_restores_a_kv_job(reg, dp):
    from incd import jobstate

    maps, red, members = kv_job(reg, 45, 2, cols=6)
    job = reg.jobs[45]
    reg.kv_drain(job, -1)
    with reg.cond:
        data = json.loads(json.dumps(jobstate.dump(reg, "fp")))
    reg2 = Registry(dp, 16, {1: "lo"})
    assert jobstate.restore(reg2, data, 5.0) == [45]
    j2 = reg2.jobs[45]
    assert (j2.mode, j2.offset, j2.slots, j2.parts, j2.kv_epoch, j2.kv_drains) == (
        "kv", job.offset, 6, 2, 1, 1)
    assert reg2.kv_alloc.regions() == {job.offset: 6} and j2.rejoin_wait == {0, 1, -1}
    # the rejoined reducer drains as before
    for r in (0, 1, -1):
        reg2.rejoin({"job": 45, "rank": r, "gen": job.gen, "token": job.member(r).token},
                    R_IP if r == -1 else W_IP)
    assert reg2.kv_drain(j2, -1)["epoch"] == 1
    reg2.leave(j2, 0, done=True)
    reg2.leave(j2, 1, done=True)
    reg2.leave(j2, -1, done=True)
    assert reg2.kv_alloc.free_slots() == KV_COLS and dp.jobs[ct.c_int(45)].mode == 0


# --- with the real daemon in a lab ---------------------------------------------------

def udp_in(netns: str, port: int) -> socket.socket:
    """A UDP socket bound to port in a lab namespace."""
    from helpers.control import socket_in

    return socket_in(netns, socket.SOCK_DGRAM, port)


def recv_all(s: socket.socket, quiet: float = 0.3) -> list[bytes]:
    s.settimeout(quiet)
    got = []
    while True:
        try:
            got.append(s.recv(65536))
        except socket.timeout:
            return got


def next_event(ctl, kind: str) -> dict:
    while True:
        r = ctl.reply()
        assert r is not None, f"connection closed before a {kind} event"
        if r.get("event") == kind:
            return r


WORDS = [f"w{i}" for i in range(3000)]


def map_round(rng, msock, replies, sent: collections.Counter, *, job: int, psn0: int) -> tuple[int, int]:
    """Each mapper sends the combined counts of 4000 random words from its UDP
    socket to the switch (the address and port of its registration reply), in
    packets of the reply's "tuples". Returns (packets, tuples) sent."""
    npk = n_tuples = 0
    for r, s in enumerate(msock):
        rep = replies[r]
        c = collections.Counter(rng.choice(WORDS, size=4000).tolist())  # a mapper combines its batch
        keys = kv.word_keys(c.keys())
        vals = np.fromiter(c.values(), np.int64)
        add(sent, zip(keys.tolist(), vals.tolist()))
        n_tuples += len(keys)
        rows, sizes = kv.build_kv_packets(keys, vals, rep["tuples"], job=job, gen=rep["gen"], flow=r, psn0=psn0)
        for i in range(len(rows)):
            s.sendto(rows[i, :sizes[i]].tobytes(), (rep["data_addr"], rep["data_port"]))
            npk += 1
            time.sleep(0.001)
    return npk, n_tuples


def collect(msock, rsock, job: int, left: collections.Counter) -> tuple[int, int, int]:
    """ACKs the mappers got, and leftover packets the reducer got (their tuples
    added to left). Returns (acks, packets to the reducer, leftover tuples)."""
    acks = sum(len(recv_all(s)) for s in msock)
    to_red = n_left = 0
    for data in recv_all(rsock):
        h, t = kv.parse_kv(data)
        assert h["type"] == wire.T_KV and h["job"] == job
        add(left, zip(t["key"].tolist(), t["value"].tolist()))
        to_red += 1
        n_left += len(t)
    return acks, to_red, n_left


def register_all(lab, job: int, world: int, mhosts, rhost: str = "ps", window: int = 32):
    from helpers.control import Ctl

    mctl = [Ctl(lab, h) for h in mhosts]
    rctl = Ctl(lab, rhost)
    for r, c in enumerate(mctl):
        c.send({"op": "register", "job": job, "rank": r, "world": world, "mode": "kv", "port": 42000 + r,
                "window": window})
    rctl.send({"op": "register", "role": "ps", "job": job, "world": world, "mode": "kv", "port": 42100})
    replies = [c.reply() for c in mctl] + [rctl.reply()]
    assert all(r["ok"] for r in replies), replies
    return mctl, rctl, replies


def close(*ctls) -> None:
    for c in ctls:
        c.f.close()
        c.s.close()


@pytest.mark.lab
def test_lab_word_count_through_the_switch(root):
    from netns_lab.harness import LabWithIncd
    from helpers.control import Ctl

    job, world = 71, 2
    with LabWithIncd("kv", workers=2, ps=True) as lab:
        hosts = ["h1", "h2"]
        mctl = [Ctl(lab, h) for h in hosts]
        rctl = Ctl(lab, "ps")
        msock = [udp_in(lab.netns(h), 42000 + r) for r, h in enumerate(hosts)]
        rsock = udp_in(lab.netns("ps"), 42100)
        for r, c in enumerate(mctl):
            c.send({"op": "register", "job": job, "rank": r, "world": world, "mode": "kv", "port": 42000 + r,
                    "window": 32})
        rctl.send({"op": "register", "role": "ps", "job": job, "world": world, "mode": "kv", "port": 42100})
        replies = [c.reply() for c in mctl] + [rctl.reply()]
        assert all(r["ok"] for r in replies), replies
        rep = replies[0]
        assert (rep["cols"], rep["parts"], rep["epoch"]) == (256, 2, 0)
        st = lab.incd.status()
        j = next(j for j in st["jobs"] if j["job"] == job)
        assert (j["mode"], j["cols"], j["parts"], j["epoch"]) == ("kv", 256, 2, 0)
        assert st["kv_free_cols"] == st["kv_cols"] - 256
        text = lab.incd._cli("status").stdout
        assert "key-value columns: 512, 256 free, 2 flows in use" in text and "in 2 parts, epoch 0" in text, text
        assert " kv:" in lab.incd._cli("jobs").stdout

        rng = np.random.default_rng(3)
        sent, left = collections.Counter(), collections.Counter()
        npk = n_tuples = 0
        for rnd in range(2):
            p, t = map_round(rng, msock, replies, sent, job=job, psn0=rnd * 100)
            npk, n_tuples = npk + p, n_tuples + t
        acks, to_red, n_left = collect(msock, rsock, job, left)
        assert acks + to_red == npk, (acks, to_red, npk)
        assert to_red > 0  # 3000 distinct words in 128 columns x 266 rows per part: some collide
        for c in mctl:
            c.send({"op": "done"})
            assert c.reply() == {"ok": True}
        got = collections.Counter()
        for e in (0, 1):  # two drains after the mappers are done get everything
            rctl.send({"op": "kv_drain"})
            d = rctl.reply()
            assert d["ok"] and d["epoch"] == e, str(d)[:300]
            add(got, zip(d["keys"], d["values"]))
        for k, v in left.items():
            got[k] += v
        assert nz(got) == nz(sent)
        j = next(j for j in lab.incd.status()["jobs"] if j["job"] == job)
        assert j["epoch"] == 0 and j["drains"] == 2 and j["counters"]["kv_acks"] == acks
        assert j["counters"]["kv_to_reducer"] == to_red
        assert (j["counters"]["kv_absorbed"], j["counters"]["kv_leftover"]) == (n_tuples - n_left, n_left)
        rctl.send({"op": "done"})
        assert rctl.reply() == {"ok": True}
        st = lab.incd.status()
        assert not st["jobs"] and st["kv_free_cols"] == st["kv_cols"]
        rec = next(r for r in st["finished"] if r["job"] == job)
        assert rec["end_reason"] == "the reducer finished" and rec["counters"]["drains"] == 2
        close(*mctl, rctl)

        # a second run: a mapper dies (its control connection closes) -> the reducer is told
        mctl = [Ctl(lab, h) for h in hosts]
        rctl = Ctl(lab, "ps")
        for r, c in enumerate(mctl):
            c.send({"op": "register", "job": job + 1, "rank": r, "world": world, "mode": "kv",
                    "port": 42000 + r, "window": 200})
            assert "at most 128" in c.reply()["error"]
            c.send({"op": "register", "job": job + 1, "rank": r, "world": world, "mode": "kv",
                    "port": 42000 + r, "window": 128})
        rctl.send({"op": "kv_drain"})
        assert "before 'register'" in rctl.reply()["error"]
        rctl.send({"op": "register", "role": "ps", "job": job + 1, "world": world, "mode": "kv", "port": 42100})
        assert all(c.reply()["ok"] for c in mctl + [rctl])
        mctl[0].send({"op": "kv_drain"})
        assert "only job 72's reducer" in mctl[0].reply()["error"]
        mctl[1].s.shutdown(socket.SHUT_RDWR)  # killed: the connection closes without "done"
        mctl[1].f.close()
        mctl[1].s.close()
        ev = next_event(rctl, "job_failed")
        assert ev["ranks"] == [1] and "rank 1 (" in ev["error"] and "left before finishing" in ev["error"]
        ev = next_event(mctl[0], "job_failed")
        st = lab.incd.status()
        assert not st["jobs"] and st["kv_free_cols"] == st["kv_cols"]
        rctl.send({"op": "kv_drain"})
        assert "job 72 is ended" in rctl.reply()["error"]
        for s in msock + [rsock, mctl[0].s, rctl.s]:
            s.close()


@pytest.mark.lab
def test_lab_kv_job_survives_an_incd_restart(root):
    """incd killed with -9 mid-job: the switch keeps absorbing (pinned maps),
    the restarted incd takes the job back with its columns and epoch, the
    members rejoin, and the reducer's drains still get exactly what was sent."""
    from netns_lab.harness import LabWithIncd
    from helpers.control import Ctl

    from incd import daemon

    job, world = 75, 2
    with LabWithIncd("kr", workers=2, ps=True) as lab:
        msock = [udp_in(lab.netns(h), 42000 + r) for r, h in enumerate(["h1", "h2"])]
        rsock = udp_in(lab.netns("ps"), 42100)
        mctl, rctl, replies = register_all(lab, job, world, ["h1", "h2"])
        rng = np.random.default_rng(5)
        sent, left, got = collections.Counter(), collections.Counter(), collections.Counter()
        map_round(rng, msock, replies, sent, job=job, psn0=0)
        rctl.send({"op": "kv_drain"})
        d = rctl.reply()
        assert d["epoch"] == 0
        add(got, zip(d["keys"], d["values"]))
        before = next(j for j in lab.incd.status()["jobs"] if j["job"] == job)
        lab.incd.kill()
        close(*mctl, rctl)
        assert daemon.recoverable(lab.incd.instance)
        map_round(rng, msock, replies, sent, job=job, psn0=100)  # while incd is down
        lab.incd.start()
        hosts = ["h1", "h2", "ps"]
        ctls = [Ctl(lab, h) for h in hosts]
        for r, c, rep in zip([0, 1, -1], ctls, replies):
            c.send({"op": "rejoin", "job": job, "rank": r, "gen": replies[0]["gen"], "token": rep["token"]})
        again = [c.reply() for c in ctls]
        assert all(r["ok"] for r in again), again
        assert all((r["cols"], r["parts"], r["epoch"], r["offset"]) ==
                   (before["cols"], 2, 1, before["offset"]) for r in again), again
        mctl, rctl = ctls[:2], ctls[2]
        map_round(rng, msock, replies, sent, job=job, psn0=200)
        collect(msock, rsock, job, left)
        for c in mctl:
            c.send({"op": "done"})
            assert c.reply() == {"ok": True}
        for e in (1, 0):
            rctl.send({"op": "kv_drain"})
            d = rctl.reply()
            assert d["ok"] and d["epoch"] == e
            add(got, zip(d["keys"], d["values"]))
        for k, v in left.items():
            got[k] += v
        assert nz(got) == nz(sent)
        rctl.send({"op": "done"})
        assert rctl.reply() == {"ok": True}
        st = lab.incd.status()
        assert not st["jobs"] and st["kv_free_cols"] == st["kv_cols"]
        close(*ctls)
        for s in msock + [rsock]:
            s.close()
