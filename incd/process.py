"""Start and stop an incd instance from Python (scripts and tests), through its CLI
so that what they exercise is what a user runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


class IncdProcess:
    def __init__(self, instance: str = "incd", lab: str = "inc", extra: list[str] | None = None):
        self.instance = instance
        self.lab = lab
        self.extra = extra or []

    def _cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "incd.cli", "--instance", self.instance, *args],
                              capture_output=True, text=True, check=check)

    def start(self) -> "IncdProcess":
        r = self._cli("start", "--lab", self.lab, *self.extra, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"incd start failed: {r.stderr.strip() or r.stdout.strip()}")
        return self

    def status(self) -> dict:
        r = self._cli("status", "--json", check=False)
        return json.loads(r.stdout)

    def stop(self) -> str:
        out = self._cli("stop", check=False).stdout
        self.purge()
        return out

    def kill(self) -> int:
        """SIGKILL, as a crash would do it: incd cleans up nothing. Returns the pid."""
        from . import daemon

        pid = daemon.read_state(self.instance)["pid"]
        os.kill(pid, signal.SIGKILL)
        while daemon.pid_alive(pid):
            time.sleep(0.02)
        return pid

    def purge(self) -> None:
        """Remove the instance's log and config copy: scripts and tests leave nothing behind."""
        from . import daemon

        for p in (daemon.log_path(self.instance), daemon.config_copy_path(self.instance)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IncdProcess":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
