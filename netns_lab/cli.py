"""inc-lab: bring the namespace lab up and down, inspect it, run commands in it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from pyroute2.netlink.exceptions import NetlinkError

from . import impair, nsutil, plan
from .errors import LabConfigError, LabError
from .topology import Lab, require_root, state_path, status, teardown

PROG = "inc-lab"

DESCRIPTION = """\
Network-namespace lab for the INC switch: a switch namespace {name}-sw and
host namespaces {name}-h1..hN (and {name}-ps), each host joined to the switch
by a veth pair (switch side pI / pps, host side eth0). Host i is 10.77.i.2/24
with gateway 10.77.i.1 on the switch (the PS uses i = 100). The lab state is
written to /run/inc-lab/{name}.json, which incd reads to find the switch ports.
With --racks R >= 2 the lab has two tiers: leaf switches {name}-leaf1..leafR
(the hosts split rack by rack), a spine {name}-spine, and between each leaf and
the spine a middle namespace {name}-ls{k} with a bridge where the spine link's
faults act (see `inc-lab up --help`). Needs root."""

UP_EPILOG = """\
impairments (applied at the host end of every link; this kernel has no netem,
so they are tc BPF programs, HTB and IFB devices, see netns_lab/impair.py):
  --loss    random drop of IPv4 UDP, independently in each direction;
            TCP, ICMP and ARP are never dropped, so control traffic and ping
            keep working
  --dup     that fraction of IPv4 UDP packets is sent twice, each direction
  --corrupt that fraction of IPv4 UDP packets gets one random bit of its UDP
            payload flipped, each direction; the UDP checksum is not fixed up
            (nothing checks it on this path), so the INC header's csum is what
            catches it
  --reorder host->switch only: that fraction of IPv4 UDP packets goes through a
            slow HTB class (20 Mbit) and is overtaken by later packets; it also
            caps the throughput of a sender that keeps the slow class busy
            (with --delay/--jitter: they are held 2 ms longer instead)
  --delay   holds every IPv4 packet (UDP, TCP, ICMP) that long, each direction:
            h1 -> h2 takes 2 x MS more, a round trip 4 x MS
  --jitter  each packet's delay is uniform in [max(0, delay - MS), delay + MS]
            (--jitter alone: [0, MS]); packets overtake each other
  --rate    shapes all traffic in both directions (HTB on eth0, and an IFB
            device for switch->host, because XDP_REDIRECT skips switch qdiscs);
            not together with --delay/--jitter

racks (two tiers):
  --racks R       R leaf switches {name}-leaf1..leafR (1 <= R <= 8, R <= workers)
                  and a spine {name}-spine; host i hangs off its rack's leaf on
                  port pI as before. Racks are filled in order: N // R hosts
                  each, the first N % R racks one more; the PS is in rack 1.
                  Leaf k reaches the spine through a bridge in {name}-ls{k}
                  (leaf 'up' 10.76.k.2 -- a | br0 | b -- spine 'lK' 10.76.k.1),
                  the state's switch_netns is the spine's. R = 1 (default) is
                  the one-switch lab {name}-sw.
  --spine-rate    shapes every leaf-spine link, both directions (HTB on the
                  bridge port b, an IFB for its ingress)
  --spine-loss    random IPv4 UDP loss on every leaf-spine link, each direction
                  (no --spine-delay: the delay line's primers would pass the
                  bridge as copies of the packets)
  The host faults above still act at the host end of the host links.

examples:
  inc-lab up --workers 4 --ps
  inc-lab --name t1 up --workers 2 --loss 1 --rate 1gbit
  inc-lab --name t2 up --workers 4 --ps --dup 2 --corrupt 1 --delay 1 --jitter 0.5
  inc-lab --name t3 up --racks 2 --workers 4 --spine-rate 1gbit --spine-loss 1
  inc-lab --name t3 exec leaf1 -- ip -4 route
  inc-lab exec h1 -- ip -4 addr
  inc-lab exec sw -- tc -s qdisc
  inc-lab down"""


def _pct(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100 (got {text})")
    return v


def _ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= impair.MAX_DELAY_MS:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {impair.MAX_DELAY_MS:g} ms (got {text})")
    return v


def _lab_name(text: str) -> str:
    try:
        return plan.validate_name(text)
    except BrokenPipeError:
        # stdout closed early (`inc-lab up --json | head`): the work is done,
        # just stop writing without a second error from the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except LabConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    # --name is accepted before or after the command; the sub-parsers' copy
    # uses SUPPRESS so it does not overwrite a value given before the command.
    name_opt = argparse.ArgumentParser(add_help=False)
    name_opt.add_argument("--name", type=_lab_name, default=argparse.SUPPRESS,
                          help="lab name, prefix of every namespace (default: inc)")

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", type=_lab_name, default="inc", metavar="NAME",
                   help="lab name, prefix of every namespace (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", parents=[name_opt], help="create the lab",
                        description="Create the lab namespaces, links, addresses and impairments.",
                        epilog=UP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--workers", "-n", type=int, required=True, metavar="N",
                    help=f"number of worker hosts h1..hN (1-{plan.MAX_WORKERS})")
    up.add_argument("--ps", action="store_true", help="add a parameter-server host 'ps'")
    up.add_argument("--mtu", type=int, default=plan.MTU_DEFAULT, metavar="M",
                    help=f"MTU of every link, {plan.MTU_MIN}-{plan.MTU_MAX} (default: %(default)s; "
                         f"inc-agent --frame jumbo needs {plan.MTU_JUMBO})")
    up.add_argument("--rate", metavar="R",
                    help="rate limit per link and direction, tc syntax: 500mbit, 1gbit")
    up.add_argument("--loss", type=_pct, default=0.0, metavar="PCT",
                    help="random IPv4 UDP loss per link and direction, percent")
    up.add_argument("--reorder", type=_pct, default=0.0, metavar="PCT",
                    help="percent of host->switch IPv4 UDP packets delayed so others overtake them")
    up.add_argument("--dup", type=_pct, default=0.0, metavar="PCT",
                    help="percent of IPv4 UDP packets duplicated, per link and direction")
    up.add_argument("--corrupt", type=_pct, default=0.0, metavar="PCT",
                    help="percent of IPv4 UDP packets with one payload bit flipped, "
                         "per link and direction")
    up.add_argument("--delay", type=_ms, metavar="MS",
                    help="added one-way delay of IPv4 packets per link and direction")
    up.add_argument("--jitter", type=_ms, metavar="MS",
                    help="delay varies uniformly by +-MS per packet (reorders)")
    up.add_argument("--racks", type=int, default=1, metavar="R",
                    help=f"racks: R leaf switches and a spine, 1-{plan.MAX_RACKS}, at most the "
                         "number of workers (default: %(default)s, one switch)")
    up.add_argument("--spine-rate", metavar="R",
                    help="rate limit of each leaf-spine link and direction, tc syntax "
                         "(--racks >= 2)")
    up.add_argument("--spine-loss", type=_pct, default=0.0, metavar="PCT",
                    help="random IPv4 UDP loss per leaf-spine link and direction, percent "
                         "(--racks >= 2)")
    up.add_argument("--json", action="store_true", help="print the lab state as JSON")

    down = sub.add_parser("down", parents=[name_opt], help="remove the lab",
                          description="Remove every {name}-* namespace and the state file. "
                                      "Safe to repeat; works without a state file.")
    del down

    st = sub.add_parser("status", parents=[name_opt], help="show the lab",
                        description="Show the lab state and check that its namespaces exist. "
                                    "Exit code 0 if the lab is up, 1 if not (or broken).")
    st.add_argument("--json", action="store_true", help="print status as JSON")

    ex = sub.add_parser("exec", parents=[name_opt], help="run a command in a host",
                        usage=f"{PROG} [--name NAME] exec HOST -- CMD [ARG ...]",
                        description="Run CMD inside HOST's namespace (HOST: h1..hN, ps, or sw "
                                    "for the switch; with racks also leaf1..leafR, spine, and "
                                    "ls1..lsR for the spine links' bridges) with this "
                                    "environment and terminal; exits with CMD's exit code.")
    ex.add_argument("host", metavar="HOST",
                    help="h1..hN, ps, or sw (the switch; with racks the spine), leafK, spine, lsK")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                    help="command and its arguments, after --")
    return p


def cmd_up(args) -> int:
    lab = Lab(args.name, workers=args.workers, ps=args.ps, mtu=args.mtu, rate=args.rate,
              loss_pct=args.loss, reorder_pct=args.reorder, delay_ms=args.delay,
              dup_pct=args.dup, corrupt_pct=args.corrupt, jitter_ms=args.jitter,
              racks=args.racks, spine_rate=args.spine_rate, spine_loss_pct=args.spine_loss)
    lab.up()
    if args.json:
        print(json.dumps(lab.state, indent=2))
        return 0
    st = lab.state
    print(f"lab {lab.name!r} is up: switch netns {st['switch_netns']}, MTU {st['mtu']}")
    for h in st["hosts"]:
        print(f"  {h['name']:<4} {h['netns']:<12} {h['ifname']} {h['addr']}/{h['prefix']:<3} "
              f"gw {h['gateway']:<11} switch port {_port(h, st):<4} {h['role']}")
    if st.get("racks", 1) > 1:
        print(tree(st))
    print(f"impairments: {lab.impair.describe()}")
    print(f"state: {state_path(lab.name)}")
    print(f"run commands with: {PROG} --name {lab.name} exec h1 -- CMD")
    return 0


def _port(h: dict, st: dict) -> str:
    """A host's switch port, "leafK:pI" in a lab with racks."""
    return h["switch_port"] if st.get("racks", 1) == 1 else f"{h['switch']}:{h['switch_port']}"


def spine_faults(st: dict) -> str:
    """The spine links' faults in a few words: "1gbit, loss 1%" or "unimpaired"."""
    imp = st.get("spine_impair") or {}
    parts = [imp["rate"]] if imp.get("rate") else []
    if imp.get("loss_pct"):
        parts.append(f"loss {imp['loss_pct']:g}%")
    if imp.get("delay_ms"):
        parts.append(f"delay {imp['delay_ms']:g} ms")
    return ", ".join(parts) or "unimpaired"


def tree(st: dict) -> str:
    """A lab with racks as one line:
    "  spine: l1 -> leaf1 (h1 h2), l2 -> leaf2 (h3 h4); spine links 1gbit, loss 1%"."""
    sws = plan.switches_of(st)
    spine = next(s for s in sws if s["role"] == "spine")
    leaves = {s["uplink"]["peer_port"]: s for s in sws if s["uplink"]}
    parts = []
    for port in spine["ports"]:
        leaf = leaves[port]
        names = " ".join(h["name"] for h in st["hosts"] if h.get("switch") == leaf["name"])
        parts.append(f"{port} -> {leaf['name']} ({names})")
    return f"  {spine['name']}: {', '.join(parts)}; spine links {spine_faults(st)}"


def cmd_down(args) -> int:
    removed, had_state = teardown(args.name)
    if not removed and not had_state:
        print(f"lab {args.name!r} is not up; nothing to remove")
    else:
        print(f"lab {args.name!r} removed ({len(removed)} namespaces"
              f"{', state file' if had_state else ''})")
    return 0


def _counters(s: dict) -> tuple[dict | None, str | None]:
    """The impair programs' counters of a lab that is up: (counters, None) or (None, why not)."""
    if not s["up"]:
        return None, None
    if os.geteuid() != 0:
        return None, "counters need root"
    try:
        return impair.read_counters(s["state"]), None
    except (LabError, OSError, ImportError, ValueError) as e:
        return None, str(e)


def _counter_lines(counters: dict) -> list[str]:
    lines = []
    for host, per in counters.items():
        for d, c in per.items():
            if not any(c.values()):
                continue
            parts = [f"{c['udp']} udp"] + [f"{c[k]} {k}" for k in
                                           ("lost", "dup", "corrupt", "reorder") if c[k]]
            if c["delayed"]:
                parts.append(f"{c['delayed']} held, mean {c['delay_us_sum'] / c['delayed'] / 1e3:.3f} ms")
            if c["undelayed"]:
                parts.append(f"{c['undelayed']} not held (delay drawn ~0)")
            if c["primer_err"]:
                parts.append(f"{c['primer_err']} primer errors")
            lines.append(f"  {host:<4} {d:<7} " + ", ".join(parts))
    return lines


def cmd_status(args) -> int:
    s = status(args.name)
    counters, why = _counters(s)
    if args.json:
        s["impair_counters"] = counters
        if why:
            s["impair_counters_error"] = why
        print(json.dumps(s, indent=2))
        return 0 if s["up"] else 1
    st = s["state"]
    if s["error"]:
        print(f"lab {args.name!r}: {s['error']}")
    elif st is None:
        print(f"lab {args.name!r} is not up")
    else:
        print(f"lab {args.name!r} is {'up' if s['up'] else 'BROKEN'}: "
              f"switch netns {st['switch_netns']}, MTU {st['mtu']}")
        for h in st["hosts"]:
            flag = "" if h["netns"] not in s["missing_netns"] else "  (namespace missing)"
            print(f"  {h['name']:<4} {h['netns']:<12} {h['addr']}/{h['prefix']} "
                  f"port {_port(h, st)} {h['role']}{flag}")
        if st.get("racks", 1) > 1:
            print(tree(st))
            hosts_ns = {h["netns"] for h in st["hosts"]}
            fabric_missing = [ns for ns in s["missing_netns"] if ns not in hosts_ns]
            if fabric_missing:
                print(f"  switch namespaces missing: {' '.join(fabric_missing)}")
        elif st["switch_netns"] in s["missing_netns"]:
            print(f"  switch namespace {st['switch_netns']} missing")
        print("impairments: " + Lab.load(args.name).impair.describe())
        if counters:
            print("impairment counters (packets per host end of each link):")
            print("\n".join(_counter_lines(counters)) or "  none yet")
    if s["stray_netns"]:
        what = "not in the state file" if st is not None else "left over"
        print(f"namespaces {what}: {' '.join(s['stray_netns'])} "
              f"(remove with `{PROG} --name {args.name} down`)")
    return 0 if s["up"] else 1


def cmd_exec(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise LabConfigError("exec needs a command: inc-lab exec HOST -- CMD [ARG ...]")
    ns = Lab.load(args.name).netns(args.host)
    if not nsutil.exists(ns):
        raise LabError(f"namespace {ns} does not exist; the lab is broken, "
                       f"run `{PROG} --name {args.name} down`")
    if shutil.which(cmd[0]) is None:  # same filesystem inside: check here for a clear error
        print(f"{PROG}: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    sys.stdout.flush()
    try:
        os.execvp("ip", nsutil.ns_argv(ns, cmd))
    except OSError as e:
        raise LabError(f"cannot run ip netns exec: {e}") from None


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "exec": cmd_exec}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "status":
            require_root()
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # stdout closed early (`inc-lab up --json | head`): the work is done,
        # just stop writing without a second error from the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except LabConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (LabError, NetlinkError, OSError, subprocess.SubprocessError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
