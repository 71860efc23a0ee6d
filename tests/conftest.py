"""Test groups by folder: unit/ (no root, seconds), dataplane/ (root: the real
XDP program under BPF_PROG_TEST_RUN, no traffic), lab/ (root: namespaces, incd
and agents). Each test gets its folder's marker, so `pytest -m unit` runs the
quick ones; a test may carry a lighter marker of its own (a pure-logic test in
a lab file is `unit`). Helpers that several test files use are modules under
tests/helpers/ (pytest puts tests/ on sys.path: pyproject's `pythonpath`)."""
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GROUPS = ("unit", "dataplane", "lab")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(g) for g in GROUPS):
            continue
        group = Path(str(item.fspath)).relative_to(HERE).parts[0]
        if group in GROUPS:
            item.add_marker(getattr(pytest.mark, group))


def require_root():
    # CI runs as root; a missing privilege is a failure, never a skip.
    if os.geteuid() != 0:
        pytest.fail("this test needs root (XDP, BPF maps, network namespaces)", pytrace=False)


@pytest.fixture(scope="session")
def root():
    require_root()


@pytest.fixture(scope="module")
def dp(root):
    """The real switch program and maps (64 slots), loaded once per module; a
    test file that needs another build defines its own `dp`."""
    from incd.dataplane import Dataplane

    d = Dataplane(pool_slots=64)
    yield d
    d.close()
