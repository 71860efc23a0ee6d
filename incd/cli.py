"""incd: the INC switch daemon's command line (start / stop / status)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bpf import wire

from . import config, daemon
from .config import Config, ConfigError
from .memory import POLICIES

LAB_STATE_DIR = Path("/run/inc-lab")


class CliError(Exception):
    pass


def admin_request(instance: str, req: dict, timeout: float = 10.0) -> dict:
    path = str(daemon.admin_path(instance))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError("incd closed the admin connection without answering")
    return json.loads(buf)


def build_config(args) -> Config:
    """The settings: defaults, then the --config file, then the options; every
    value checked (config.check), a bad one named with where it came from."""
    cfg = Config(instance=args.instance)
    origin: dict[str, str] = {}  # key -> what to call it in an error
    if args.config:
        for k, v in config.read_file(args.config).items():
            setattr(cfg, k, v)
            origin[k] = f"config {args.config}: '{k}'"
    if args.ports:
        cfg.ports = [p for p in args.ports.split(",") if p]
        cfg.netns = args.netns
        origin.update(ports="--ports", netns="--netns")
    elif args.netns:
        cfg.netns = args.netns
        origin["netns"] = "--netns"
    if not cfg.ports and not cfg.switches:
        lab = LAB_STATE_DIR / f"{args.lab}.json"
        try:
            st = json.loads(lab.read_text())
        except FileNotFoundError:
            raise CliError(f"no switch ports: give --ports or --config, or start a lab first "
                           f"(inc-lab up --workers 4); {lab} does not exist")
        except json.JSONDecodeError as e:
            raise CliError(f"lab state {lab} is corrupt: {e}")
        if st.get("racks", 1) > 1:  # leaves and a spine: one incd for all of them (incd/fabric.py)
            cfg.switches = [{k: sw[k] for k in ("name", "netns", "role", "ports", "uplink")}
                            for sw in st["switches"]]
            origin["switches"] = f"lab state {lab}: switches"
        else:
            cfg.netns = st["switch_netns"]
            cfg.ports = [h["switch_port"] for h in st["hosts"]]
            origin.update(ports=f"lab state {lab}: ports", netns=f"lab state {lab}: netns")
    if args.listen:
        host, _, port = args.listen.rpartition(":") if ":" in args.listen else (args.listen, "", "")
        cfg.listen = host or "0.0.0.0"
        origin["listen"] = "--listen"
        if port:
            if not port.isdigit():
                raise CliError(f"--listen takes address[:port], got {args.listen!r}")
            cfg.listen_port = int(port)
            origin["listen_port"] = "--listen port"
    for key in ("pool_slots", "hash_slots", "policy", "partitions", "rtt_us", "link_gbps",
                "register_timeout", "rejoin_grace", "key_file", "max_job_slots", "max_host_slots"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
            origin[key] = "--" + key.replace("_", "-")
    return config.check(cfg, origin)


def cmd_start(args) -> int:
    cfg = build_config(args)
    st = daemon.read_state(cfg.instance)
    if st and daemon.pid_alive(st.get("pid", -1)):
        raise CliError(f"incd ({cfg.instance}) is already running, pid {st['pid']}; `incd stop` first")
    if st:
        if daemon.recoverable(cfg.instance):
            print(f"incd ({cfg.instance}) pid {st.get('pid')} died with jobs running: taking them over")
        else:
            daemon.cleanup_leftovers(cfg.instance)  # a previous incd died without cleaning up
    if args.foreground:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s incd: %(message)s")
        try:
            return daemon.run(cfg, force=args.force)
        except Exception as e:  # startup failures: one line, not a traceback
            logging.getLogger("incd").error("%s", e)
            return 1
    daemon.RUN_DIR.mkdir(parents=True, exist_ok=True)
    logf = daemon.log_path(cfg.instance)
    argv = [sys.executable, "-m", "incd.cli", "--instance", cfg.instance, "start", "--foreground"]
    if args.force:
        argv.append("--force")
    cfg_file = daemon.config_copy_path(cfg.instance)
    cfg_file.write_text(json.dumps(cfg.file_values()))
    argv += ["--config", str(cfg_file)]
    with open(logf, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, cwd="/")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logf.read_text(errors="replace").strip().splitlines()[-5:]
            raise CliError("incd failed to start:\n  " + "\n  ".join(tail))
        try:
            s = admin_request(cfg.instance, {"op": "status"}, timeout=2)
            if s.get("ok") and s.get("pid") == proc.pid:
                ports = ",".join(f"{p['switch']}:{p['name']}" if p.get("switch") else p["name"] for p in s["ports"])
                ns = f" in netns {s['netns']}" if s["netns"] else ""
                print(f"incd started (pid {proc.pid}): XDP on {ports}{ns}, control {s['control']}, "
                      f"pool {s['pool_slots']} slots; log {logf}")
                return 0
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.terminate()
    raise CliError(f"incd did not come up within {args.wait:.0f}s; see {logf}")


def cmd_stop(args) -> int:
    st = daemon.read_state(args.instance)
    if st is None:
        left = daemon.cleanup_leftovers(args.instance)
        print(f"incd ({args.instance}) is not running" + (f"; cleaned: {', '.join(left)}" if left else ""))
        return 0
    pid = st.get("pid", -1)
    if daemon.pid_alive(pid):
        try:
            admin_request(args.instance, {"op": "stop"}, timeout=5)
        except (OSError, ValueError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while daemon.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if daemon.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
    left = daemon.cleanup_leftovers(args.instance)
    print(f"incd stopped (pid {pid})" + (f"; also cleaned: {', '.join(left)}" if left else ""))
    return 0


def _fmt_counters(c: dict | None) -> str:
    if not c:
        return "-"
    drops = {k: v for k, v in c["drops"].items() if v}
    out = (f"in={c['pkts_in']} completed={c['slots_completed']} mcast={c['results_mcast']} "
           f"retx_answered={c['retrans_answered']} overflow={c['overflows']} drops={drops or 0}")
    if c.get("to_ps") or c.get("fallbacks") or c.get("releases"):
        out += (f" to_ps={c['to_ps']} collisions={c['collisions']} fallbacks={c['fallbacks']} "
                f"releases={c['releases']} reclaims={c['reclaims']}")
    if c.get("kv_absorbed") or c.get("kv_leftover") or c.get("kv_acks") or c.get("kv_to_reducer"):
        out += (f" kv_absorbed={c['kv_absorbed']} kv_claimed={c['kv_claimed']} kv_leftover={c['kv_leftover']} "
                f"kv_acks={c['kv_acks']} kv_to_reducer={c['kv_to_reducer']} kv_resent={c['kv_resent']}")
    if c.get("up_sent") or c.get("down_received"):
        out += f" up_sent={c['up_sent']} up_resent={c['up_resent']} down_received={c['down_received']}"
    return out


def _fmt_switches(c: dict | None) -> list[str]:
    """A job on a two-tier fabric: a line per switch of its path."""
    return [f"    {name}: {_fmt_counters(sc)}" for name, sc in ((c or {}).get("switches") or {}).items()]


def _status_or_exit(args) -> dict | None:
    try:
        s = admin_request(args.instance, {"op": "status"})
    except (OSError, ValueError):
        print(json.dumps({"running": False, "instance": args.instance}) if args.json
              else f"incd ({args.instance}) is not running")
        return None
    return s


def cmd_status(args) -> int:
    s = _status_or_exit(args)
    if s is None:
        return 3
    s.pop("ok", None)
    s["running"] = True
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    ns = f" netns {s['netns']}" if s["netns"] else ""
    print(f"incd ({s['instance']}) running, pid {s['pid']}{ns}, up {s['uptime_s']}s, control {s['control']}")
    if s.get("switches"):
        for sw in s["switches"]:
            print(f"{sw['role']} {sw['name']} (netns {sw['netns']}): ports {', '.join(sw['ports'])}")
    else:
        print("ports: " + ", ".join(f"{p['name']}(ifindex {p['ifindex']}, mtu {p['mtu']}, xdp {p['xdp']})"
                                    for p in s["ports"]))
    print(f"pool: {s['pool_slots']} slots, {s['free_slots']} free")
    if "kv_cols" in s:
        print(f"key-value columns: {s['kv_cols']}, {s['kv_free_cols']} free, {s['kv_flows']} flows in use")
    if s.get("hash_region"):
        h = s["hash_region"]
        print(f"hash region: {h['offset']}+{h['slots']}, held {h['held'] or 'none'}")
    if not s["jobs"]:
        print("jobs: none")
    for j in s["jobs"]:
        members = " ".join(f"{m['rank']}@{m['addr']}:{m['port']}/{m['switch_port']}"
                           + (f" ({m['datapath']})" if m.get("datapath") else "") for m in j["members"])
        print(f"job {j['job']} [{j['state']}] {j['mode']} gen={j['gen']} world={j['world']} "
              f"window={j['window']} region={j['offset']}+{j['slots']} elems/pkt={j['elems_per_packet']}"
              + (" across racks" if j.get("tiers", 1) > 1 else ""))
        if j["mode"] == "kv":
            print(f"    key-value: columns {j['offset']}+{j['cols']} in {j['parts']} parts, epoch {j.get('epoch')}, "
                  f"{j['drains']} drains, {j['tuples_per_packet']} tuples/pkt")
        if j.get("ps"):
            members += f" ps@{j['ps']['addr']}:{j['ps']['port']}/{j['ps']['switch_port']}"
        print(f"    members: {members}")
        print(f"    {_fmt_counters(j['counters'])}")
        for line in _fmt_switches(j["counters"]):
            print(line)
    for j in s["finished"][-5:]:
        print(f"ended job {j['job']} gen={j['gen']} ({j['end_reason']}): {_fmt_counters(j['counters'])}")
        for line in _fmt_switches(j["counters"]):
            print(line)
    un = {k: v for k, v in s["unattributed"].items() if v}
    if un:
        print(f"drops not attributable to a job: {un}")
    return 0


def cmd_jobs(args) -> int:
    s = _status_or_exit(args)
    if s is None:
        return 3
    if args.json:
        print(json.dumps({"policy": s["policy"], "jobs": s["jobs"]}, indent=2))
        return 0
    print(f"policy {s['policy']}, pool {s['pool_slots']} slots ({s['free_slots']} free)")
    if not s["jobs"]:
        print("no jobs")
        return 0
    print(f"{'job':>5} {'mode':>6} {'state':>7} {'world':>5} {'window':>6} {'region':>11} "
          f"{'deadline in':>11} {'need':>5}")
    for j in s["jobs"]:
        region = f"{j['offset']}+{j['slots']}" if j["state"] == "active" and j["slots"] else "-"
        if j["mode"] == "kv" and region != "-":
            region = f"kv:{region}"  # columns of the key-value array, not pool slots
        dl = f"{j['deadline_in_s']:.1f}s" if j["deadline_in_s"] is not None else "-"
        print(f"{j['job']:>5} {j['mode']:>6} {j['state']:>7} {j['world']:>5} {j['window'] or '-':>6} "
              f"{region:>11} {dl:>11} {j.get('need_slots') or '-':>5}")
    return 0


def cmd_mem(args) -> int:
    s = _status_or_exit(args)
    if s is None:
        return 3
    if args.json:
        print(json.dumps({"pool_slots": s["pool_slots"], "memory": s["memory"]}, indent=2))
        return 0
    pool, width = s["pool_slots"], 64
    bar = ["."] * width
    marks = {}
    for r in s["memory"]:
        if r["owner"] is None:
            continue
        mark = "H" if r["owner"] == "hash" else chr(ord("A") + len(marks) % 26)
        marks[r["owner"]] = mark
        for i in range(r["offset"] * width // pool, max(r["offset"] * width // pool + 1,
                                                        (r["offset"] + r["slots"]) * width // pool)):
            bar[min(i, width - 1)] = mark
    print(f"pool {pool} slots  [{''.join(bar)}]")
    for r in s["memory"]:
        who = r["owner"] or "free"
        tag = f" ({marks[r['owner']]})" if r["owner"] in marks else ""
        print(f"  {r['offset']:>7}..{r['offset'] + r['slots'] - 1:<7} {r['slots']:>7} slots  {who}{tag}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="incd", description="INC switch daemon: loads the XDP aggregation "
                                "dataplane on the switch ports and serves the job control API.")
    p.add_argument("--instance", default="incd", help="instance name (state in /run/incd/NAME.*, "
                   "maps pinned in /sys/fs/bpf/NAME); default %(default)s")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="attach XDP to the switch ports and serve the control API")
    s.add_argument("--foreground", action="store_true", help="run in this process, log to stderr")
    s.add_argument("--lab", default="inc", help="take ports from this inc-lab lab when no --ports/--config "
                   "(default %(default)s)")
    s.add_argument("--ports", help="comma-separated switch ports, e.g. eth1,eth2 (real NICs)")
    s.add_argument("--netns", help="network namespace the ports live in (default: current)")
    s.add_argument("--config", help="JSON file of settings, any of: " + ", ".join(config.FILE_KEYS) +
                   " (options given here override it)")
    s.add_argument("--listen", help=f"control API address[:port] (default 0.0.0.0:{wire.CTRL_PORT})")
    s.add_argument("--pool-slots", type=int, help="aggregator slots in the switch "
                   f"(default {wire.C['INC_POOL_SLOTS_DEFAULT']})")
    s.add_argument("--hash-slots", type=int, help="slots of the region all hash-mode jobs share "
                   "(default: half the pool)")
    s.add_argument("--policy", choices=POLICIES, help="how modulo jobs share switch memory: fifo, static "
                   "(equal partitions), edf (deadline jobs first; default)")
    s.add_argument("--partitions", type=int, help="partitions of the static policy (default 4)")
    s.add_argument("--rtt-us", type=float, help="RTT used to size memory from throughput (default 200)")
    s.add_argument("--link-gbps", type=float, help="host link rate used in sizing (default 10)")
    s.add_argument("--register-timeout", type=float, help="seconds a rank waits for the others (default 30)")
    s.add_argument("--rejoin-grace", type=float, help="after a crash and restart: seconds the running jobs "
                   "taken over wait for their members to reconnect before they are failed (default 10)")
    s.add_argument("--max-job-slots", type=int, help="the most switch memory (slots) one job gets, whatever "
                   "it asks or claims (default: the whole pool)")
    s.add_argument("--max-host-slots", type=int, help="the most switch memory (slots) the jobs with a member "
                   "on one host hold together; more jobs from that host wait (default: the whole pool)")
    s.add_argument("--key-file", help="a file holding a shared key (at least 16 bytes): only agents started "
                   "with the same key (--key-file or INC_KEY_FILE) may use the control API")
    s.add_argument("--force", action="store_true", help="take ports that already run an XDP program "
                   "(another incd's or another tool's), replacing it; without it such ports are refused")
    s.add_argument("--wait", type=float, default=60.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_start)
    t = sub.add_parser("stop", help="detach XDP, unpin maps, stop the daemon")
    t.add_argument("--timeout", type=float, default=10.0, help="seconds before it is killed")
    t.set_defaults(fn=cmd_stop)
    u = sub.add_parser("status", help="ports, jobs and per-job counters")
    u.add_argument("--json", action="store_true")
    u.set_defaults(fn=cmd_status)
    j = sub.add_parser("jobs", help="jobs with their memory, deadline and state")
    j.add_argument("--json", action="store_true")
    j.set_defaults(fn=cmd_jobs)
    m = sub.add_parser("mem", help="a map of the switch memory: who holds which slots")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_mem)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        print("incd: must run as root (XDP, BPF maps, network namespaces); try sudo", file=sys.stderr)
        return 1
    try:
        return args.fn(args)
    except (CliError, ConfigError) as e:
        print(f"incd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
