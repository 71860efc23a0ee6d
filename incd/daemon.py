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
from .dataplane import Dataplane, Port, unpin_tree
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
    owners.update({(sw.get("netns"), name): st for st in live_instances()
                   for sw in st.get("switches", []) for name in sw.get("ports", [])})
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
    if cfg.switches:
        return _run_fabric(cfg, force, old)
    if not cfg.ports:
        raise RuntimeError("no switch ports given")
    enter_netns(cfg.netns)
    ports = [netinfo.port_info(n) for n in cfg.ports]
    check_ports_free(cfg, ports, old, force)
    allow = [ipaddress.ip_network(a, strict=False) for a in cfg.allow] or netinfo.connected_networks(ports)

    fp = jobstate.fingerprint(cfg.pool_slots, cfg.hash_slots, [p.name for p in ports])
    saved = _saved_jobs(cfg, old, fp)
    dp = Dataplane(cfg.pool_slots, pin_dir(cfg.instance))
    servers = []
    try:
        registry, saved = _registry(cfg, dp, saved, {("", p.ifindex): p.name for p in ports})
        recovered = _recover(cfg, dp, registry, saved)
        # Bound before XDP is attached: a taken control port fails with the ports untouched.
        servers.append(_control(cfg, registry, {p.ifindex for p in ports}, allow))
        # The new program replaces the old one on each port; the maps, and so the
        # recovered jobs' slots, stay as they are.
        dp.attach([Port(p.name, p.ifindex) for p in ports])
        extra = {"netns": cfg.netns, "ports": [{**asdict(p), "xdp": "native"} for p in ports]}
        state = {"netns": cfg.netns, "ports": [p.name for p in ports], "xdp_prog_ids": dp.prog_ids}
        log.info("incd %s: XDP on %s, pool %d slots, control on %s:%d",
                 cfg.instance, ",".join(p.name for p in ports), cfg.pool_slots, cfg.listen, cfg.listen_port)
        return _serve(cfg, registry, fp, recovered, servers, [(None, s) for s in servers], allow, extra, state)
    finally:
        _close(cfg, servers, dp.close)


def _run_fabric(cfg: Config, force: bool, old: dict | None) -> int:
    """Every switch of a two-tier fabric (incd/fabric.py): XDP on each leaf's and
    the spine's ports, one control door per leaf, in its namespace."""
    from . import netns as nsx
    from .fabric import Fabric

    for sw in cfg.switches:
        names = [*sw["ports"], *([sw["uplink"]["port"]] if sw.get("uplink") else [])]
        nsx.call_in(sw["netns"], lambda names=names, sw=sw: check_ports_free(
            Config(instance=cfg.instance, netns=sw["netns"]), [netinfo.port_info(n) for n in names],
            _old_ports(old, sw["netns"]), force))
    fp = jobstate.fingerprint(cfg.pool_slots, cfg.hash_slots,
                              [f"{s['name']}/{p}" for s in cfg.switches for p in s["ports"]])
    saved = _saved_jobs(cfg, old, fp)
    fab = Fabric(cfg.switches, cfg.pool_slots, pin_dir(cfg.instance))
    servers, doors = [], []
    try:
        registry, saved = _registry(cfg, fab, saved, fab.port_names())
        recovered = _recover(cfg, fab, registry, saved)
        allow = [ipaddress.ip_network(a, strict=False) for a in cfg.allow] or \
            netinfo.connected_networks([p for n in fab.leaves for p in n.ports])
        for leaf in fab.leaves:
            srv = nsx.call_in(leaf.netns, lambda leaf=leaf: _control(
                cfg, registry, {p.ifindex for p in leaf.ports}, allow, switch=leaf.name))
            servers.append(srv)
            doors.append((leaf.netns, srv))
        fab.attach()
        extra = {"netns": None, "switches": fab.describe(),
                 "ports": [{**asdict(p), "switch": n.name, "xdp": "native"}
                           for n in fab.nodes.values() for p in [*n.ports, *([n.up] if n.up else [])]]}
        state = {"netns": None, "ports": [], "switches": fab.describe()}
        log.info("incd %s: two-tier fabric, leaves %s, spine %s; pool %d slots on each, control on %s:%d in each leaf",
                 cfg.instance, ",".join(n.name for n in fab.leaves), fab.spine.name, cfg.pool_slots,
                 cfg.listen, cfg.listen_port)
        return _serve(cfg, registry, fp, recovered, servers, doors, allow, extra, state)
    finally:
        _close(cfg, servers, fab.close)


def _old_ports(old: dict | None, netns: str) -> dict | None:
    """A dead fabric incd's ports in one namespace, in the shape check_ports_free reads."""
    if not old:
        return None
    for sw in old.get("switches", []):
        if sw.get("netns") == netns:
            return {"pid": old.get("pid", -1), "ports": sw.get("ports", [])}
    return None


def _saved_jobs(cfg: Config, old: dict | None, fp: str) -> dict | None:
    saved, why = jobstate.load(jobs_path(cfg.instance), fp) if old else (None, "")
    if saved is None:
        if old:
            log.info("not recovering the jobs of the previous incd: %s", why)
        unpin_tree(pin_dir(cfg.instance))  # fresh maps, not a dead incd's
    return saved


def _registry(cfg: Config, dp, saved: dict | None, port_names: dict) -> tuple[Registry, dict | None]:
    if saved is not None and not dp.adopted:
        log.info("not recovering the jobs of the previous incd: its pinned maps are gone")
        saved = None
    mm = MemoryManager(cfg.pool_slots, cfg.policy, Link(cfg.rtt_us * 1e-6, cfg.link_gbps * 1e9),
                       cfg.partitions, cfg.max_job_slots, cfg.max_host_slots)
    return Registry(dp, cfg.pool_slots, port_names, cfg.hash_slots, mm), saved


def _recover(cfg: Config, dp, registry: Registry, saved: dict | None) -> list[int]:
    recovered = jobstate.restore(registry, saved, cfg.rejoin_grace) if saved else []
    for j in dp.programmed_jobs():
        if j not in recovered:
            dp.forget_job(j)
    return recovered


def _control(cfg: Config, registry: Registry, ifindexes: set[int], allow: list, switch: str = "") -> ControlServer:
    return ControlServer((cfg.listen, cfg.listen_port), registry, netinfo, ifindexes, allow, cfg.register_timeout,
                         key=control.read_key(cfg.key_file) if cfg.key_file else None, switch=switch)


def _serve(cfg: Config, registry: Registry, fp: str, recovered: list[int], servers: list, doors: list,
           allow: list, extra: dict, state: dict) -> int:
    """Serves until told to stop: the control doors (each in its namespace), the
    admin socket, and the registry's timers. Returns the exit code."""
    from . import netns as nsx

    stop = threading.Event()
    registry.on_change = lambda: jobstate.save(jobs_path(cfg.instance), jobstate.dump(registry, fp))
    with registry.cond:
        registry.on_change()
    if recovered:
        log.info("recovered jobs %s; their members have %.0fs to rejoin", recovered, cfg.rejoin_grace)
    started = time.time()

    def status() -> dict:
        return {
            "instance": cfg.instance, "pid": os.getpid(),
            "uptime_s": round(time.time() - started, 1),
            "control": f"{cfg.listen}:{cfg.listen_port}",
            "allow": [str(a) for a in allow],
            "pin_dir": str(pin_dir(cfg.instance)),
            **extra,
            **registry.snapshot(),
        }

    admin = AdminServer(str(admin_path(cfg.instance)), status, stop.set)
    servers.append(admin)
    for netns, srv in doors:
        nsx.thread_in(netns, srv.serve_forever, f"control-{netns or 'switch'}")
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    state_path(cfg.instance).write_text(json.dumps({
        "pid": os.getpid(), "instance": cfg.instance, **state, "pin_dir": str(pin_dir(cfg.instance)),
        "admin": str(admin_path(cfg.instance)), "control": f"{cfg.listen}:{cfg.listen_port}",
    }))
    while not stop.wait(1.0):
        registry.expire_resizes()
        registry.expire_rejoins()
        registry.watchdog()  # hung members, stale hash slots
    log.info("stopping")
    registry.shutdown()
    return 0


def _close(cfg: Config, servers: list, close_dataplane) -> None:
    for s in servers:
        s.shutdown()
        s.server_close()
    close_dataplane()
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
    from .dataplane import detach_port

    from . import netns as nsx

    done = []
    st = read_state(instance)
    if st:
        # one switch (netns, ports) or a fabric's ("switches", each in its namespace)
        for sw in st.get("switches") or [st]:
            def detach(sw=sw):
                ids = sw.get("xdp_prog_ids", {})
                for name in sw.get("ports", []):
                    detach_port(name, ids.get(name))  # not a program someone attached since
                    done.append(f"detached XDP from {name}")
            try:
                nsx.call_in(sw.get("netns"), detach)
            except RuntimeError as e:
                done.append(f"ports not reachable ({e})")
    if pin_dir(instance).exists():
        unpin_tree(pin_dir(instance))
        done.append(f"unpinned {pin_dir(instance)}")
    for p in (state_path(instance), admin_path(instance), config_copy_path(instance), jobs_path(instance)):
        if p.exists():
            p.unlink()
    return done
