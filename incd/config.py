"""incd's configuration: the settings (Config), and the check of every value,
whether it comes from the --config JSON file or from a command-line option.

A bad value is a one-line ConfigError naming where it came from and the key
("config incd.json: 'pool_slots' must be an integer in 1..1048576, got '16'"),
never a traceback from deep inside the daemon."""
from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from bpf import control, wire

from .memory import POLICIES

MAX_POOL_SLOTS = 1 << 20
MAX_REJOIN_GRACE = 3600.0


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    instance: str = "incd"
    netns: str | None = None
    ports: list[str] = field(default_factory=list)
    listen: str = "0.0.0.0"
    listen_port: int = wire.CTRL_PORT
    pool_slots: int = wire.POOL_SLOTS_DEFAULT
    hash_slots: int | None = None  # region shared by hash-mode jobs; default half the pool
    policy: str = "edf"            # memory policy for modulo jobs: fifo, static, edf
    partitions: int = 4            # static policy
    rtt_us: float = 200.0          # sizing: Memory = Throughput x RTT
    link_gbps: float = 10.0
    allow: list[str] = field(default_factory=list)  # CIDRs; empty = the ports' networks
    register_timeout: float = 30.0
    rejoin_grace: float = 10.0  # after a restart: how long recovered jobs wait for their members
    key_file: str | None = None  # shared key: only agents that hold it may use the control API
    max_job_slots: int | None = None  # the most switch memory one job gets (None: the whole pool)
    max_host_slots: int | None = None  # the most all jobs with a member on one host hold together
    # A two-tier fabric (incd/fabric.py): [{"name", "netns", "role": "leaf"|"spine",
    # "ports": [...], "uplink": {"port", "peer_port"} (leaves)}]; None: one switch (netns, ports)
    switches: list | None = None

    def file_values(self) -> dict:
        """Everything but the instance name: what a --config file may hold."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "instance"}


FILE_KEYS = tuple(f.name for f in fields(Config) if f.name != "instance")


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:40] + "..."


def _integer(lo: int, hi: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"must be an integer in {lo}..{hi}"
    return check


def _number(hi: float):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= hi:
            return f"must be a number in (0, {hi:g}]"
    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _name(v):
    if not isinstance(v, str) or not 0 < len(v) <= 255 or "/" in v or v != v.strip():
        return "must be a name (a non-empty string without '/' or spaces)"


def _ports(v):
    if not isinstance(v, list) or not all(isinstance(p, str) and 0 < len(p) <= 15 and p == p.strip() for p in v):
        return "must be a list of interface names (strings of 1..15 characters)"


def _listen(v):
    if not isinstance(v, str) or not v or len(v) > 255 or any(c.isspace() for c in v):
        return "must be an address to listen on, e.g. \"0.0.0.0\""


def _policy(v):
    if v not in POLICIES:
        return f"must be one of {', '.join(POLICIES)}"


def _allow(v):
    if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
        return "must be a list of networks (CIDR strings such as \"10.0.0.0/24\")"
    for a in v:
        try:
            ipaddress.ip_network(a, strict=False)
        except ValueError:
            return f"must be a list of networks (CIDR strings such as \"10.0.0.0/24\"); {_short(a)} is not one"


def _key_file(v):
    if not isinstance(v, str) or not v:
        return "must be the path of a file holding the shared key"
    try:
        control.read_key(v)
    except control.LimitError as e:
        return f"is not usable ({e})"


def _switches(v):
    if v is None:
        return None
    why = ("must be a list of switches, each {\"name\", \"netns\", \"role\": \"leaf\" or \"spine\", "
           "\"ports\": [...], \"uplink\": {\"port\", \"peer_port\"} for a leaf}, with one spine")
    if not isinstance(v, list) or not v:
        return why
    for sw in v:
        if not isinstance(sw, dict) or _name(sw.get("name")) or _name(sw.get("netns")) or _ports(sw.get("ports")) \
                or sw.get("role") not in ("leaf", "spine"):
            return why
        up = sw.get("uplink")
        if sw["role"] == "leaf" and not (isinstance(up, dict) and not _ports([up.get("port"), up.get("peer_port")])):
            return why
    if sum(sw["role"] == "spine" for sw in v) != 1 or len({sw["name"] for sw in v}) != len(v):
        return why


CHECKS = {
    "netns": _optional(_name),
    "ports": _ports,
    "listen": _listen,
    "listen_port": _integer(1, 65535),
    "pool_slots": _integer(1, MAX_POOL_SLOTS),
    "hash_slots": _optional(_integer(1, MAX_POOL_SLOTS)),
    "policy": _policy,
    "partitions": _integer(1, MAX_POOL_SLOTS),
    "rtt_us": _number(1e7),
    "link_gbps": _number(1e5),
    "allow": _allow,
    "register_timeout": _number(control.MAX_REGISTER_TIMEOUT),
    "rejoin_grace": _number(MAX_REJOIN_GRACE),
    "key_file": _optional(_key_file),
    "max_job_slots": _optional(_integer(2, MAX_POOL_SLOTS)),
    "max_host_slots": _optional(_integer(2, MAX_POOL_SLOTS)),
    "switches": _switches,
}
assert set(CHECKS) == set(FILE_KEYS), "every setting has its check"


def check_value(key: str, value: object, name: str) -> None:
    """Raises ConfigError "<name> must be ..., got <value>" if value is not good for key."""
    why = CHECKS[key](value)
    if why:
        raise ConfigError(f"{name} {why}, got {_short(value)}")


def read_file(path: str) -> dict:
    """The settings a --config JSON file gives, each checked; unknown keys refused."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: must be a JSON object of settings, got a {type(data).__name__}")
    unknown = set(data) - set(FILE_KEYS)
    if unknown:
        raise ConfigError(f"config {path}: unknown keys {sorted(unknown)} (known: {sorted(FILE_KEYS)})")
    for key, value in data.items():
        try:
            check_value(key, value, f"'{key}'")
        except ConfigError as e:
            raise ConfigError(f"config {path}: {e}") from None
    return data


def check(cfg: Config, origin: dict[str, str]) -> Config:
    """Checks every setting of cfg, naming where a bad one came from:
    origin[key] is e.g. "config incd.json: 'pool_slots'" or "--pool-slots"."""
    for key in FILE_KEYS:
        check_value(key, getattr(cfg, key), origin.get(key, f"'{key}'"))
    if cfg.hash_slots is not None and cfg.hash_slots > cfg.pool_slots:
        raise ConfigError(f"{origin.get('hash_slots', 'hash_slots')} must be at most the pool's "
                          f"{cfg.pool_slots} slots, got {cfg.hash_slots}")
    for key in ("max_job_slots", "max_host_slots"):
        v = getattr(cfg, key)
        if v is not None and v > cfg.pool_slots:
            raise ConfigError(f"{origin.get(key, key)} must be at most the pool's "
                              f"{cfg.pool_slots} slots, got {v}")
    return cfg
