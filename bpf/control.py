"""The control API's contract between incd and its members: the protocol
version a registration carries, and the limits both sides check (the agent
before it asks, incd when it is asked)."""
from __future__ import annotations

from . import wire

# Bumped when a request or reply changes shape; incd refuses other versions.
CONTROL_VERSION = 1

JOB_MIN, JOB_MAX = 1, wire.MAX_JOBS - 1
MAX_WINDOW = 4096
MAX_FAIL_TIMEOUT = 3600.0  # incd ignores heartbeats that claim more
MAX_REGISTER_TIMEOUT = 600.0  # how long a registration may wait for the rest of its job


class LimitError(ValueError):
    pass


def check_job(job: int, name: str = "--job") -> int:
    if not JOB_MIN <= job <= JOB_MAX:
        raise LimitError(f"{name} must be in {JOB_MIN}..{JOB_MAX}, got {job}")
    return job


def check_fail_timeout(seconds: float, name: str = "--fail-timeout") -> float:
    if not 0 < seconds <= MAX_FAIL_TIMEOUT:
        raise LimitError(f"{name} must be in (0, {MAX_FAIL_TIMEOUT:.0f}] seconds")
    return seconds


# --- authentication (a key shared by incd and the agents) ------------------
KEY_MIN_BYTES = 16


def read_key(path: str) -> bytes:
    """The shared key in a file (its bytes, without surrounding whitespace)."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise LimitError(f"cannot read the key file {path}: {e.strerror}") from None
    if len(key) < KEY_MIN_BYTES:
        raise LimitError(f"the key in {path} is {len(key)} bytes; it must be at least {KEY_MIN_BYTES}")
    return key


def auth_mac(key: bytes, nonce: str) -> str:
    """The answer to incd's challenge: HMAC-SHA256 over its nonce, hex."""
    import hashlib
    import hmac

    return hmac.new(key, b"inc-control-auth-v1:" + nonce.encode(), hashlib.sha256).hexdigest()
