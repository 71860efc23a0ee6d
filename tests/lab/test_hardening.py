"""Abuses and mistakes of issue 17, each reproduced against the real daemon in a
lab: what must be refused, and that what was running keeps running."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers.allreduce import allreduce_files, int_inputs
from incd.process import IncdProcess
from netns_lab.harness import uniq
from netns_lab.topology import Lab

FOREIGN = """
from bcc import BPF
b = BPF(text='#include <uapi/linux/bpf.h>\\nint foreign(struct xdp_md *c) { return XDP_PASS; }')
b.attach_xdp("p2", b.load_func("foreign", BPF.XDP), 1 << 2)  # native; stays after this process
"""


def prog_ids(lab) -> dict:
    out = subprocess.run(["ip", "-n", lab.netns("sw"), "-j", "-d", "link"], capture_output=True, text=True,
                         check=True).stdout
    import json

    return {l["ifname"]: (l.get("xdp") or {}).get("prog", {}).get("id", 0) for l in json.loads(out)
            if l["ifname"].startswith("p")}


@pytest.fixture
def lab2(root):
    with Lab(uniq("hd"), workers=2) as lab:
        yield lab


def test_a_second_incd_leaves_the_first_alone(lab2, tmp_path):
    with IncdProcess(lab2.name + "a", lab=lab2.name) as first:
        lab2.incd = first
        before = prog_ids(lab2)
        assert all(before.values()), before
        second = IncdProcess(lab2.name + "b", lab=lab2.name)
        with pytest.raises(RuntimeError) as e:
            second.start()
        second.stop()
        assert f"incd instance '{lab2.name}a'" in str(e.value) and "refusing" in str(e.value)
        assert prog_ids(lab2) == before  # nothing detached or replaced
        xs = int_inputs(2, 5000, seed=3)
        outs, _ = allreduce_files(lab2, tmp_path, 3, xs)  # the first still aggregates
        assert all(np.array_equal(y, xs[0] + xs[1]) for y in outs)


def test_a_foreign_xdp_program_is_refused_then_replaced_only_with_force(lab2):
    lab2.run("sw", [sys.executable, "-c", FOREIGN], check=True, capture_output=True)
    foreign = prog_ids(lab2)["p2"]
    assert foreign
    inc = IncdProcess(lab2.name + "f", lab=lab2.name)
    with pytest.raises(RuntimeError) as e:
        inc.start()
    inc.stop()
    assert "port p2 already runs XDP program" in str(e.value) and "not this incd's" in str(e.value)
    assert prog_ids(lab2) == {"p1": 0, "p2": foreign}  # p1 untouched too: refused before anything
    forced = IncdProcess(lab2.name + "f", lab=lab2.name, extra=["--force"]).start()
    try:
        ids = prog_ids(lab2)
        assert ids["p2"] not in (0, foreign) and ids["p1"] == ids["p2"]
    finally:
        forced.stop()
    assert prog_ids(lab2) == {"p1": 0, "p2": 0}


def agent(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hostagent.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_bad_files_and_sizes_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    base = ["allreduce", "--job", "1", "--rank", "0", "--world", "1"]
    one_line_error(agent(*base, "--in", str(bad)), f"cannot read {bad}")
    one_line_error(agent(*base, "--in", str(tmp_path)), f"cannot read {tmp_path}")
    one_line_error(agent(*base, "--in", str(tmp_path / "missing.npy")), "No such file")
    (tmp_path / "d.npy").mkdir()
    one_line_error(agent(*base, "--out", str(tmp_path / "d.npy")), "is a directory")
    one_line_error(agent(*base, "--out", str(tmp_path / "nowhere" / "y.npy")), "does not exist")
    one_line_error(agent(*base, "--numel", str(10**13)), "GiB of memory", "available")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: the first write of a larger file fails with ENOSPC."""
    d = tmp_path / "full"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_out_on_a_full_disk_leaves_no_partial_file(lab2, full_disk):
    with IncdProcess(lab2.name + "o", lab=lab2.name):
        out = full_disk / "y.npy"
        r = lab2.run("h1", [sys.executable, "-m", "hostagent.cli", "allreduce", "--job", "4", "--rank", "0",
                            "--world", "1", "--numel", "100000", "--out", str(out), "--quiet"],
                     capture_output=True, text=True, timeout=120)
    one_line_error(r, f"cannot write {out}", "No space left on device")
    assert list(full_disk.iterdir()) == []  # neither y.npy nor its temporary


def test_a_host_mtu_below_the_jobs_packets_fails_the_job_at_once_naming_it(lab2):
    import time

    lab2.run("h2", ["ip", "link", "set", "dev", "eth0", "mtu", "1500"], check=True)
    try:
        with IncdProcess(lab2.name + "m", lab=lab2.name):
            t0 = time.monotonic()
            procs = [lab2.popen(f"h{r + 1}", [sys.executable, "-m", "hostagent.cli", "allreduce", "--job", "8",
                                              "--rank", str(r), "--world", "2", "--numel", "100000", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
            outs = [p.communicate(timeout=60) for p in procs]
            took = time.monotonic() - t0
    finally:
        lab2.run("h2", ["ip", "link", "set", "dev", "eth0", "mtu", "3400"], check=False)
    (_, err0), (_, err1) = outs
    assert procs[1].returncode != 0 and "interface eth0 has MTU 1500, smaller than the job's" in err1, err1
    assert procs[0].returncode != 0 and "rank 1" in err0 and "gave up" in err0 and "MTU 1500" in err0, err0
    assert took < 8, took  # at registration, not after the 10 s progress timeout


def test_a_member_that_never_sends_is_named(root):
    """Rank 2 registers and keeps its heartbeats but never sends a packet: the
    other ranks give up after --timeout naming rank 2 (the switch's slot shows
    whose contribution is missing)."""
    import threading

    from helpers.control import Ctl
    from netns_lab.harness import LabWithIncd

    with LabWithIncd("hn", workers=3) as lab:
        silent = Ctl(lab, "h3")
        silent.send({"op": "register", "job": 9, "rank": 2, "world": 3, "window": 64, "port": 40000,
                     "shape": "10000xfloat32", "timeout": 30})
        stop = threading.Event()

        def heartbeats():
            while not stop.wait(0.2):
                silent.send({"op": "alive"})

        procs = [lab.popen(f"h{r + 1}", [sys.executable, "-m", "hostagent.cli", "allreduce", "--job", "9",
                                         "--rank", str(r), "--world", "3", "--numel", "10000", "--timeout", "3",
                                         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(2)]
        first = silent.reply()
        assert first and first["ok"], first
        beat = threading.Thread(target=heartbeats, daemon=True)
        beat.start()
        try:
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            stop.set()
            beat.join()
            silent.close()
    # The first to give up names rank 2, and incd hands its reason to the other.
    for p, (_, err) in zip(procs, outs):
        assert p.returncode != 0 and "the switch has nothing from rank 2 for it" in err, err


@pytest.mark.parametrize("window", [48, 64])
def test_a_job_crosses_the_wire_psn_wrap_exactly(root, window):
    """A modulo job started 150 psns before 2^32 runs 3 reduces of ~380 packets
    across the wrap under 2 % loss: every result exact. Window 48 gives a slot
    count that does not divide 2^32 (the case where psn % slots jumps)."""
    from netns_lab.agents import run_allreduce
    from netns_lab.harness import LabWithIncd

    with LabWithIncd("hw", workers=3, loss_pct=2.0) as lab:
        res = run_allreduce(lab, job=10, world=3, numel=300_000, dtype="int32", iters=3, timeout=120,
                            extra=["--verify", "--window", str(window), "--first-psn", str(2**32 - 150)])
        fin = [j for j in lab.incd.status()["finished"] if j["job"] == 10][-1]
    assert all(r["verified"] for r in res), res
    assert fin["slots"] % 3 == 0 if window == 48 else True, fin  # 2^32 % slots != 0: the hard case ran


def test_a_member_that_stops_reading_cannot_freeze_incd(root):
    """Rank 0 of job 13 floods pings and never reads a reply. Nothing incd does
    waits for it: when rank 1 leaves (an event for rank 0 under the registry's
    lock), status and a new job still answer at once; rank 0 is cut off once
    too much waits for it, and its job ends naming that."""
    import threading
    import time

    from helpers.control import Ctl
    from incd.cli import admin_request
    from netns_lab.agents import run_allreduce
    from netns_lab.harness import LabWithIncd

    with LabWithIncd("hf", workers=3) as lab:
        r0, r1 = Ctl(lab, "h1"), Ctl(lab, "h2")
        req = {"op": "register", "job": 13, "world": 2, "window": 8, "port": 40000, "timeout": 30}
        r0.send({**req, "rank": 0})
        assert r1.call({**req, "rank": 1})["ok"] and r0.reply()["ok"]

        cut_off = []

        def flood():
            chunk = b'{"op": "ping"}\n' * 20000
            try:
                for _ in range(50):
                    r0.s.sendall(chunk)
            except OSError:
                cut_off.append(True)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(2)
        r1.close()  # leaves without done: incd fails job 13 and tells rank 0, who does not read
        t0 = time.monotonic()
        st = admin_request(lab.incd.instance, {"op": "status"}, timeout=5)
        assert st["ok"] and time.monotonic() - t0 < 2
        res = run_allreduce(lab, job=14, world=1, numel=1000, dtype="int32", hosts=["h3"], timeout=30,
                            extra=["--verify"])
        assert res[0]["verified"]
        flooder.join(60)
        r0.close()
        fin = [j for j in lab.incd.status()["finished"] if j["job"] == 13]
    assert cut_off, "incd kept serving a member that reads nothing"
    # Whichever came first ended the job: rank 0 cut off by the flood, or rank 1 leaving.
    why = fin[-1]["end_reason"] if fin else ""
    assert ("rank 0" in why and "stopped reading its control connection" in why
            or "rank 1" in why and "left before finishing" in why), fin


def test_soak_registrations_and_killed_ranks_leave_incd_as_it_was(root):
    """300 one-rank jobs run and end, and 50 two-rank jobs lose their first rank
    while it waits for the second (its connection closes): afterwards incd has
    as many threads and descriptors as before, the memory it had after the
    first half of that (within 2 MiB), no job, and its whole pool free."""
    import os
    import time

    from helpers.control import Ctl
    from incd import daemon
    from netns_lab.harness import LabWithIncd

    def proc_counts(pid):
        return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))

    def rss_kb(pid):
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def one_job(i):
        c = Ctl(lab, f"h{i % 2 + 1}")
        job = 100 + i % 500
        assert c.call({"op": "register", "job": job, "rank": 0, "world": 1, "window": 8, "port": 40000})["ok"]
        assert c.call({"op": "done"})["ok"]
        c.close()

    with LabWithIncd("hs", workers=2) as lab:
        pid = daemon.read_state(lab.incd.instance)["pid"]
        pool = lab.incd.status()["pool_slots"]
        base = proc_counts(pid)

        def killed_while_registering(i):
            c = Ctl(lab, "h1")
            c.send({"op": "register", "job": 700 + i, "rank": 0, "world": 2, "window": 8, "port": 40000,
                    "timeout": 60})
            time.sleep(0.02)
            c.close()

        rss = []
        for half in (0, 1):  # the first half warms up (threads' malloc arenas, the finished-jobs history)
            for i in range(150):
                one_job(half * 150 + i)
            for i in range(25):
                killed_while_registering(half * 25 + i)
            time.sleep(0.5)
            rss.append(rss_kb(pid))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (lab.incd.status()["jobs"] or proc_counts(pid) != base):
            time.sleep(0.2)
        st = lab.incd.status()
        assert st["jobs"] == [], st["jobs"]  # the half-registered jobs went with their ranks, not after 60 s
        assert [(r["owner"], r["slots"]) for r in st["memory"]] == [(None, pool)], st["memory"]  # the pool whole
        threads, fds = proc_counts(pid)
        assert threads <= base[0] and fds <= base[1], (base, (threads, fds))
        # memory flat: the second half costs no lasting memory (1500 jobs in a row settle
        # within ~2.6 MiB of the first; 600 killed registrations within ~5 MiB, all early)
        print(f"incd RSS after each half: {rss} kB")
        assert rss[1] - rss[0] <= 2048, rss
        assert len(st["finished"]) >= 1
        # one address may hold 128 connections: the next is refused with a reason; closing frees them
        from incd.server import MAX_PER_ADDRESS

        held = [Ctl(lab, "h2") for _ in range(MAX_PER_ADDRESS)]
        assert all(c.call({"op": "ping"}) == {"ok": True} for c in held[:3])
        extra = Ctl(lab, "h2")
        reply = extra.reply()
        assert reply and not reply["ok"] and f"has {MAX_PER_ADDRESS} control connections open" in reply["error"]
        assert Ctl(lab, "h1").call({"op": "ping"}) == {"ok": True}  # other hosts are not affected
        for c in held + [extra]:
            c.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            c = Ctl(lab, "h2")
            ok = c.call({"op": "ping"}) == {"ok": True}
            c.close()
            if ok:
                break
            time.sleep(0.1)
        assert ok


def test_with_a_key_only_agents_that_hold_it_can_use_incd(lab2, tmp_path):
    """incd --key-file: registering needs the answer to incd's challenge (an
    HMAC of its nonce with the shared key); without the key, or with another,
    agents get a clear error and the job does not exist; with it, jobs run."""
    import os

    from helpers.control import Ctl
    from netns_lab.agents import run_allreduce

    key, other = tmp_path / "inc.key", tmp_path / "other.key"
    key.write_text("k" * 32)
    other.write_text("o" * 32)
    os.chmod(key, 0o600)
    with IncdProcess(lab2.name + "k", lab=lab2.name, extra=["--key-file", str(key)]) as incd:
        lab2.incd = incd
        base = ["allreduce", "--job", "15", "--rank", "0", "--world", "1", "--numel", "1000", "--quiet"]
        r = lab2.run("h1", [sys.executable, "-m", "hostagent.cli", *base], capture_output=True, text=True,
                     timeout=60)
        one_line_error(r, "incd requires a key", "--key-file")
        r = lab2.run("h1", [sys.executable, "-m", "hostagent.cli", *base, "--key-file", str(other)],
                     capture_output=True, text=True, timeout=60)
        one_line_error(r, "authentication failed")
        c = Ctl(lab2, "h2")  # a raw client: ping is open, registering is not
        assert c.call({"op": "ping"}) == {"ok": True}
        reply = c.call({"op": "register", "job": 16, "rank": 0, "world": 1, "window": 8, "port": 40000})
        assert not reply["ok"] and "incd requires a key" in reply["error"]
        c.close()
        assert not incd.status()["jobs"]
        res = run_allreduce(lab2, job=17, world=2, numel=5000, dtype="int32", timeout=60,
                            extra=["--verify", "--key-file", str(key)])
        assert all(r["verified"] for r in res)


def test_with_a_job_token_only_its_members_get_in(lab2):
    """--job-token: the first member's token is the job's; a registration
    without it, or with another, is refused with one line that tells nothing
    about the job (no shape, window or addresses), and changes nothing."""
    import subprocess as sp

    from helpers.control import Ctl
    from helpers.polling import wait_for
    from netns_lab.agents import agent_argv, collect

    token = "t0k3n-of-job-18"
    def argv(rank: int, tok: str = token) -> list[str]:
        return agent_argv("allreduce", "--job", "18", "--rank", str(rank), "--world", "2", "--numel", "5000",
                          "--dtype", "int32", "--verify", "--json", "--job-token", tok)

    with IncdProcess(lab2.name + "t", lab=lab2.name) as incd:
        lab2.incd = incd
        r0 = lab2.popen("h1", argv(0), stdout=sp.PIPE, stderr=sp.PIPE, text=True)
        procs = [("rank 0", r0)]
        try:
            wait_for(lambda: any(j["job"] == 18 for j in incd.status()["jobs"]), timeout=30,
                     what="rank 0 registering")
            c = Ctl(lab2, "h2")
            req = {"op": "register", "job": 18, "rank": 1, "world": 2, "window": 64, "port": 40000}
            for extra in ({}, {"job_token": "another-token"}):
                reply = c.call({**req, **extra})
                assert reply == {"ok": False, "error": "job 18: wrong or missing job token (its members "
                                 "registered with --job-token / INC_JOB_TOKEN)"}, reply
            c.close()
            bad = lab2.run("h2", argv(1, "wrong-token"), capture_output=True, text=True, timeout=60)
            one_line_error(bad, "wrong or missing job token")
            r1 = lab2.popen("h2", argv(1), stdout=sp.PIPE, stderr=sp.PIPE, text=True)
            procs.append(("rank 1", r1))
            res = collect(procs, job=18, timeout=60)
        finally:
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert all(r["verified"] for r in res), res
        # A job registered without a token takes no member that brings one.
        c0, c1 = Ctl(lab2, "h1"), Ctl(lab2, "h2")
        c0.send({**req, "job": 19, "rank": 0, "port": 40001})  # waits for rank 1: no reply yet
        wait_for(lambda: any(j["job"] == 19 for j in incd.status()["jobs"]), timeout=30,
                 what="job 19 registering")
        reply = c1.call({**req, "job": 19, "job_token": token})
        assert reply == {"ok": False, "error": "job 19 is registered without a job token; this request "
                         "has one"}, reply
        c0.close()
        c1.close()
