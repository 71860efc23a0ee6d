"""Result files written whole or not at all: a full disk or a failing write
leaves no partial file, and the error names the path in one line."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class OutFileError(Exception):
    pass


def npy_path(path: str) -> str:
    """The file np.save(path) would write (it appends .npy when missing)."""
    return path if path.endswith(".npy") else path + ".npy"


def check_writable(path: str) -> None:
    """Before a job runs: the file's folder exists and can be written, and the
    path is not a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutFileError(f"{path} is a directory; give a file name")
    if not parent.is_dir():
        raise OutFileError(f"the folder of {path} ({parent}) does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutFileError(f"cannot write into {parent} (permission denied)")


def write_atomic(path: str, write) -> None:
    """write(f) into a temporary file beside path, then rename it over path."""
    parent = str(Path(path).parent) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno is None and _full(parent):  # numpy reports a short write without errno
            why = os.strerror(errno.ENOSPC)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutFileError(f"cannot write {path}: {why}") from None


def _full(folder: str) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024
