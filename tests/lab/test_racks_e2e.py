"""Two-tier aggregation end to end (issue 18): a lab with racks (leaf switches
and a spine), one incd for all of them, real agents. A job across racks is
summed at each leaf, the leaves' partials at the spine, the result comes down
and is replicated: results exact (int32) and verified (fp32) on both data
paths, and each switch's counters show one partial per leaf and psn going up
and one result coming down. A job within one rack stays on its leaf. Loss on
the leaf-spine links (and on the host links too): still exact, and the leaves
resent partials. Hash jobs and jumbo frames across racks are refused with the
reason. incd killed and restarted mid-job: the members rejoin and the job
finishes exactly on the same region. A rank killed mid-job: the others are
told who.

Every lab (and its incd) is removed at the end, also when a test fails; the
module checks that no namespace, incd file or pin of its labs is left over.
"""
from __future__ import annotations

import json
import time

import pytest

from bpf import wire
from helpers.agents import Agent, assert_failed, assert_reclaimed, exits_after
from helpers.polling import wait_rejoined, wait_running
from incd import daemon
from netns_lab import nsutil
from netns_lab.agents import AgentRunError, PSProcess, run_allreduce
from netns_lab.harness import LabWithIncd, run_concurrently
from netns_lab.plan import MTU_JUMBO

NAMES: list[str] = []  # every lab this module made
FAIL_TIMEOUT = 2.0
JUMBO = ["--datapath", "xdp", "--frame", "jumbo", "--window", "160"]


def racks_lab(**kw) -> LabWithIncd:
    lw = LabWithIncd("re", **kw)
    NAMES.append(lw.lab.name)
    return lw


@pytest.fixture(autouse=True, scope="module")
def _nothing_left_over(root):
    yield
    leaked = []
    for name in NAMES:
        inst = name + "d"
        leaked += nsutil.list_netns(f"{name}-")
        leaked += [str(p) for p in daemon.RUN_DIR.glob(f"{inst}.*")]
        leaked += [str(daemon.pin_dir(inst))] if daemon.pin_dir(inst).exists() else []
    assert not leaked, f"left over: {leaked}"


@pytest.fixture(scope="module")
def fab():
    """2 racks x 2 workers (h1 h2 on leaf1, h3 h4 on leaf2), a PS in rack 1 (for
    the hash refusal) and jumbo MTU (for the jumbo refusal; standard jobs still
    use 3.2 KB packets)."""
    with racks_lab(workers=4, racks=2, ps=True, mtu=MTU_JUMBO) as lab:
        yield lab


def finished(lab, job: int) -> dict:
    return [j for j in lab.incd.status()["finished"] if j["job"] == job][-1]


def psns_of(res: list[dict]) -> int:
    """Psns the job went through: packets per iteration (the same on every rank) x iterations."""
    ppi = {r["packets_per_iter"] for r in res}
    assert len(ppi) == 1, res
    return int(ppi.pop()) * res[0]["iters"]


def assert_two_tier_counters(rec: dict, psns: int, per_leaf: int) -> dict:
    """The counters of a job across two racks of per_leaf ranks each."""
    assert rec["tiers"] == 2, rec
    c = rec["counters"]
    sw = c["switches"]
    assert set(sw) == {"leaf1", "leaf2", "spine"}, c
    sp = sw["spine"]
    # the top-level counters are the spine's: psns complete there
    assert all(c[k] == v for k, v in sp.items()), (c, sp)
    # the spine takes each leaf's partial once per psn and completes each psn once
    assert sp["consumed"] == 2 * psns and sp["slots_completed"] == psns, sp
    assert sp["up_sent"] == 0 and sp["down_received"] == 0, sp
    for leaf in ("leaf1", "leaf2"):
        lc = sw[leaf]
        # a leaf sums its rack's ranks (each rank's packet taken once) and sends one partial up
        assert lc["consumed"] == per_leaf * psns, (leaf, lc)
        assert lc["up_sent"] == psns, (leaf, lc)
        # every psn's result came down and was taken once (a rank that timed out
        # on a busy machine resends, its leaf resends the partial and the spine
        # answers it: up_resent is not always 0 even without loss, but a second
        # result for a complete slot is dropped, never counted)
        assert lc["down_received"] == psns, (leaf, lc)
    return c


# --- 1. a job across racks --------------------------------------------------------

@pytest.mark.parametrize("datapath", ["socket", "xdp"])
def test_a_job_across_racks_is_exact_and_summed_at_leaves_and_spine(fab, datapath):
    job = {"socket": 11, "xdp": 12}[datapath]
    res = run_allreduce(fab, job=job, world=4, numel=200_003, dtype="int32", iters=3,
                        extra=["--verify", "--datapath", datapath], timeout=120)
    assert all(r["verified"] and r["max_abs_err"] == 0 and r["datapath"] == datapath for r in res), res
    rec = finished(fab, job)
    assert {m["rank"]: m["switch_port"] for m in rec["members"]} == \
        {0: "leaf1/p1", 1: "leaf1/p2", 2: "leaf2/p3", 3: "leaf2/p4"}, rec["members"]
    assert_two_tier_counters(rec, psns_of(res), 2)
    assert rec["end_reason"] == "all workers left"
    assert_reclaimed(fab, job)


def test_a_float32_job_across_racks_is_within_the_bound(fab):
    res = run_allreduce(fab, job=13, world=4, numel=1 << 19, dtype="float32", iters=2,
                        extra=["--verify", "--datapath", "xdp"], timeout=120)
    assert all(r["verified"] and r["dtype"] == "float32" for r in res), res
    assert_two_tier_counters(finished(fab, 13), psns_of(res), 2)


def test_a_job_across_racks_with_an_uneven_split_is_exact(fab):
    """Three ranks: two behind leaf1, one behind leaf2 (a leaf of one rank still
    sends its partial up)."""
    res = run_allreduce(fab, job=14, world=3, numel=50_001, dtype="int32", iters=2,
                        extra=["--verify", "--datapath", "xdp"], hosts=["h1", "h3", "h2"], timeout=120)
    assert all(r["verified"] for r in res), res
    rec = finished(fab, 14)
    psns = psns_of(res)
    sw = rec["counters"]["switches"]
    assert rec["tiers"] == 2 and set(sw) == {"leaf1", "leaf2", "spine"}, rec
    assert sw["leaf1"]["consumed"] == 2 * psns and sw["leaf2"]["consumed"] == psns, sw
    assert sw["leaf1"]["up_sent"] == psns and sw["leaf2"]["up_sent"] == psns, sw
    assert sw["spine"]["consumed"] == 2 * psns and sw["spine"]["slots_completed"] == psns, sw


# --- 2. jobs within one rack ---------------------------------------------------------

def test_jobs_within_one_rack_stay_on_their_leaf(fab):
    """One job per rack at once: each is summed on its leaf alone (one tier),
    nothing goes up, the spine is not on its path."""
    runs = run_concurrently({
        leaf: (lambda job=job, hosts=hosts: run_allreduce(
            fab, job=job, world=2, numel=100_001, dtype="int32", iters=3,
            extra=["--verify", "--datapath", "xdp"], hosts=hosts, timeout=120))
        for leaf, job, hosts in (("leaf1", 21, ["h1", "h2"]), ("leaf2", 22, ["h3", "h4"]))}, timeout=150)
    for leaf, job in (("leaf1", 21), ("leaf2", 22)):
        res = runs[leaf]
        assert all(r["verified"] for r in res), res
        rec = finished(fab, job)
        c = rec["counters"]
        assert rec["tiers"] == 1 and set(c["switches"]) == {leaf}, rec
        psns = psns_of(res)
        assert c["consumed"] == 2 * psns and c["slots_completed"] == psns, c
        assert c["up_sent"] == 0 and c["up_resent"] == 0 and c["down_received"] == 0, c
        assert all(m["switch_port"].startswith(leaf + "/") for m in rec["members"]), rec["members"]


# --- 4. what a fabric does not run ---------------------------------------------------

def test_a_hash_job_on_racks_is_refused_with_the_reason(fab):
    ps = PSProcess(fab, 31, 4)
    try:
        with pytest.raises(AgentRunError) as e:
            run_allreduce(fab, job=31, world=4, numel=1000, dtype="int32",
                          extra=["--mode", "hash", "--verify"], timeout=60)
        msg = str(e.value)
        assert msg.count("hash jobs do not run on a two-tier fabric yet (only modulo jobs)") == 4, msg
        assert "Traceback" not in msg, msg
        with pytest.raises(AgentRunError, match="hash jobs do not run on a two-tier fabric"):
            ps.result()
    finally:
        ps.kill()
    st = fab.incd.status()
    assert not [j for j in st["jobs"] if j["job"] == 31] and st["free_slots"] == st["pool_slots"], st["jobs"]
    assert st["hash_region"] is None


def test_jumbo_frames_across_racks_are_refused_and_within_a_rack_run(fab):
    with pytest.raises(AgentRunError) as e:
        run_allreduce(fab, job=32, world=2, numel=3 * wire.JUMBO_ELEMS, dtype="int32",
                      extra=["--verify", *JUMBO], hosts=["h1", "h3"], timeout=60)
    msg = str(e.value)
    assert msg.count("jumbo frames need the job's ranks behind one leaf; they sit behind leaf1, leaf2") == 2, msg
    assert "Traceback" not in msg, msg
    st = fab.incd.status()
    assert not [j for j in st["jobs"] if j["job"] == 32] and st["free_slots"] == st["pool_slots"]
    # the same job behind one leaf runs
    res = run_allreduce(fab, job=33, world=2, numel=3 * wire.JUMBO_ELEMS + 5, dtype="int32", iters=2,
                        extra=["--verify", *JUMBO], hosts=["h3", "h4"], timeout=60)
    assert all(r["verified"] and r["frame"] == "jumbo" for r in res), res
    rec = finished(fab, 33)
    assert rec["tiers"] == 1 and rec["frame"] == "jumbo" and set(rec["counters"]["switches"]) == {"leaf2"}, rec


# --- 5. incd killed and restarted mid-job -----------------------------------------------

def test_killed_incd_is_restarted_and_the_job_across_racks_finishes(fab):
    """incd SIGKILLed while a job across racks runs: its pinned maps and
    programs stay on every leaf and the spine; the restarted incd takes the job
    back on the same region, generation, tiers and path, the members rejoin,
    the job finishes exactly and the counters went on (every psn completed
    once at the spine over both incds)."""
    # ~50 s on the 2-core test machine, where a restart (a build for each of
    # the three switches) takes ~22 s and the members' rejoin starts at once
    job, iters, numel = 41, 5000, 100_000
    ws = [Agent(fab, f"h{r + 1}", "allreduce", "--job", str(job), "--rank", str(r), "--world", "4",
                "--numel", str(numel), "--dtype", "int32", "--iters", str(iters), "--verify", "--json",
                "--quiet", "--datapath", "xdp") for r in range(4)]
    try:
        before = wait_running(fab, job, ws, completed=200)
        assert before["tiers"] == 2 and set(before["counters"]["switches"]) == {"leaf1", "leaf2", "spine"}
        fab.incd.kill()
        assert daemon.recoverable(fab.incd.instance)
        try:
            fab.incd.start()
        except BaseException:
            fab.incd.stop()  # whatever the dead one left (XDP, pins, files)
            raise
        after = wait_rejoined(fab, job, ws)
        assert (after["offset"], after["slots"], after["gen"], after["tiers"]) == \
            (before["offset"], before["slots"], before["gen"], 2)
        assert [m["switch_port"] for m in after["members"]] == [m["switch_port"] for m in before["members"]]
        assert all(a.proc.poll() is None for a in ws), "the job ended before incd was back; raise iters"
        res = []
        for a in ws:
            out, _ = a.proc.communicate(timeout=240)
            assert a.proc.returncode == 0, a.stderr()[-800:]
            res.append(json.loads(out.strip().splitlines()[-1]))
        assert all(r["verified"] and r["rejoins"] == 1 for r in res), res
        rec = assert_reclaimed(fab, job)
        assert_two_tier_counters(rec, psns_of(res), 2)
    finally:
        for a in ws:
            a.kill()


# --- 6. a rank killed mid-job ---------------------------------------------------------

def test_a_rank_killed_mid_job_fails_the_job_across_racks(fab):
    job = 51
    ws = [Agent(fab, f"h{r + 1}", "allreduce", "--job", str(job), "--rank", str(r), "--world", "4",
                "--numel", "400000", "--dtype", "int32", "--iters", "100000", "--timeout", "60",
                "--fail-timeout", str(FAIL_TIMEOUT)) for r in range(4)]
    try:
        deadline = time.time() + 60
        while not all("iter 1/" in a.stderr() for a in ws):
            assert time.time() < deadline, [a.stderr()[-300:] for a in ws]
            assert all(a.proc.poll() is None for a in ws), [a.stderr()[-300:] for a in ws]
            time.sleep(0.05)
        time.sleep(0.3)
        ws[2].proc.kill()  # behind leaf2; ranks 0 and 1 only hear of it through incd
        t0 = time.monotonic()
        rest = [ws[0], ws[1], ws[3]]
        took = exits_after(rest, t0, timeout=30)
        assert_failed(rest, took, f"job {job} failed: rank 2", within=30)
        rec = assert_reclaimed(fab, job)
        assert "rank 2" in rec["end_reason"] and rec["tiers"] == 2, rec
    finally:
        for a in ws:
            a.kill()
    # the fabric is clean afterwards: the next job across racks is exact
    res = run_allreduce(fab, job=job, world=4, numel=30_001, dtype="int32", iters=2,
                        extra=["--verify", "--datapath", "xdp"], timeout=120)
    assert all(r["verified"] for r in res), res
    assert_two_tier_counters(finished(fab, job), psns_of(res), 2)


# --- 3. loss on the spine links (and the host links) -------------------------------------

@pytest.mark.parametrize("host_loss", [0.0, 2.0], ids=["spine-loss", "spine-and-host-loss"])
def test_a_job_across_racks_stays_exact_under_loss(host_loss):
    """8 workers on 2 racks, 3% loss each way on every leaf-spine link (and 2% on
    every host link): int32 exact, fp32 verified; partials were resent up or
    answered by the spine, and every psn still completed once at the spine."""
    with racks_lab(workers=8, racks=2, spine_loss_pct=3.0, loss_pct=host_loss) as lab:
        res = run_allreduce(lab, job=61, world=8, numel=100_003, dtype="int32", iters=3,
                            extra=["--verify", "--seed", "61", "--datapath", "xdp"], timeout=180)
        assert all(r["verified"] and r["max_abs_err"] == 0 for r in res), res
        assert sum(r["retransmits"] for r in res) > 0, res
        c = assert_two_tier_counters(finished(lab, 61), psns_of(res), 4)
        sw = c["switches"]
        print("switches", {k: {n: v[n] for n in ("consumed", "up_sent", "up_resent", "down_received",
                                                 "retrans_answered")} for k, v in sw.items()})
        assert sum(sw[leaf]["up_resent"] for leaf in ("leaf1", "leaf2")) > 0 or \
            sw["spine"]["retrans_answered"] > 0, sw
        res = run_allreduce(lab, job=62, world=8, numel=100_003, dtype="float32", iters=2,
                            extra=["--verify", "--seed", "62", "--datapath", "socket"], timeout=180)
        assert all(r["verified"] for r in res), res
        assert_two_tier_counters(finished(lab, 62), psns_of(res), 4)


# --- 7. live resize across racks ----------------------------------------------------

def test_a_job_across_racks_resized_live_stays_exact_on_every_switch(root):
    """EDF shrinks a running job across racks for a deadline job (itself across
    racks) and grows it back: the new region and generation are programmed on
    both leaves and the spine while partials are in flight, and every
    iteration of both jobs stays exact."""
    with racks_lab(workers=4, racks=2, incd_args=["--pool-slots", "256", "--policy", "edf"]) as lab:
        big = [Agent(lab, f"h{r + 1}", "allreduce", "--job", "3", "--rank", str(r), "--world", "4",
                     "--numel", "400000", "--dtype", "int32", "--iters", "300", "--verify", "--json", "--quiet",
                     "--window", "128") for r in range(4)]
        try:
            deadline = time.time() + 90
            while not any(j["job"] == 3 and j["slots"] == 256 for j in lab.incd.status()["jobs"]):
                assert time.time() < deadline and all(a.proc.poll() is None for a in big), \
                    [a.stderr()[-300:] for a in big]
                time.sleep(0.1)
            res = run_allreduce(lab, job=4, world=2, numel=200000, dtype="int32", iters=30,
                                extra=["--verify", "--window", "32", "--deadline", "30", "--model-bytes", "50000000",
                                       "--epochs", "5", "--compute-s", "0.1"], hosts=["h2", "h3"], timeout=120)
            assert all(r["verified"] for r in res), res
            assert finished(lab, 4)["tiers"] == 2
            live = [j for j in lab.incd.status()["jobs"] if j["job"] == 3]
            assert live and live[0]["resizes"] >= 1 and live[0]["tiers"] == 2, \
                "the job across racks should have been shrunk, and still run"
            outs = []
            for a in big:
                out, _ = a.proc.communicate(timeout=240)
                assert a.proc.returncode == 0, a.stderr()[-800:]
                outs.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for a in big:
                a.kill()
        assert all(o["verified"] and o["resizes"] >= 1 for o in outs), outs
        rec = finished(lab, 3)
        # each generation's psns completed once at the spine, one partial per leaf each
        sp = rec["counters"]["switches"]["spine"]
        assert sp["consumed"] == 2 * sp["slots_completed"], sp
