"""The package as a user installs it (issue 14): the wheel built from the
sources, installed into a fresh venv of the system Python (with its site
packages, for bcc), run from a folder outside the checkout. incd, inc-agent
and inc-lab start; the wire constants load; the BPF sources resolve inside
site-packages and the switch compiles from them (root: hence the lab group).

No network: the fresh venv sees the project venv's site-packages (numpy,
pyroute2) through a .pth line, which adds the folder but runs none of its
.pth files, so the checkout's editable install stays out of sight. About 15 s.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path(sys.base_prefix) / "bin" / "python3"  # what scripts/setup.sh makes the venv from


def run(argv, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}: {r.stderr[-1500:]}"
    return r.stdout


def source_tree(dst: Path) -> Path:
    """What a source distribution holds: the top-level files and the packages
    pyproject names (so the build leaves nothing in the checkout)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    dst.mkdir()
    for f in ROOT.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    for p in packages:
        shutil.copytree(ROOT / p, dst / p, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, its site-packages, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_tree(tmp / "src")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
        cwd=tmp)
    (wheel,) = (tmp / "dist").glob("inc_xdp-*.whl")
    v = tmp / "v"
    run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", v], cwd=tmp)
    site = Path(run([v / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp).strip())
    (site / "_project_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([v / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return v, site, work


@pytest.mark.parametrize("cmd", ["incd", "inc-agent", "inc-lab"])
def test_commands_start_outside_the_checkout(installed, cmd):
    v, _, work = installed
    assert "usage" in run([v / "bin" / cmd, "--help"], cwd=work).lower()


def test_sources_and_wire_constants_come_from_site_packages(installed, root):
    v, site, work = installed
    probe = (
        "import json, bpf, incd, hostagent, netns_lab\n"
        "from bpf import control, kv_wire, wire\n"
        "from incd.dataplane import Dataplane\n"
        "Dataplane(pool_slots=64).close()\n"  # compiles the switch from the shipped headers
        "print(json.dumps({'files': [m.__file__ for m in (bpf, incd, hostagent, netns_lab, kv_wire)],\n"
        "  'switch': str(bpf.source('inc_switch.bpf.c')), 'headers': sorted(p.name for p in bpf.source_dir().glob('*.h')),\n"
        "  'modes': [wire.MODE_MODULO, wire.MODE_HASH, wire.MODE_KV], 'kv_window': wire.KV_WINDOW,\n"
        "  'control_version': control.CONTROL_VERSION}))\n"
    )
    got = json.loads(run([v / "bin" / "python", "-c", probe], cwd=work).strip().splitlines()[-1])
    for f in got["files"] + [got["switch"]]:
        assert Path(f).is_relative_to(site), f
    assert got["headers"] == sorted(p.name for p in (ROOT / "bpf").glob("*.h"))
    assert len(set(got["modes"])) == 3 and got["kv_window"] > 0 and got["control_version"] >= 1
