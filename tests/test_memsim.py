"""The trace-driven simulator (scripts/memsim.py) on small generated traces."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "memsim.py"
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
