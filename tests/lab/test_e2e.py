"""End to end: real namespaces, the real daemon with XDP on the switch ports,
real agents. Inputs are written as .npy files and results read back, the way
a user checks the system, and compared with numpy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers.allreduce import allreduce_files, int_inputs
from hostagent import quantize
from incd.process import IncdProcess
from netns_lab.agents import agent_argv, run_allreduce
from netns_lab.topology import Lab
from netns_lab.harness import LabWithIncd, uniq

@pytest.fixture(scope="module")
def lab4(root):
    with Lab(uniq("e"), workers=4) as lab, IncdProcess(lab.name + "d", lab=lab.name) as incd:
        lab.incd = incd
        yield lab


@pytest.mark.parametrize("world,n", [(2, 1), (2, 801), (4, 799), (4, 123457)])
def test_int32_bit_exact(lab4, tmp_path, world, n):
    xs = int_inputs(world, n, seed=n)
    outs, res = allreduce_files(lab4, tmp_path, 10 + world, xs)
    expect = np.sum(np.stack(xs).astype(np.int64), axis=0).astype(np.int32)
    for y in outs:
        assert y.dtype == np.int32 and y.shape == (n,)
        assert np.array_equal(y, expect)
    assert all(r["numel"] == n and r["dtype"] == "int32" for r in res)


def test_fp32_within_quantization_bound(lab4, tmp_path):
    rng = np.random.default_rng(3)
    n = 54321
    xs = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32) for _ in range(4)]
    xs[2] = xs[2].reshape(3, 18107)  # shape survives the trip
    outs, res = allreduce_files(lab4, tmp_path, 20, xs)
    exact = np.sum(np.stack([x.ravel().astype(np.float64) for x in xs]), axis=0)
    block = res[0]["elems_per_packet"]
    e_max = np.max(np.stack([quantize.block_exponents(x, block) for x in xs]), axis=0)
    bound = quantize.error_bound(e_max, 4, block, n) + np.abs(exact) * 2.0**-23
    for r, y in enumerate(outs):
        assert y.dtype == np.float32 and y.shape == xs[r].shape
        assert np.all(np.abs(y.ravel().astype(np.float64) - exact) <= bound)
    # the bound is tight enough to mean something: well below the values' own size
    assert np.median(bound / np.maximum(np.abs(exact), 1e-30)) < 1e-6


def test_seeded_verify_and_iterations(lab4):
    res = run_allreduce(lab4, job=21, world=4, numel=30000, dtype="float32", iters=3, extra=["--verify"])
    for r in res:
        assert r["verified"] is True
        assert len(r["times_s"]) == 3 and r["median_s"] > 0 and r["goodput_gbps"] > 0


def test_counters_account_for_every_packet(lab4):
    n, world = 8000, 4  # 10 packets of 800 lanes
    run_allreduce(lab4, job=22, world=world, numel=n, dtype="int32")
    st = lab4.incd.status()
    rec = [j for j in st["finished"] if j["job"] == 22][-1]
    c = rec["counters"]
    assert c["slots_completed"] == 10
    assert c["results_mcast"] == 10 * world
    assert c["pkts_in"] == c["consumed"] + c["retrans_answered"] + sum(c["drops"].values())
    assert c["consumed"] == 10 * world
    assert not st["jobs"], "job should be gone once its members left"
    assert st["free_slots"] == st["pool_slots"]


SERVE = """
import socket, sys
t = socket.create_server(("0.0.0.0", 5001)); u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 5002)); print("ready", flush=True)
c, _ = t.accept(); c.sendall(c.recv(100).upper()); c.close()
d, a = u.recvfrom(100); u.sendto(d[::-1], a)
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=5); c.sendall(b"through the switch")
print(c.recv(100).decode()); u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(b"abc", (sys.argv[1], 5002)); print(u.recv(100).decode())
"""


def test_non_inc_traffic_still_forwarded(lab4):
    """With XDP on every port, TCP and non-INC UDP between hosts are forwarded by the kernel."""
    srv = lab4.popen("h3", [sys.executable, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        r = lab4.run("h1", [sys.executable, "-c", CLIENT, lab4.addr("h3")], capture_output=True, text=True, timeout=20)
        assert r.stdout.split() == ["THROUGH", "THE", "SWITCH", "cba"], r.stderr
    finally:
        srv.kill()


def test_status_while_a_job_runs(lab4):
    p0 = lab4.popen("h1", agent_argv("allreduce", "--job", "23", "--rank", "0", "--world", "2", "--numel", "10",
                                     "--register-timeout", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            st = lab4.incd.status()
            if any(j["job"] == 23 for j in st["jobs"]):
                break
            time.sleep(0.1)
        job = [j for j in st["jobs"] if j["job"] == 23][0]
        assert job["state"] == "pending" and job["members"][0]["rank"] == 0
        p1 = lab4.popen("h2", agent_argv("allreduce", "--job", "23", "--rank", "1", "--world", "2", "--numel", "10"),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p1.wait(30) == 0 and p0.wait(30) == 0
    finally:
        p0.kill()


def test_mismatched_registration_is_refused(lab4):
    p0 = lab4.popen("h1", agent_argv("allreduce", "--job", "24", "--rank", "0", "--world", "2", "--numel", "10",
                                     "--register-timeout", "5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    r = lab4.run("h2", agent_argv("allreduce", "--job", "24", "--rank", "1", "--world", "3", "--numel", "10"),
                 capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    # which field disagrees and what this rank said; the job's own values only in incd status
    assert "another world (see incd status); this request says world=3" in r.stderr
    assert "world=2" not in r.stderr and "Traceback" not in r.stderr
    _, err = p0.communicate(timeout=30)
    assert p0.returncode == 1 and "timed out" in err and "[1]" in err and "Traceback" not in err


def test_dead_rank_fails_the_others_without_hanging(lab4):
    p0 = lab4.popen("h1", agent_argv("allreduce", "--job", "25", "--rank", "0", "--world", "2", "--numel", "4000000",
                                     "--iters", "50", "--timeout", "2", "--quiet"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p1 = lab4.popen("h2", agent_argv("allreduce", "--job", "25", "--rank", "1", "--world", "2", "--numel", "4000000",
                                     "--iters", "50", "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3.0)
    p1.kill()
    t0 = time.time()
    _, err = p0.communicate(timeout=30)
    # incd saw rank 1's control connection close and told rank 0 (tests/test_failures.py)
    assert p0.returncode == 1 and "job 25 failed: rank 1" in err and "Traceback" not in err
    assert time.time() - t0 < 10


@pytest.mark.parametrize("impair", [{"loss_pct": 2.0}, {"reorder_pct": 20.0}], ids=["loss2pct", "reorder20pct"])
def test_exact_under_impairment(root, tmp_path, impair):
    with LabWithIncd("i", **impair) as lab:
        for world, n, job in ((2, 30001, 31), (4, 200003, 32)):
            xs = int_inputs(world, n, seed=job)
            outs, res = allreduce_files(lab, tmp_path, job, xs)
            expect = np.sum(np.stack(xs).astype(np.int64), axis=0).astype(np.int32)
            for y in outs:
                assert np.array_equal(y, expect)
        st = lab.incd.status()
        c = [j for j in st["finished"] if j["job"] == 32][-1]["counters"]
        if "loss_pct" in impair:
            # losses were really repaired: retransmissions sent and answered or re-added
            assert sum(r["retransmits"] for r in res) > 0
            assert c["retrans_answered"] + c["drops"]["dup"] > 0
        assert c["slots_completed"] == -(-n // res[0]["elems_per_packet"])


def test_incd_stop_leaves_nothing(root):
    """Stopped with a job running: no XDP program, pin, state or jobs file stays,
    and the job's ranks are told incd stopped."""
    import glob

    from helpers.polling import wait_active

    with Lab(uniq("s"), workers=2) as lab:
        incd = IncdProcess(lab.name + "d", lab=lab.name).start()
        st = incd.status()
        pin = st["pin_dir"]
        assert os.path.isdir(pin) and sorted(os.listdir(pin))
        links = lab.run("sw", ["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert links.count("xdp") >= 2
        ranks = [lab.popen(f"h{r + 1}", agent_argv("allreduce", "--job", "12", "--rank", str(r), "--world", "2",
                                                    "--iters", "100000", "--numel", "1000", "--quiet"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        lab.incd = incd
        wait_active(incd, 12)
        files = glob.glob(f"/run/incd/{incd.instance}.*")
        assert any(f.endswith(".jobs.json") for f in files), files  # the running job was saved
        incd.stop()
        errs = [p.communicate(timeout=30)[1] for p in ranks]
        assert all(p.returncode != 0 for p in ranks) and all("incd stopped" in e for e in errs), errs
        links = lab.run("sw", ["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "xdp" not in links
        assert not os.path.exists(pin)
        assert glob.glob(f"/run/incd/{incd.instance}.*") == []
        assert incd.status() == {"running": False, "instance": incd.instance}
        # a second stop is a no-op, a second start works
        assert "not running" in incd.stop()
        incd.start()
        incd.stop()


def test_incd_cli_errors(root):
    a, b = uniq("x"), uniq("x")
    try:
        r = subprocess.run([sys.executable, "-m", "incd.cli", "--instance", a, "start", "--lab", "nolab"],
                           capture_output=True, text=True)
        assert r.returncode == 1 and "inc-lab up" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run([sys.executable, "-m", "incd.cli", "--instance", b, "start", "--ports", "nosuchdev0",
                            "--wait", "30"], capture_output=True, text=True)
        assert r.returncode == 1 and "nosuchdev0" in r.stderr and "Traceback" not in r.stderr
    finally:
        IncdProcess(a).purge()
        IncdProcess(b).purge()


def test_agent_cli_errors(tmp_path):
    r = subprocess.run(agent_argv("allreduce", "--job", "1", "--rank", "3", "--world", "2"), capture_output=True, text=True)
    assert r.returncode == 1 and "--rank" in r.stderr
    np.save(tmp_path / "x.npy", np.zeros(3, dtype=np.float64))
    r = subprocess.run(agent_argv("allreduce", "--job", "1", "--rank", "0", "--world", "2", "--in", str(tmp_path / "x.npy")),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "float64" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(agent_argv("allreduce", "--job", "1", "--rank", "0", "--world", "1", "--switch", "127.0.0.1",
                                  "--numel", "4"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot reach incd" in r.stderr


def test_ranks_with_different_vectors_are_refused(lab4):
    p0 = lab4.popen("h1", agent_argv("allreduce", "--job", "26", "--rank", "0", "--world", "2", "--numel", "1000",
                                     "--dtype", "int32", "--register-timeout", "5"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    r = lab4.run("h2", agent_argv("allreduce", "--job", "26", "--rank", "1", "--world", "2", "--numel", "999",
                                  "--dtype", "int32"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "another data (see incd status); this request says data=999xint32" in r.stderr
    assert "1000xint32" not in r.stderr
    p0.communicate(timeout=30)


CTRL_CLIENT = """
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rwb")
for line in sys.argv[3:]:
    f.write(line.encode() + b"\\n"); f.flush()
    print(f.readline().decode().strip())
"""


def test_malformed_control_requests_get_errors(lab4):
    from bpf import wire
    reqs = ['{"op": "register", "job": 1, "rank": 0, "world": 2, "window": 8, "port": 5, "timeout": "x"}',
            '{"op": "register", "job": 0, "rank": 0, "world": 2, "window": 8, "port": 5}',
            '{"op": "register", "job": 3, "rank": 5, "world": 2, "window": 8, "port": 5}',
            '{"op": "frobnicate"}', '[1, 2]']
    r = lab4.run("h1", [sys.executable, "-c", CTRL_CLIENT, lab4.host("h1")["gateway"], str(wire.CTRL_PORT), *reqs],
                 capture_output=True, text=True, timeout=30)
    replies = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["ok"] for x in replies] == [False] * 5, r.stdout + r.stderr
    assert "timeout" in replies[0]["error"] and "'job'" in replies[1]["error"]
    assert "'rank'" in replies[2]["error"] and "unknown op" in replies[3]["error"]
    assert "bad request" in replies[4]["error"]
    assert lab4.incd.status()["running"]  # the daemon shrugs it off
    assert not lab4.incd.status()["jobs"]


@pytest.mark.parametrize("how", ["ports", "config"])
def test_start_with_explicit_ports(root, tmp_path, how):
    """What a box with real NICs does: ports (and their namespace) given, no lab lookup."""
    with Lab(uniq("p"), workers=2) as lab:
        ns, ports = lab.state["switch_netns"], [h["switch_port"] for h in lab.state["hosts"]]
        if how == "ports":
            extra = ["--netns", ns, "--ports", ",".join(ports)]
        else:
            cfg = tmp_path / "incd.json"
            cfg.write_text(json.dumps({"netns": ns, "ports": ports, "pool_slots": 512}))
            extra = ["--config", str(cfg)]
        with IncdProcess(lab.name + "d", lab="no-such-lab", extra=extra) as incd:
            st = incd.status()
            assert [p["name"] for p in st["ports"]] == ports
            assert st["pool_slots"] == (512 if how == "config" else 4096)
            res = run_allreduce(lab, job=3, world=2, numel=5000, dtype="int32", extra=["--verify"])
            assert all(r["verified"] for r in res)
