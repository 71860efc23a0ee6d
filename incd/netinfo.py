"""What incd needs to know about its ports and the hosts behind them (pyroute2,
in the namespace the daemon runs in)."""
from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

from pyroute2 import IPRoute


class NetInfoError(RuntimeError):
    pass


@dataclass
class PortInfo:
    name: str
    ifindex: int
    mac: str
    mtu: int
    addrs: list[str]  # "a.b.c.d/len"


@dataclass
class Path:
    """How a result reaches one host: out of which port, to which MAC, from which address."""
    ifindex: int
    mac: bytes
    port_mac: bytes
    switch_addr: str
    mtu: int
    switch: str = ""  # which switch of a fabric (incd/fabric.py); "" for the only one


def port_info(name: str) -> PortInfo:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            raise NetInfoError(f"no interface named {name!r} in this network namespace")
        link = ipr.get_links(idx[0])[0]
        addrs = [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=idx[0], family=socket.AF_INET)
        ]
        return PortInfo(name, idx[0], link.get_attr("IFLA_ADDRESS"), link.get_attr("IFLA_MTU"), addrs)


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def path_to(host: str, port_ifindexes: set[int], timeout: float = 2.0) -> Path:
    """Route and neighbour lookup towards a host; it must be reached via a switch port."""
    with IPRoute() as ipr:
        routes = ipr.route("get", dst=host)
        if not routes:
            raise NetInfoError(f"no route to {host}")
        r = routes[0]
        oif = r.get_attr("RTA_OIF")
        if oif not in port_ifindexes:
            raise NetInfoError(f"{host} is not reached through a switch port (route goes out ifindex {oif})")
        nexthop = r.get_attr("RTA_GATEWAY") or host
        src = r.get_attr("RTA_PREFSRC")
        link = ipr.get_links(oif)[0]
        deadline = time.monotonic() + timeout
        while True:
            for n in ipr.get_neighbours(dst=nexthop, ifindex=oif):
                mac = n.get_attr("NDA_LLADDR")
                if mac and n["state"] not in (0x20, 0x01):  # not FAILED/INCOMPLETE
                    return Path(oif, _mac_bytes(mac), _mac_bytes(link.get_attr("IFLA_ADDRESS")),
                                src, link.get_attr("IFLA_MTU"))
            if time.monotonic() > deadline:
                raise NetInfoError(f"no ARP entry for {nexthop}")
            # The host just talked to us over TCP, so this is rare; a datagram to
            # the discard port makes the kernel resolve it.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (nexthop, 9))
            time.sleep(0.05)


def connected_networks(ports: list[PortInfo]) -> list[ipaddress.IPv4Network]:
    return [ipaddress.ip_interface(a).network for p in ports for a in p.addrs]


def xdp_prog_id(name: str) -> int:
    """The id of the XDP program on a port (native or generic), 0 if none."""
    with IPRoute() as ipr:
        links = ipr.link("get", ifname=name)
    xdp = links[0].get_attr("IFLA_XDP") if links else None
    return int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp else 0
