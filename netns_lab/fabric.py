"""The second tier of a lab with racks: each leaf's link to the spine.

    {name}-leaf{k}  up 10.76.{k}.2/24 ── veth ── a ┐
    {name}-ls{k}                          br0 (bridge, STP off)   spine faults on b
    {name}-spine    l{k} 10.76.{k}.1/24 ── veth ── b ┘

The link passes through a middle namespace with a Linux bridge because the
switches run XDP that redirects frames straight into a veth: that bypasses the
sender's qdisc and, with XDP on the receiver, its tc ingress too, so faults on
the spine link can only act in a namespace without XDP. impair.apply() on `b`
shapes and drops on its egress (leaf -> spine) and, through its ingress hook
and an IFB, spine -> leaf: both directions of the link.
"""

from __future__ import annotations

from . import impair, nsutil, plan


def _gro(ns: str, dev: str) -> None:
    # A veth that receives XDP_REDIRECTed frames drops them silently unless it
    # has GRO (or an XDP program) on.
    nsutil.check(ns, ["ethtool", "-K", dev, "gro", "on"], f"enable GRO on {dev}")


def build_uplink(leaf: dict, spine_ns: str, hosts: list[dict], mtu: int,
                 imp: impair.Impairments, progs: impair.Programs) -> None:
    """Join leaf `leaf` (a state "switches" entry) to the spine through its
    middle namespace; `hosts`: the hosts of its rack, routed to it by the spine."""
    up, leaf_ns = leaf["uplink"], leaf["netns"]
    mid = up["mid_netns"]
    with nsutil.iproute(mid) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname=plan.MID_BRIDGE, kind="bridge", mtu=mtu,
                 br_stp_state=0, br_forward_delay=0)
        br = ipr.link_lookup(ifname=plan.MID_BRIDGE)[0]
        # created from the middle with the peers placed straight into the
        # leaf and the spine, as the host links are
        for port, peer, peer_ns in ((plan.MID_LEAF_PORT, up["port"], leaf_ns),
                                    (plan.MID_SPINE_PORT, up["peer_port"], spine_ns)):
            ipr.link("add", ifname=port, kind="veth", mtu=mtu,
                     peer={"ifname": peer, "net_ns_fd": peer_ns, "mtu": mtu})
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
        ipr.link("set", index=br, state="up")

    with nsutil.iproute(leaf_ns) as ipr:
        idx = ipr.link_lookup(ifname=up["port"])[0]
        ipr.addr("add", index=idx, address=up["addr"], prefixlen=plan.PREFIX_LEN)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=up["peer_addr"])

    with nsutil.iproute(spine_ns) as ipr:
        idx = ipr.link_lookup(ifname=up["peer_port"])[0]
        ipr.addr("add", index=idx, address=up["peer_addr"], prefixlen=plan.PREFIX_LEN)
        ipr.link("set", index=idx, state="up")
        for h in hosts:
            ipr.route("add", dst=plan.host_net(h), gateway=up["addr"])

    _gro(leaf_ns, up["port"])
    _gro(mid, plan.MID_LEAF_PORT)
    _gro(mid, plan.MID_SPINE_PORT)
    _gro(spine_ns, up["peer_port"])
    impair.apply(mid, plan.MID_SPINE_PORT, mtu, imp, progs)


def wait_list(state: dict) -> dict[str, list[str]]:
    """{namespace: [links that must be up]} for the switches and middle namespaces."""
    where: dict[str, list[str]] = {}
    for sw in plan.switches_of(state):
        where.setdefault(sw["netns"], []).extend(sw["ports"])
        if sw["uplink"]:
            where[sw["netns"]].append(sw["uplink"]["port"])
            where[sw["uplink"]["mid_netns"]] = [plan.MID_LEAF_PORT, plan.MID_SPINE_PORT,
                                                plan.MID_BRIDGE]
    return where
