"""`incd start --config` with a bad value, as a user runs it: one line on
stderr naming the file and the key, exit status 1, no traceback, nothing
started. (Root: incd refuses to run otherwise; no lab is needed, the
config is refused before anything is touched.)"""
from __future__ import annotations

import json
import subprocess
import sys


def test_incd_start_refuses_a_bad_config_value_in_one_line(root, tmp_path):
    path = tmp_path / "incd.json"
    path.write_text(json.dumps({"ports": ["eth1"], "pool_slots": "16"}))
    r = subprocess.run([sys.executable, "-m", "incd.cli", "--instance", "inccfgtest", "start", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert r.stderr.strip() == (f"incd: config {path}: 'pool_slots' must be an integer in 1..1048576, got '16'"), r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "incd.cli", "--instance", "inccfgtest", "status"],
                       capture_output=True, text=True, timeout=60)
    assert "not running" in r.stdout
