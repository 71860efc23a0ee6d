"""What the measuring programs of scripts/ share: sizes read and printed the
way people write them, progress on stderr, results saved as JSON and a
figure when matplotlib is there, and the common main of a root-only
benchmark (run_and_save)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .agents import AgentRunError

UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(s: str) -> int:
    """'16KiB' -> 16384; a bare number is bytes."""
    t = s.strip().upper()
    for u in sorted(UNITS, key=len, reverse=True):
        if u and t.endswith(u):
            return int(float(t[: -len(u)]) * UNITS[u])
    return int(t)


def human(n: int) -> str:
    """16384 -> '16 KiB'; only whole KiB or MiB are shortened."""
    for u, f in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f} {u}"
    return f"{n} B"


def log(msg: str) -> None:
    # stderr: stdout is the table or the JSON a caller may parse
    print(msg, file=sys.stderr, flush=True)


def save_json(path: str | Path, obj, indent: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent))
    return path


def pyplot():
    """matplotlib.pyplot drawing to files (no display), or None when
    matplotlib is not installed: the figures are optional, the JSON is not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def run_and_save(prog: str, run, args, table, all_ok, as_json: bool = False) -> int:
    """A measuring program's main: run(args) as root, errors in one line, the
    result saved to args.out and printed as a table. Exit 4 if not all_ok(rows)."""
    if os.geteuid() != 0:
        print(f"{prog}: must run as root (namespaces, XDP)", file=sys.stderr)
        return 1
    try:
        result = run(args)
    except (AgentRunError, RuntimeError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out = save_json(args.out, result, indent=2)
    print(json.dumps(result, indent=2) if as_json else table(result))
    if not as_json:
        print(f"saved {out}")
    return 0 if all_ok(result["rows"]) else 4
