"""What a member asks of incd, checked before anything changes: the
registration's fields, the control-API version it speaks, and the switch port
it is reached through.

Every check raises RegistrationError with a one-line reason the member gets as
{"ok": false, "error": ...}; values a client sent are echoed cut short (a
request may be 64 KiB of anything)."""
from __future__ import annotations

import hashlib

from dataclasses import dataclass

from bpf import control, wire

from .netinfo import NetInfoError, Path

MODES = ("modulo", "hash", "ps", "kv")
KV_WINDOW = wire.KV_WINDOW  # a mapper's window may not exceed the switch's seen ring


class RegistrationError(RuntimeError):
    pass


def short(v: object, n: int = 40) -> str:
    """repr of something a client sent, cut to n characters for an error message."""
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


DATAPATHS = ("xdp", "socket")
FRAMES = ("std", "jumbo")


@dataclass
class Request:
    job: int
    role: str
    rank: int  # -1 for the PS (kv: the reducer); kv mapper: its flow id
    world: int
    window: int | None
    port: int
    mode: str
    shape: str | None
    deadline_s: float | None = None
    model_bytes: int = 0
    epochs: float = 1.0
    compute_s: float = 0.0
    cols: int | None = None   # kv: columns wanted
    parts: int | None = None  # kv: subspaces
    datapath: str | None = None  # how the member's packets travel on its host (status only)
    job_token: str | None = None  # the job's secret: every member must bring the first one's
    frame: str = "std"  # jumbo: 64 KB frames over 20 slots each (bpf/mode_jumbo.h); all members agree


def check_version(req: dict) -> int:
    """The control-API version a "register" or "rejoin" speaks; one incd does
    not speak is refused naming both, so a mismatched agent learns why at once
    instead of seeing its packets dropped. No "version" field: version 1, the
    last one before the field existed."""
    v = req.get("version", 1)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RegistrationError(f"'version' must be an integer (the control API version), got {short(v)}")
    if v != control.CONTROL_VERSION:
        raise RegistrationError(
            f"control API version {v} is not supported by this incd (speaks {control.CONTROL_VERSION}): "
            "upgrade inc-agent or incd so both match")
    return v


def validate_register(req: dict) -> Request:
    """The request's fields, checked; a RegistrationError names the first bad one."""
    def num(key, lo, hi):
        v = req.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise RegistrationError(f"'{key}' must be an integer in [{lo}, {hi}], got {short(v)}")
        return v

    role = req.get("role", "worker")
    if role not in ("worker", "ps"):
        raise RegistrationError(f"'role' must be 'worker' or 'ps', got {short(role)}")
    job = num("job", control.JOB_MIN, control.JOB_MAX)
    world = num("world", 1, wire.MAX_WORKERS)
    port = num("port", 1, 65535)
    mode = req.get("mode", "modulo")
    if mode not in MODES:
        raise RegistrationError(f"unsupported mode {short(mode)} (one of {', '.join(MODES)})")
    if role == "ps":
        if mode == "modulo":
            raise RegistrationError("modulo jobs have no parameter server")
        return Request(job, role, -1, world, None, port, mode, None)
    rank = num("rank", 0, world - 1)
    window = num("window", 1, control.MAX_WINDOW)
    cols = parts = None
    if mode == "kv":
        if window > KV_WINDOW:
            raise RegistrationError(f"a key-value mapper's 'window' may be at most {KV_WINDOW} "
                                    f"(the switch remembers {KV_WINDOW} psns per flow), got {window}")
        if req.get("cols") is not None:
            cols = num("cols", 1, 1 << 16)
        if req.get("parts") is not None:
            parts = num("parts", 1, world)
        if cols is not None and cols < (parts or world):
            raise RegistrationError(f"'cols' {cols} is fewer than the job's {parts or world} parts "
                                    f"(one column at least per part{'' if parts else ', one part per mapper'})")
    shape = req.get("shape")
    if shape is not None and (not isinstance(shape, str) or len(shape) > 64):
        raise RegistrationError("'shape' must be a short string")
    datapath = req.get("datapath")
    if datapath not in (None, *DATAPATHS):
        raise RegistrationError(f"'datapath' must be one of {', '.join(DATAPATHS)}, got {short(datapath)}")
    frame = req.get("frame", "std")
    if frame not in FRAMES:
        raise RegistrationError(f"'frame' must be one of {', '.join(FRAMES)}, got {short(frame)}")
    if frame == "jumbo" and mode != "modulo":
        raise RegistrationError(f"jumbo frames are for modulo jobs, not {mode} mode")
    job_token = req.get("job_token")
    if job_token is not None and (not isinstance(job_token, str) or not 8 <= len(job_token) <= 256):
        raise RegistrationError("'job_token' must be a string of 8 to 256 characters")

    def real(key, lo, hi, default):
        v = req.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise RegistrationError(f"'{key}' must be a number in [{lo}, {hi}], got {short(v)}")
        return v

    return Request(job, role, rank, world, window, port, mode, shape,
                   deadline_s=real("deadline_s", 0.001, 10**7, None),
                   model_bytes=int(real("model_bytes", 0, 10**13, 0)),
                   epochs=float(real("epochs", 0.001, 10**7, 1.0)),
                   compute_s=float(real("compute_s", 0, 10**5, 0.0)), cols=cols, parts=parts,
                   datapath=datapath, job_token=job_token, frame=frame)


def resolve_path(netinfo, peer: str, port_ifindexes: set[int]) -> Path:
    """The switch port (and addresses) a registering peer is reached through."""
    try:
        return netinfo.path_to(peer, port_ifindexes)
    except NetInfoError as e:
        raise RegistrationError(str(e)) from e


def token_digest(token: str | None) -> bytes:
    """What a job keeps of its token (b"": the job has none)."""
    return hashlib.sha256(token.encode()).digest() if token else b""
