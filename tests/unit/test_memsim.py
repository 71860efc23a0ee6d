"""The trace-driven simulator (scripts/memsim.py) on small generated traces."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "memsim.py"
spec = importlib.util.spec_from_file_location("memsim", SCRIPT)
memsim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memsim)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_job_finishes_and_edf_meets_more_deadlines(seed):
    trace = memsim.make_trace(seed, 30, 512, 500, 100, 2.0, 0.5)
    res = {p: memsim.simulate(trace, p) for p in ("fifo", "static", "edf")}
    link = memsim.Link(500e-6, 100e9)
    for r in res.values():
        assert r["jobs"] == 30
        assert 0 < r["memory_utilisation"] <= 1.0
        by_job = {d["job"]: d for d in r["per_job"]}
        for j in trace["jobs"]:  # nobody beats running alone with all it asked for
            alone = j["epochs"] * (j["compute_s"] + j["model_mb"] * 1e6 / link.throughput(j["want_slots"]))
            assert by_job[j["job"]]["jct_s"] >= alone * (1 - 1e-9)
    assert res["edf"]["deadlines_met"] >= res["fifo"]["deadlines_met"]
    assert res["edf"]["deadlines_met"] >= res["static"]["deadlines_met"]


def test_cli_reads_a_trace_and_writes_json_and_plot(tmp_path):
    trace = memsim.make_trace(5, 8, 256, 500, 100, 3.0, 0.5)
    (tmp_path / "t.json").write_text(json.dumps(trace))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(tmp_path / "t.json"), "--out", str(out),
                        "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "EDF average JCT / FIFO" in r.stdout
    res = json.loads(out.read_text())
    assert [x["policy"] for x in res["results"]] == ["fifo", "static", "edf"]
    assert png.stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(tmp_path / "nope.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "bad trace" in bad.stderr and "Traceback" not in bad.stderr


def test_a_hand_written_trace_with_only_the_required_fields(tmp_path):
    trace = {"pool_slots": 64, "rtt_us": 500, "link_gbps": 100, "jobs": [
        {"arrival_s": 0, "model_mb": 100, "epochs": 10},
        {"arrival_s": 1, "model_mb": 100, "epochs": 2, "deadline_s": 5, "want_slots": 33}]}
    t = memsim.normalize(trace)
    assert [j["job"] for j in t["jobs"]] == [1, 2] and t["jobs"][1]["want_slots"] == 32
    assert memsim.simulate(t, "edf")["jobs"] == 2
    for bad in ({"pool_slots": 64, "rtt_us": 1, "link_gbps": 1, "jobs": [{"arrival_s": 0}]},
                {"pool_slots": 64, "rtt_us": 1, "link_gbps": 1, "jobs": []},
                {"rtt_us": 1, "link_gbps": 1, "jobs": []}):
        with pytest.raises(ValueError):
            memsim.normalize(bad)
