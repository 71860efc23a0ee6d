"""The incd process: enter the switch's namespace, load and attach the dataplane,
pin its maps, serve the control and admin APIs, and undo all of it on stop."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

from bpf import control

from . import jobstate, netinfo
from .config import Config
from .dataplane import Dataplane, Port, unpin_dir
from .memory import Link, MemoryManager
from .registry import Registry
from .admin import AdminServer
from .server import ControlServer

RUN_DIR = Path("/run/incd")
PIN_ROOT = Path("/sys/fs/bpf")
log = logging.getLogger("incd")


def state_path(instance: str) -> Path:
    return RUN_DIR / f"{instance}.json"


def admin_path(instance: str) -> Path:
    return RUN_DIR / f"{instance}.sock"


def log_path(instance: str) -> Path:
    return RUN_DIR / f"{instance}.log"


def config_copy_path(instance: str) -> Path:
    """The config a background start hands to the daemon process."""
    return RUN_DIR / f"{instance}.config.json"


def jobs_path(instance: str) -> Path:
    """The running jobs, saved on every change, read back by a restarted incd."""
    return RUN_DIR / f"{instance}.jobs.json"


def pin_dir(instance: str) -> Path:
    return PIN_ROOT / instance


def read_state(instance: str) -> dict | None:
    try:
        return json.loads(state_path(instance).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def enter_netns(name: str | None) -> None:
    if name:
        from pyroute2 import netns

        if name not in netns.listnetns():
            raise RuntimeError(f"network namespace {name!r} does not exist")
        netns.setns(name)


def live_instances() -> list[dict]:
    """State of every incd instance on this machine whose process is alive."""
    out = []
    for f in sorted(RUN_DIR.glob("*.json")) if RUN_DIR.exists() else []:
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(st, dict) and f == state_path(str(st.get("instance")))):
            continue  # a jobs file or a config copy
        if pid_alive(st.get("pid", -1)) and st.get("pid") != os.getpid():
            out.append(st)
    return out


def check_ports_free(cfg: Config, ports: list, old: dict | None, force: bool) -> None:
    """Refuse, before touching anything, ports that carry an XDP program that is
    not a dead incd of this instance's own (which a restart takes over): a
    running incd's, or another tool's. force: replace it anyway."""
    mine = set(old.get("ports", [])) if old and not pid_alive(old.get("pid", -1)) else set()
    owners = {(st.get("netns"), name): st for st in live_instances() for name in st.get("ports", [])}
    for p in ports:
        prog = netinfo.xdp_prog_id(p.name)
        if not prog or p.name in mine:
            continue
        st = owners.get((cfg.netns, p.name))
        who = (f"incd instance {st.get('instance')!r} (pid {st.get('pid')})" if st
               else "a program that is not this incd's (another tool?)")
        if force:
            log.warning("port %s: replacing XDP program %d of %s (--force)", p.name, prog, who)
            continue
        raise RuntimeError(f"port {p.name} already runs XDP program {prog} of {who}; refusing to touch it "
                           f"(stop that first, or start with --force to replace it)")


def run(cfg: Config, force: bool = False) -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    old = read_state(cfg.instance)
    if old and pid_alive(old.get("pid", -1)) and old.get("pid") != os.getpid():
        raise RuntimeError(f"incd instance {cfg.instance!r} is already running (pid {old['pid']})")
    if not cfg.ports:
        raise RuntimeError("no switch ports given")
    enter_netns(cfg.netns)
    ports = [netinfo.port_info(n) for n in cfg.ports]
    check_ports_free(cfg, ports, old, force)
    allow = [ipaddress.ip_network(a, strict=False) for a in cfg.allow] or netinfo.connected_networks(ports)

    fp = jobstate.fingerprint(cfg.pool_slots, cfg.hash_slots, [p.name for p in ports])
    saved, why = jobstate.load(jobs_path(cfg.instance), fp) if old else (None, "")
    if saved is None:
        if old:
            log.info("not recovering the jobs of the previous incd: %s", why)
        unpin_dir(pin_dir(cfg.instance))  # fresh maps, not a dead incd's
    stop = threading.Event()
    dp = Dataplane(cfg.pool_slots, pin_dir(cfg.instance))
    servers = []
    try:
        if saved is not None and not dp.adopted:
            log.info("not recovering the jobs of the previous incd: its pinned maps are gone")
            saved = None
        mm = MemoryManager(cfg.pool_slots, cfg.policy, Link(cfg.rtt_us * 1e-6, cfg.link_gbps * 1e9),
                           cfg.partitions, cfg.max_job_slots, cfg.max_host_slots)
        registry = Registry(dp, cfg.pool_slots, {p.ifindex: p.name for p in ports}, cfg.hash_slots, mm)
        recovered = jobstate.restore(registry, saved, cfg.rejoin_grace) if saved else []
        for j in dp.programmed_jobs():
            if j not in recovered:
                dp.forget_job(j)
        # Bound before XDP is attached: a taken control port fails with the ports untouched.
        ctrl = ControlServer((cfg.listen, cfg.listen_port), registry, netinfo,
                             {p.ifindex for p in ports}, allow, cfg.register_timeout,
                             key=control.read_key(cfg.key_file) if cfg.key_file else None)
        servers.append(ctrl)
        # The new program replaces the old one on each port; the maps, and so the
        # recovered jobs' slots, stay as they are.
        dp.attach([Port(p.name, p.ifindex) for p in ports])
        registry.on_change = lambda: jobstate.save(jobs_path(cfg.instance), jobstate.dump(registry, fp))
        with registry.cond:
            registry.on_change()
        if recovered:
            log.info("recovered jobs %s; their members have %.0fs to rejoin", recovered, cfg.rejoin_grace)
        started = time.time()

        def status() -> dict:
            return {
                "instance": cfg.instance, "pid": os.getpid(), "netns": cfg.netns,
                "uptime_s": round(time.time() - started, 1),
                "control": f"{cfg.listen}:{cfg.listen_port}",
                "allow": [str(a) for a in allow],
                "pin_dir": str(pin_dir(cfg.instance)),
                "ports": [{**asdict(p), "xdp": "native"} for p in ports],
                **registry.snapshot(),
            }

        admin = AdminServer(str(admin_path(cfg.instance)), status, stop.set)
        servers.append(admin)
        for s in servers:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        state_path(cfg.instance).write_text(json.dumps({
            "pid": os.getpid(), "instance": cfg.instance, "netns": cfg.netns,
            "ports": [p.name for p in ports], "pin_dir": str(pin_dir(cfg.instance)),
            "admin": str(admin_path(cfg.instance)), "control": f"{cfg.listen}:{cfg.listen_port}",
            "xdp_prog_ids": dp.prog_ids,
        }))
        log.info("incd %s: XDP on %s, pool %d slots, control on %s:%d",
                 cfg.instance, ",".join(p.name for p in ports), cfg.pool_slots, cfg.listen, cfg.listen_port)
        while not stop.wait(1.0):
            registry.expire_resizes()
            registry.expire_rejoins()
            registry.watchdog()  # hung members, stale hash slots
        log.info("stopping")
        registry.shutdown()
        return 0
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        dp.close()
        for p in (state_path(cfg.instance), admin_path(cfg.instance), config_copy_path(cfg.instance),
                  jobs_path(cfg.instance)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        log.info("stopped: XDP detached, maps unpinned")


def recoverable(instance: str) -> bool:
    """A dead incd left running jobs that a new one can take over."""
    return jobs_path(instance).exists() and pin_dir(instance).exists()


def cleanup_leftovers(instance: str) -> list[str]:
    """Undo what a dead incd left: XDP on its ports, pinned maps, state files."""
    from .dataplane import detach_port, unpin_dir

    done = []
    st = read_state(instance)
    if st:
        try:
            enter_netns(st.get("netns"))
            ids = st.get("xdp_prog_ids", {})
            for name in st.get("ports", []):
                detach_port(name, ids.get(name))  # not a program someone attached since
                done.append(f"detached XDP from {name}")
        except RuntimeError as e:
            done.append(f"ports not reachable ({e})")
    if pin_dir(instance).exists():
        unpin_dir(pin_dir(instance))
        done.append(f"unpinned {pin_dir(instance)}")
    for p in (state_path(instance), admin_path(instance), config_copy_path(instance), jobs_path(instance)):
        if p.exists():
            p.unlink()
    return done
