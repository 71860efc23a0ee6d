"""Bad control requests against the real daemon in a real lab: malformed or
oversized lines, wrong fields, unknown jobs, conflicting registrations, and
clients that may not talk to incd. Each gets {"ok": false, "error": ...}, the
daemon's state does not change, and jobs afterwards run and verify exactly."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from bpf import control, wire
from helpers.control import Ctl
from helpers.polling import wait_active, wait_for
from incd import daemon
from incd.cli import admin_request
from incd.server import MAX_LINE
from netns_lab.agents import run_allreduce
from netns_lab.harness import LabWithIncd


@pytest.fixture(scope="module")
def lab(root):
    with LabWithIncd("ca", workers=4) as lab:
        yield lab


@pytest.fixture
def ctl(lab):
    """ctl(host) opens a control connection; all are closed after the test."""
    opened = []

    def open_(host: str, addr: str | None = None) -> Ctl:
        c = Ctl(lab, host, addr)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


def status(lab) -> dict:
    return admin_request(lab.incd.instance, {"op": "status"})


def state(lab) -> dict:
    """What a bad request must not change: jobs (without their live counters),
    finished jobs, and who holds which switch memory."""
    st = status(lab)
    jobs = [(j["job"], j["state"], j["mode"], j["gen"], j["world"], j["window"], j["offset"], j["slots"],
             j["deadline_in_s"] is None, j["model_bytes"], j["epochs"], j["compute_s"],
             [(m["rank"], m["addr"], m["port"], m["alive"]) for m in j["members"]]) for j in st["jobs"]]
    return {"jobs": jobs, "finished": [(j["job"], j["gen"], j["end_reason"]) for j in st["finished"]],
            "memory": st["memory"], "hash_region": st["hash_region"]}


def refused(reply: dict | None, *words: str) -> str:
    assert reply is not None, "no answer"
    assert reply["ok"] is False and isinstance(reply["error"], str), reply
    err = reply["error"]
    assert "\n" not in err and len(err) < 400, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


def reg(job: int, rank: int = 0, world: int = 2, **kw) -> dict:
    return {"op": "register", "job": job, "rank": rank, "world": world, "window": 8, "port": 40000, **kw}


BIG = 10 ** 400
BAD_LINES = {
    # line sent: words the error must contain
    "nesting bomb": (b"[" * 30000 + b"]" * 30000, ["nested too deeply"]),
    "nesting bomb in a field": (b'{"op": "ping", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}", ["nested too deeply"]),
    "NaN": (b'{"op": "register", "job": 1, "rank": 0, "world": 2, "window": 8, "port": 9, "epochs": NaN}', ["NaN"]),
    "Infinity": (b'{"op": "register", "job": 1, "rank": 0, "world": 2, "window": 8, "port": 9, "timeout": Infinity}',
                 ["Infinity"]),
    "-Infinity": (b'{"op": "ping", "x": -Infinity}', ["-Infinity"]),
    "float overflow": (b'{"op": "register", "job": 1, "rank": 0, "world": 2, "window": 8, "port": 9, "timeout": 1e999}',
                       ["out of range"]),
    "integer too long": (b'{"op": "ping", "x": ' + b"9" * 5000 + b"}", ["too many digits"]),
    "not UTF-8": (b'{"op": "ping", "x": "\xff\xfe"}', ["not UTF-8"]),
    "UTF-16": ('{"op": "ping"}'.encode("utf-16"), ["not UTF-8"]),
    "empty line": (b"", ["empty line"]),
    "blank line": (b" \t\r", ["empty line"]),
    "not JSON": (b"register job 1", ["not JSON"]),
    "truncated JSON": (b'{"op": "register", "job": 1', ["not JSON"]),
    "array": (b"[1, 2]", ["JSON object"]),
    "string": (b'"ping"', ["JSON object"]),
    "null": (b"null", ["JSON object"]),
    "no op": (b'{"job": 1}', ["'op'"]),
    "op not a string": (b'{"op": ["register"]}', ["'op'"]),
}
BAD_REQUESTS = {
    "unknown op": ({"op": "frobnicate" * 1000}, ["unknown op 'frobnicatefrob"]),
    "register, no fields": ({"op": "register"}, ["'job'"]),
    "job a string": (reg("1"), ["'job'"]),
    "job a bool": (reg(True), ["'job'"]),
    "job 0": (reg(0), ["'job'"]),
    "job too big": (reg(wire.MAX_JOBS), ["'job'"]),
    "world 0": (reg(1, world=0), ["'world'"]),
    "world too big": (reg(1, world=wire.MAX_WORKERS + 1), ["'world'"]),
    "rank outside world": (reg(1, rank=5), ["'rank'"]),
    "rank a float": (reg(1, rank=0.5), ["'rank'"]),
    "window 0": (reg(1, window=0), ["'window'"]),
    "window huge": (reg(1, window=BIG), ["'window'"]),
    "port 0": (reg(1, port=0), ["'port'"]),
    "port too big": (reg(1, port=70000), ["'port'"]),
    "mode": (reg(1, mode="ring"), ["unsupported mode 'ring'"]),
    "mode a long list": (reg(1, mode=list(range(5000))), ["unsupported mode [0, 1,"]),
    "role": (reg(1, role="boss"), ["'role'"]),
    "modulo PS": (reg(1, role="ps"), ["no parameter server"]),
    "shape": (reg(1, shape=123), ["'shape'"]),
    "shape too long": (reg(1, shape="x" * 100), ["'shape'"]),
    "timeout a string": (reg(1, timeout="x"), ["'timeout'"]),
    "timeout negative": (reg(1, timeout=-1), ["'timeout'"]),
    "timeout huge": (reg(1, timeout=BIG), ["'timeout'"]),
    "deadline huge": (reg(1, deadline_s=BIG), ["'deadline_s'"]),
    "deadline a string": (reg(1, deadline_s="soon"), ["'deadline_s'"]),
    "deadline 0": (reg(1, deadline_s=0), ["'deadline_s'"]),
    "model_bytes huge": (reg(1, model_bytes=BIG), ["'model_bytes'"]),
    "epochs negative": (reg(1, epochs=-1), ["'epochs'"]),
    "compute_s huge": (reg(1, compute_s=1e300), ["'compute_s'"]),
    "done unregistered": ({"op": "done"}, ["before 'register'"]),
    "done for some job": ({"op": "done", "job": 1}, ["before 'register'"]),
    "wait_end unregistered": ({"op": "wait_end", "job": 1}, ["before 'register'"]),
    "remap_report unregistered": ({"op": "remap_report", "remap": 1, "next_psn": 0}, ["before 'register'"]),
}


@pytest.mark.parametrize("line,words", list(BAD_LINES.values()) + list(BAD_REQUESTS.values()),
                         ids=list(BAD_LINES) + list(BAD_REQUESTS))
def test_bad_request_is_answered_and_changes_nothing(lab, ctl, line, words):
    before = state(lab)
    c = ctl("h1")
    err = refused(c.call(line), *words)
    assert len(err) < 200  # what the client sent is echoed cut short
    assert c.call({"op": "ping"}) == {"ok": True}  # the line was read whole: the connection goes on
    assert state(lab) == before


def test_oversized_line_is_answered_then_the_connection_closed(lab, ctl):
    before = state(lab)
    c = ctl("h2")
    refused(c.call(b'{"op": "ping", "x": "' + b"x" * MAX_LINE + b'"}'), f"longer than {MAX_LINE} bytes")
    assert c.reply() is None  # closed: the rest of that line cannot be told from a request
    c = ctl("h2")  # a new connection is served, and a line of exactly the limit (newline included) is read
    assert c.call(b'{"op": "ping", "x": "' + b"x" * (MAX_LINE - 24) + b'"}') == {"ok": True}
    assert state(lab) == before


def test_clients_that_may_not_talk(lab, ctl):
    before = state(lab)
    sw_port = lab.host("h1")["gateway"]
    # not in the allow list (the switch ports' networks): refused at once, connection closed
    c = ctl("sw", "127.0.0.1")
    refused(c.reply(), "127.0.0.1 may not use this switch")
    assert c.reply() is None
    # in the allow list, but not behind a switch port (the switch's own address): may ask, may not join
    c = ctl("sw", sw_port)
    assert c.call({"op": "ping"}) == {"ok": True}
    refused(c.call(reg(7, rank=0, world=1)), "not reached through a switch port")
    assert state(lab) == before


NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
ADMIN_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    raise SystemExit
try:
    s.sendall(b'{"op": "stop"}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # incd refused at accept and closed: its answer is still there to read
print(s.makefile().readline().strip())
"""


def test_admin_socket_is_root_only(lab):
    path = daemon.admin_path(lab.incd.instance)
    st, dst = os.stat(path), os.stat(path.parent)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert dst.st_uid == 0 and not stat.S_IMODE(dst.st_mode) & 0o022  # nobody else can replace it
    # a user: the file mode keeps it out
    r = subprocess.run([*NOBODY, sys.executable, "-c", ADMIN_CLIENT, str(path)], capture_output=True, text=True,
                       timeout=30, cwd="/")
    assert r.stdout.strip() == "EACCES", r.stdout + r.stderr
    # a user who can bypass file modes (CAP_DAC_OVERRIDE): the peer's uid is checked too
    caps = ["--inh-caps", "+dac_override", "--ambient-caps", "+dac_override"]
    r = subprocess.run([*NOBODY, *caps, sys.executable, "-c", ADMIN_CLIENT, str(path)], capture_output=True,
                       text=True, timeout=30, cwd="/")
    refused(json.loads(r.stdout), "uid 65534 may not administer incd")
    assert status(lab)["pid"]  # and it did not stop
    for line, words in [(b"\xff\n", ["not UTF-8"]), (b'{"op": "' + b"z" * 500 + b'"}\n', ["unknown op 'zzz"])]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(line)
            refused(json.loads(s.makefile("rb").readline()), *words)
    assert status(lab)["pid"]


def test_conflicts_with_a_registering_job(lab, ctl):
    """Job 21 has rank 0 (from h3) waiting for rank 1: refused joins change nothing
    about it (not even its deadline), then the real rank 1 completes it."""
    r0 = ctl("h3")
    r0.send(reg(21, rank=0, timeout=60))
    wait_for(lambda: any(j["job"] == 21 for j in status(lab)["jobs"]), what="job 21 registering")
    before = state(lab)
    conflicts = [
        ("h4", reg(21, rank=0, deadline_s=5, model_bytes=10**9), ["rank 0 is already registered"]),
        ("h3", reg(21, rank=1, deadline_s=5, model_bytes=10**9), ["one member per port per job"]),
        ("h4", reg(21, rank=1, window=16, deadline_s=5), ["with another window (see incd status)", "says window=16"]),
        ("h4", reg(21, rank=1, shape="9xint32", deadline_s=5), ["another data", "says data=9xint32"]),
        ("h4", reg(21, rank=2, world=3, deadline_s=5), ["being registered with another world", "says world=3"]),
        ("h4", reg(21, rank=1, mode="ps", deadline_s=5), ["another mode", "says mode=ps"]),
        ("h4", reg(21, rank=1, timeout=BIG), ["'timeout'"]),
    ]
    for host, req, words in conflicts:
        c = ctl(host)
        err = refused(c.call(req), *words)
        # what the job was registered with, and from where, is not told to whoever asks
        assert not any(w in err for w in ("window=8", "data=None", "world=2", "mode=modulo", "10.")), err
        assert c.call({"op": "ping"}) == {"ok": True}
        assert state(lab) == before, req
    r1 = ctl("h4")
    a1, a0 = r1.call(reg(21, rank=1, timeout=60)), r0.reply()
    assert a0["ok"] and a1["ok"] and a0["gen"] == a1["gen"] and a0["offset"] == a1["offset"]
    job = wait_active(lab.incd, 21)
    assert job["deadline_in_s"] is None and job["model_bytes"] == 0
    running = state(lab)
    # a registered connection cannot join twice, nor end or watch another job
    refused(r0.call(reg(22, rank=0, world=1)), "already registered")
    refused(r0.call({"op": "done", "job": 99}), "job 99 is not this connection's job (job 21)")
    refused(r0.call({"op": "wait_end", "job": 99}), "job 99 is not this connection's job")
    refused(r1.call({"op": "frobnicate"}), "unknown op 'frobnicate'")
    assert state(lab) == running
    assert r0.call({"op": "done", "job": 21}) == {"ok": True}
    assert r1.call({"op": "done"}) == {"ok": True}
    fin = [j for j in status(lab)["finished"] if j["job"] == 21]
    assert fin and fin[-1]["end_reason"] == "all workers left"
    assert not any(j["job"] == 21 for j in status(lab)["jobs"])


def test_conflicts_with_a_running_job(lab, ctl):
    """Job 31 runs real traffic on h1, h2; registrations for the same job id
    with another world, mode or a running rank are refused while it keeps
    running and verifies every iteration."""
    res: list = []
    runner = threading.Thread(target=lambda: res.append(run_allreduce(
        lab, job=31, world=2, numel=20000, dtype="int32", iters=3000, timeout=300,
        extra=["--verify", "--window", "16", "--quiet"])))
    runner.start()
    try:
        wait_active(lab.incd, 31)
        before = state(lab)
        (rec,) = [j for j in before["jobs"] if j[0] == 31]
        conflicts = [
            ("h3", reg(31, rank=2, world=3), ["job 31 is running with another world", "says world=3"]),
            ("h3", reg(31, rank=1, mode="hash"), ["running with", "mode=hash"]),
            ("h3", reg(31, rank=1, role="ps", mode="hash"), ["running with", "mode=hash"]),
            ("h3", reg(31, rank=0, deadline_s=5, model_bytes=10**9),
             ["job 31 is running (ranks [0, 1] have not finished)", "reused once that run ends"]),
            ("h4", reg(31, rank=1, window=64), ["job 31 is running"]),
        ]
        for host, req, words in conflicts:
            c = ctl(host)
            refused(c.call(req), *words)
            assert c.call({"op": "ping"}) == {"ok": True}
        after = state(lab)
        assert [j for j in after["jobs"] if j[0] == 31] == [rec], "the running job changed"
        assert after["memory"] == before["memory"]
        assert not [j for j in after["finished"] if j[0] == 31]
    finally:
        runner.join(300)
    assert res and all(r["verified"] for r in res[0]), res
    fin = [j for j in status(lab)["finished"] if j["job"] == 31]
    assert [(j["gen"], j["end_reason"]) for j in fin] == [(rec[3], "all workers left")]


def test_a_finished_rank_is_not_replaced_by_a_stranger(lab, ctl):
    """Rank 0 of job 32 said done while rank 1 still runs: a registration of job 32
    from another host (as rank 0, or any rank) is refused, rank 1 is not told of
    any failure, and the job ends normally when rank 1 is done."""
    r0, r1 = ctl("h1"), ctl("h2")
    r0.send(reg(32, rank=0, timeout=30))
    a1, a0 = r1.call(reg(32, rank=1, timeout=30)), r0.reply()
    assert a0["ok"] and a1["ok"]
    wait_active(lab.incd, 32)
    assert r0.call({"op": "done"}) == {"ok": True}
    for host, rank in (("h3", 0), ("h4", 1), ("h1", 0)):
        err = refused(ctl(host).call(reg(32, rank=rank, timeout=5)), "job 32 is running (ranks [1] have not finished)")
        assert "10.77." not in err  # says who is missing, not where members are
    (job,) = [j for j in status(lab)["jobs"] if j["job"] == 32]
    assert job["state"] == "active" and [m["alive"] for m in job["members"]] == [False, True]
    assert r1.call({"op": "ping"}) == {"ok": True}  # no job_failed event came before the answer
    assert r1.call({"op": "done"}) == {"ok": True}
    fin = [j for j in status(lab)["finished"] if j["job"] == 32]
    assert [j["end_reason"] for j in fin] == ["all workers left"]


def test_control_api_version(lab, ctl):
    """A "register" or "rejoin" in a control-API version this incd does not speak
    is refused naming both versions, and changes nothing; the agents' version,
    and none at all (version 1, before the field existed), are served."""
    before = state(lab)
    v, other = control.CONTROL_VERSION, control.CONTROL_VERSION + 1
    for req in (reg(51, rank=0, world=1, version=other),
                {"op": "rejoin", "job": 51, "rank": 0, "gen": 1, "version": other}):
        c = ctl("h1")
        refused(c.call(req), f"control API version {other} is not supported by this incd (speaks {v})",
                "upgrade inc-agent or incd")
        assert c.call({"op": "ping"}) == {"ok": True}
    refused(ctl("h1").call(reg(51, rank=0, world=1, version="1")), "'version'")
    assert state(lab) == before
    for job, extra in ((52, {"version": v}), (53, {})):
        c = ctl("h1")
        a = c.call(reg(job, rank=0, world=1, timeout=30, **extra))
        assert a["ok"] and a["job"] == job, a
        assert c.call({"op": "done"}) == {"ok": True}
    assert state(lab)["jobs"] == before["jobs"]


def test_after_all_that_jobs_run_exactly(lab):
    st = status(lab)
    assert not st["jobs"] and st["memory"] == [{"offset": 0, "slots": st["pool_slots"], "owner": None}]
    res = run_allreduce(lab, job=41, world=4, numel=12345, dtype="int32", iters=3, timeout=120,
                        extra=["--verify"])
    assert len(res) == 4 and all(r["verified"] for r in res)
