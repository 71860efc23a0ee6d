"""inc-lab: bring the namespace lab up and down, inspect it, run commands in it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from pyroute2.netlink.exceptions import NetlinkError

from . import nsutil, plan
from .errors import LabConfigError, LabError
from .topology import Lab, require_root, state_path, status, teardown

PROG = "inc-lab"

DESCRIPTION = """\
Network-namespace lab for the INC switch: a switch namespace {name}-sw and
host namespaces {name}-h1..hN (and {name}-ps), each host joined to the switch
by a veth pair (switch side pI / pps, host side eth0). Host i is 10.77.i.2/24
with gateway 10.77.i.1 on the switch (the PS uses i = 100). The lab state is
written to /run/inc-lab/{name}.json, which incd reads to find the switch ports.
Needs root."""

UP_EPILOG = """\
impairments (applied at the host end of every link, this kernel has no netem):
  --loss    random drop of IPv4 UDP, independently in each direction
            (a tc BPF program); TCP, ICMP and ARP are never dropped, so control
            traffic and ping keep working
  --reorder host->switch only: that fraction of IPv4 UDP packets goes through a
            slow HTB class (20 Mbit) and is overtaken by later packets; it also
            caps the throughput of a sender that keeps the slow class busy
  --rate    shapes all traffic in both directions (HTB on eth0, and an IFB
            device for switch->host, because XDP_REDIRECT skips switch qdiscs)
  --delay   needs netem; refused on kernels without it

examples:
  inc-lab up --workers 4 --ps
  inc-lab --name t1 up --workers 2 --loss 1 --rate 1gbit
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


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
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
                    help=f"MTU of every link, {plan.MTU_MIN}-{plan.MTU_MAX} "
                         f"(default: %(default)s; XDP sees only ~3.5 KiB)")
    up.add_argument("--rate", metavar="R",
                    help="rate limit per link and direction, tc syntax: 500mbit, 1gbit")
    up.add_argument("--loss", type=_pct, default=0.0, metavar="PCT",
                    help="random IPv4 UDP loss per link and direction, percent")
    up.add_argument("--reorder", type=_pct, default=0.0, metavar="PCT",
                    help="percent of host->switch IPv4 UDP packets delayed so others overtake them")
    up.add_argument("--delay", type=_positive_float, metavar="MS",
                    help="added one-way delay per link and direction (needs netem)")
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
                                    "for the switch) with this environment and terminal; "
                                    "exits with CMD's exit code.")
    ex.add_argument("host", metavar="HOST", help="h1..hN, ps, or sw (the switch)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                    help="command and its arguments, after --")
    return p


def cmd_up(args) -> int:
    lab = Lab(args.name, workers=args.workers, ps=args.ps, mtu=args.mtu, rate=args.rate,
              loss_pct=args.loss, reorder_pct=args.reorder, delay_ms=args.delay)
    lab.up()
    if args.json:
        print(json.dumps(lab.state, indent=2))
        return 0
    st = lab.state
    print(f"lab {lab.name!r} is up: switch netns {st['switch_netns']}, MTU {st['mtu']}")
    for h in st["hosts"]:
        print(f"  {h['name']:<4} {h['netns']:<12} {h['ifname']} {h['addr']}/{h['prefix']:<3} "
              f"gw {h['gateway']:<11} switch port {h['switch_port']:<4} {h['role']}")
    print(f"impairments: {lab.impair.describe()}")
    print(f"state: {state_path(lab.name)}")
    print(f"run commands with: {PROG} --name {lab.name} exec h1 -- CMD")
    return 0


def cmd_down(args) -> int:
    removed, had_state = teardown(args.name)
    if not removed and not had_state:
        print(f"lab {args.name!r} is not up; nothing to remove")
    else:
        print(f"lab {args.name!r} removed ({len(removed)} namespaces"
              f"{', state file' if had_state else ''})")
    return 0


def cmd_status(args) -> int:
    s = status(args.name)
    if args.json:
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
                  f"port {h['switch_port']} {h['role']}{flag}")
        if st["switch_netns"] in s["missing_netns"]:
            print(f"  switch namespace {st['switch_netns']} missing")
        print("impairments: " + Lab.load(args.name).impair.describe())
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
