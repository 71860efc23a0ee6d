import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def require_root():
    # CI runs as root; a missing privilege is a failure, never a skip.
    if os.geteuid() != 0:
        pytest.fail("this test needs root (XDP, BPF maps, network namespaces)", pytrace=False)


@pytest.fixture(scope="session")
def root():
    require_root()
