"""The host XDP receive path (--datapath xdp) end to end: exact results in
modulo and hash mode, what incd and the agent say was used, the fallback when
the host's veth already runs another XDP program, and no attachment left
behind by an agent that is killed."""
from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers.allreduce import allreduce_files, int_inputs
from helpers.polling import wait_for
from netns_lab.agents import AgentRunError, PSProcess, agent_argv, run_allreduce
from netns_lab.harness import LabWithIncd

# Holds an XDP program (XDP_PASS) on the namespace's eth0 until stdin closes:
# "another tool's program" for the fallback tests.
HOLD_XDP = r'''
import sys
from bcc import BPF
b = BPF(text="int other_tool(struct xdp_md *ctx) { return XDP_PASS; }")
b.attach_xdp("eth0", b.load_func("other_tool", BPF.XDP), 0)
print("attached", flush=True)
sys.stdin.read()
b.remove_xdp("eth0", 0)
'''


def xdp_prog(lab, host: str) -> str:
    out = lab.run(host, ["ip", "-o", "link", "show", "eth0"], capture_output=True, text=True, check=True).stdout
    return out.split("prog/xdp", 1)[1].split()[2] if "prog/xdp" in out else ""


def finished_members(lab, job: int) -> list[dict]:
    return [j for j in lab.incd.status()["finished"] if j["job"] == job][-1]["members"]


@pytest.fixture(scope="module")
def lab4(root):
    with LabWithIncd("xd", workers=4, ps=True) as lab:
        yield lab


@pytest.mark.parametrize("mode", ["modulo", "hash"])
def test_int32_exact_through_xdp(lab4, tmp_path, mode):
    job = 30 if mode == "modulo" else 31
    xs = int_inputs(4, 123457, seed=job)
    ps = PSProcess(lab4, job, 4, mode=mode, datapath="xdp") if mode == "hash" else None
    try:
        outs, res = allreduce_files(lab4, tmp_path, job, xs, extra=["--datapath", "xdp", "--mode", mode])
        pst = ps.result() if ps else None
    finally:
        if ps:
            ps.kill()
    expect = np.sum(np.stack(xs).astype(np.int64), axis=0).astype(np.int32)
    assert all(np.array_equal(y, expect) for y in outs)
    if pst:  # the PS's fast path answered the complete aggregates, its socket the rest
        npk = -(-123457 // res[0]["elems_per_packet"])
        assert pst["datapath"] == "xdp" and pst["results"] == npk, pst
        assert 0 < pst["xdp_results"] <= npk, pst
        assert xdp_prog(lab4, "ps") == ""
    assert [r["datapath"] for r in res] == ["xdp"] * 4, res
    assert [m["datapath"] for m in finished_members(lab4, job)] == ["xdp"] * 4
    assert all(xdp_prog(lab4, f"h{r + 1}") == "" for r in range(4))  # detached when the agents ended


def test_fp32_and_several_pieces_through_xdp(lab4):
    # 8192 packets per piece: 7 million lanes take a second piece.
    res = run_allreduce(lab4, job=32, world=2, numel=7_000_000, dtype="float32", iters=2,
                        extra=["--verify", "--datapath", "xdp"], timeout=240)
    assert all(r["verified"] and r["datapath"] == "xdp" for r in res), res


def test_auto_falls_back_to_sockets_beside_another_xdp_program(lab4):
    holder = lab4.popen("h1", [sys.executable, "-c", HOLD_XDP], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "attached"
        other = xdp_prog(lab4, "h1")
        assert other
        res = run_allreduce(lab4, job=33, world=2, numel=50_000, dtype="int32",
                            extra=["--verify", "--datapath", "auto"])
        assert [r["datapath"] for r in res] == ["socket", "xdp"], res
        assert "already runs an XDP program" in res[0]["datapath_note"]
        with pytest.raises(AgentRunError, match="--datapath xdp: eth0 already runs an XDP program"):
            run_allreduce(lab4, job=34, world=2, numel=50_000, dtype="int32", extra=["--datapath", "xdp"],
                          timeout=60)
        assert xdp_prog(lab4, "h1") == other  # never replaced or removed
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert xdp_prog(lab4, "h1") == ""


def test_killed_agent_leaves_no_xdp_program(lab4):
    # Rank 0 of a 2-rank job waits at the registration barrier with host_rx
    # attached; kill -9 must not leave the program on the veth.
    p = lab4.popen("h2", agent_argv("allreduce", "--job", "35", "--rank", "0", "--world", "2", "--numel", "10",
                                    "--datapath", "xdp", "--register-timeout", "60"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: xdp_prog(lab4, "h2") != "", timeout=30, what="host_rx attached")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    wait_for(lambda: xdp_prog(lab4, "h2") == "", timeout=10, what="host_rx detached after kill -9")


def test_bad_datapath_is_refused(lab4):
    r = lab4.run("h1", agent_argv("allreduce", "--job", "36", "--rank", "0", "--world", "1", "--numel", "10",
                                  "--datapath", "fast"), capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr


def test_ps_fast_path_falls_back_and_refuses_like_the_agents(lab4):
    holder = lab4.popen("ps", [sys.executable, "-c", HOLD_XDP], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "attached"
        other = xdp_prog(lab4, "ps")
        ps = PSProcess(lab4, 37, 2, mode="hash", datapath="auto")
        try:
            res = run_allreduce(lab4, job=37, world=2, numel=50_000, dtype="int32",
                                extra=["--verify", "--mode", "hash"])
            pst = ps.result()
        finally:
            ps.kill()
        assert all(r["verified"] for r in res)
        assert pst["datapath"] == "socket" and "already runs an XDP program" in pst["datapath_note"], pst
        assert pst["xdp_results"] == 0 and pst["results"] > 0
        r = lab4.run("ps", agent_argv("ps", "--job", "38", "--world", "2", "--datapath", "xdp",
                                      "--register-timeout", "5"), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "--datapath xdp: eth0 already runs an XDP program" in r.stderr, r.stderr
        assert xdp_prog(lab4, "ps") == other  # never replaced or removed
    finally:
        holder.stdin.close()
        holder.wait(10)
    r = lab4.run("ps", agent_argv("ps", "--job", "39", "--world", "2", "--mode", "ps", "--datapath", "xdp"),
                 capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "fast path serves hash mode only" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
