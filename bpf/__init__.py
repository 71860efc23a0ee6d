"""The switch's C sources and the Python that derives from them.

Both sides import this package: the daemon (incd) and the host agents. The C
files ship as package data; `source()` finds them in a checkout and in an
installed wheel alike. `wire` and `kv_wire` are the packet codecs, `control`
the control API's version and limits, `testrun` runs a loaded XDP program on
one packet (BPF_PROG_TEST_RUN).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def source_dir() -> Path:
    """The folder holding the .c and .h files (bcc needs a real path for -I)."""
    return Path(str(resources.files(__name__)))


def source(name: str) -> Path:
    path = source_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"BPF source {name} is not in {source_dir()}")
    return path
