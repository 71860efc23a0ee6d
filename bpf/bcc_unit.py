"""One C text for bcc out of a program and the project headers it includes.

bcc rewrites its map calls (`pool.lookup(&k)`, `mode_progs.call(ctx, i)`...)
into BPF helper calls only in the text it is given: a header that bcc's clang
includes from disk is compiled as written, so map calls in it would stay calls
through a function pointer that the verifier rejects. The switch's headers
(one per mode, the entry checks) use maps, so they are pasted in here, each
once (as their include guards would have it), with #line markers so compiler
messages still name the right file and line. System headers stay #includes.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import source

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def _paste(path: Path, done: set[Path], out: list[str]) -> None:
    out.append(f'#line 1 "{path.name}"')
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        m = _LOCAL_INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        inc = (path.parent / m.group(1)).resolve()
        if inc not in done:
            done.add(inc)
            _paste(inc, done, out)
        out.append(f'#line {n + 1} "{path.name}"')


def one_unit(name: str) -> str:
    """The program `name` (a .c file of this package) with every project
    header it includes, directly or not, pasted in."""
    out: list[str] = []
    _paste(source(name), set(), out)
    return "\n".join(out) + "\n"

