"""A lab with racks (issue 18): leaf switches, a spine, and the leaf-spine
links through a bridge in a middle namespace where their faults act. Real
namespaces, veths and tc (root; no mocks); no incd: the kernel forwards.

Every lab is named with netns_lab.harness.uniq("rk") and removed, also when a
test fails; the module checks at the end that none of them is left over.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import icmp
from helpers.labs import cli
from netns_lab import nsutil
from netns_lab.harness import uniq
from netns_lab.state import state_path
from netns_lab.topology import Lab, status, teardown

NAMES: list[str] = []


def new_name() -> str:
    NAMES.append(uniq("rk"))
    return NAMES[-1]


@pytest.fixture(autouse=True, scope="module")
def _root_and_leak_check():
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (namespaces, veths, tc)", pytrace=False)
    yield
    leaked = [ns for name in NAMES for ns in nsutil.list_netns(f"{name}-")]
    for name in NAMES:
        teardown(name)
    assert not leaked, f"tests leaked namespaces: {leaked}"


class _Up:
    """Lab(...) that is up inside the block and removed after it, however it ends."""

    def __init__(self, **kw):
        self.lab = Lab(new_name(), **kw)

    def __enter__(self) -> Lab:
        try:
            return self.lab.up()
        except BaseException:
            teardown(self.lab.name)
            raise

    def __exit__(self, *exc):
        try:
            self.lab.down()
        finally:
            teardown(self.lab.name)


@pytest.fixture(scope="module")
def racks2():
    """Two racks of two workers, no faults: h1 h2 on leaf1, h3 h4 on leaf2."""
    with _Up(workers=4, racks=2) as lab:
        yield lab


# --- tiny programs run inside the hosts ----------------------------------------

ECHO_SERVER = r'''
import socket
s = socket.create_server(("0.0.0.0", 9300))
print("ready", flush=True)
c, _ = s.accept()
while (b := c.recv(65536)):
    c.sendall(b)
c.close()
'''

ECHO_CLIENT = r'''
import os, socket, sys, threading
dst, n = sys.argv[1], int(sys.argv[2])
data = os.urandom(n)
c = socket.create_connection((dst, 9300), timeout=20)
back = bytearray()
def rx():
    while (b := c.recv(65536)):
        back.extend(b)
t = threading.Thread(target=rx)
t.start()
c.sendall(data)
c.shutdown(socket.SHUT_WR)
t.join(30)
sys.exit(0 if bytes(back) == data else f"echoed {len(back)} of {n} bytes, equal: {bytes(back) == data}")
'''

UDP_RECV = r'''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9400))
print("ready", flush=True)
s.settimeout(10)
got = set()
try:
    while True:
        got.add(int.from_bytes(s.recv(2048)[:4], "big"))
        s.settimeout(1.0)
except socket.timeout:
    pass
print(len(got))
'''

UDP_SEND = r'''
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(i.to_bytes(4, "big") + bytes(200), (sys.argv[1], 9400))
    time.sleep(0.001)
'''


def ping(lab, src, dst) -> bool:
    return icmp.ping(lab, src, dst).returncode == 0


def ip_json(lab, where, *args):
    return json.loads(lab.run(where, ["ip", "-j", *args], capture_output=True, text=True,
                              check=True).stdout)


def tc_classes(lab, where, dev):
    return lab.run(where, ["tc", "class", "show", "dev", dev], capture_output=True, text=True,
                   check=True).stdout


def udp_received(lab, src, dst, n):
    rx = lab.popen(dst, [sys.executable, "-c", UDP_RECV], stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        lab.run(src, [sys.executable, "-c", UDP_SEND, lab.addr(dst), str(n)], check=True,
                timeout=60)
        out, _ = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return int(out)


# --- two racks, no faults -------------------------------------------------------

def test_namespaces(racks2):
    name = racks2.name
    assert set(nsutil.list_netns(f"{name}-")) == {
        f"{name}-{n}" for n in ("leaf1", "leaf2", "spine", "ls1", "ls2", "h1", "h2", "h3", "h4")}
    assert [racks2.netns(n) for n in ("leaf1", "spine", "sw", "ls2")] == \
        [f"{name}-leaf1", f"{name}-spine", f"{name}-spine", f"{name}-ls2"]


def test_ping_same_rack_and_across(racks2):
    for src, dst in (("h1", "h2"), ("h1", "h3"), ("h4", "h1"), ("h3", "h4"), ("h2", "h4")):
        assert ping(racks2, src, dst), f"{src} -> {dst}"


def test_links_addresses_routes(racks2):
    mtu = racks2.mtu
    for k, hosts in ((1, ("h1", "h2")), (2, ("h3", "h4"))):
        leaf = {ln["ifname"]: ln for ln in ip_json(racks2, f"leaf{k}", "addr", "show")}
        assert set(leaf) == {"lo", "up", *(f"p{h[1:]}" for h in hosts)}
        assert [(a["local"], a["prefixlen"]) for a in leaf["up"]["addr_info"]] == \
            [(f"10.76.{k}.2", 24)]
        assert leaf["up"]["mtu"] == mtu and leaf["up"]["operstate"] == "UP"
        routes = ip_json(racks2, f"leaf{k}", "route", "show", "default")
        assert [(r["gateway"], r["dev"]) for r in routes] == [(f"10.76.{k}.1", "up")]
        mid = {ln["ifname"]: ln for ln in ip_json(racks2, f"ls{k}", "link", "show")}
        assert set(mid) == {"lo", "br0", "a", "b"}
        assert mid["a"]["master"] == mid["b"]["master"] == "br0"
        assert all(mid[d]["mtu"] == mtu and mid[d]["operstate"] == "UP"
                   for d in ("a", "b", "br0"))
        stp = racks2.run(f"ls{k}", ["cat", "/sys/class/net/br0/bridge/stp_state"],
                         capture_output=True, text=True, check=True).stdout
        assert stp.strip() == "0"
        for where, dev in ((f"leaf{k}", "up"), (f"ls{k}", "a"), (f"ls{k}", "b"),
                           ("spine", f"l{k}")):
            gro = racks2.run(where, ["ethtool", "-k", dev], capture_output=True, text=True).stdout
            assert "generic-receive-offload: on" in gro, (where, dev)
    spine = {ln["ifname"]: ln for ln in ip_json(racks2, "spine", "addr", "show")}
    assert set(spine) == {"lo", "l1", "l2"}
    assert [a["local"] for a in spine["l2"]["addr_info"]] == ["10.76.2.1"]
    routes = {r["dst"]: (r.get("gateway"), r["dev"])
              for r in ip_json(racks2, "spine", "route", "show")}
    assert {d: routes[d] for d in routes if d.startswith("10.77.")} == {
        "10.77.1.0/24": ("10.76.1.2", "l1"), "10.77.2.0/24": ("10.76.1.2", "l1"),
        "10.77.3.0/24": ("10.76.2.2", "l2"), "10.77.4.0/24": ("10.76.2.2", "l2")}
    for sw in ("leaf1", "spine"):
        out = racks2.run(sw, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"],
                         capture_output=True, text=True, check=True).stdout
        assert out.split() == ["1", "0"], sw


def test_tcp_across_racks(racks2):
    srv = racks2.popen("h3", [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                       text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        r = racks2.run("h1", [sys.executable, "-c", ECHO_CLIENT, racks2.addr("h3"),
                              str(300 << 10)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        srv.wait(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def test_state_file(racks2):
    name = racks2.name
    st = json.loads(state_path(name).read_text())
    assert st == racks2.state
    assert st["racks"] == 2 and st["switch_netns"] == f"{name}-spine"
    assert st["spine_impair"] == {"loss_pct": 0.0, "reorder_pct": 0.0, "rate": None,
                                  "delay_ms": None}
    assert [(h["name"], h["rack"], h["switch"], h["switch_port"], h["addr"]) for h in st["hosts"]] \
        == [("h1", 1, "leaf1", "p1", "10.77.1.2"), ("h2", 1, "leaf1", "p2", "10.77.2.2"),
            ("h3", 2, "leaf2", "p3", "10.77.3.2"), ("h4", 2, "leaf2", "p4", "10.77.4.2")]
    assert st["switches"] == [
        {"name": "leaf1", "netns": f"{name}-leaf1", "role": "leaf", "rack": 1,
         "ports": ["p1", "p2"],
         "uplink": {"port": "up", "addr": "10.76.1.2", "peer_addr": "10.76.1.1",
                    "peer_port": "l1", "mid_netns": f"{name}-ls1"}},
        {"name": "leaf2", "netns": f"{name}-leaf2", "role": "leaf", "rack": 2,
         "ports": ["p3", "p4"],
         "uplink": {"port": "up", "addr": "10.76.2.2", "peer_addr": "10.76.2.1",
                    "peer_port": "l2", "mid_netns": f"{name}-ls2"}},
        {"name": "spine", "netns": f"{name}-spine", "role": "spine", "rack": 0,
         "ports": ["l1", "l2"], "uplink": None}]
    loaded = Lab.load(name)
    assert loaded.state == st and loaded.racks == 2
    assert loaded.netns("leaf2") == f"{name}-leaf2" and loaded.netns("ls1") == f"{name}-ls1"


def test_cli_status_and_exec(racks2):
    name = racks2.name
    r = cli("status", "--json", name=name)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["up"] and s["missing_netns"] == [] and s["stray_netns"] == []
    assert s["state"] == racks2.state and s["state"]["racks"] == 2
    r = cli("status", name=name)
    assert r.returncode == 0 and "is up" in r.stdout
    assert "spine: l1 -> leaf1 (h1 h2), l2 -> leaf2 (h3 h4); spine links unimpaired" in r.stdout
    r = cli("exec", "leaf2", "--", "ip", "-4", "-br", "addr", "show", "dev", "up", name=name)
    assert r.returncode == 0 and "10.76.2.2/24" in r.stdout, r
    r = cli("exec", "spine", "--", "ip", "-4", "-br", "addr", name=name)
    assert "10.76.1.1/24" in r.stdout and "10.76.2.1/24" in r.stdout, r
    r = cli("exec", "leaf9", "--", "true", name=name)
    assert r.returncode == 1 and "unknown host 'leaf9'" in r.stderr


def test_broken_lab_is_reported_and_removed():
    """A lab with racks whose middle namespace is gone: status says so, down removes the rest."""
    with _Up(workers=2, racks=2) as lab:
        nsutil.delete(f"{lab.name}-ls2")
        s = status(lab.name)
        assert not s["up"] and s["missing_netns"] == [f"{lab.name}-ls2"] and s["stray_netns"] == []
        r = cli("status", name=lab.name)
        assert r.returncode == 1 and f"switch namespaces missing: {lab.name}-ls2" in r.stdout
    assert nsutil.list_netns(f"{lab.name}-") == [] and not state_path(lab.name).exists()


# --- spine-link faults, the CLI, teardown -------------------------------------------

def test_spine_faults_with_cli_up_and_down():
    name = new_name()
    try:
        r = cli("up", "--racks", "2", "--workers", "3", "--spine-loss", "30", "--spine-rate",
                "50mbit", name=name)
        assert r.returncode == 0, r.stderr
        assert "spine: l1 -> leaf1 (h1 h2), l2 -> leaf2 (h3); spine links 50mbit, loss 30%" \
            in r.stdout
        lab = Lab.load(name)
        assert lab.racks == 2 and lab.spine_impair.loss_pct == 30 \
            and lab.spine_impair.rate == "50mbit"
        assert lab.state["spine_impair"] == {"loss_pct": 30.0, "reorder_pct": 0.0,
                                             "rate": "50mbit", "delay_ms": None}
        # the rate is on both directions of every spine link: b's egress, b's ingress IFB
        for k in (1, 2):
            for dev in ("b", "ifb0"):
                assert "rate 50Mbit" in tc_classes(lab, f"ls{k}", dev), (k, dev)
        # host links are not shaped
        assert "htb" not in lab.run("h1", ["tc", "qdisc", "show", "dev", "eth0"],
                                    capture_output=True, text=True, check=True).stdout
        # same rack: no spine link, nothing lost
        assert ping(lab, "h1", "h2") and udp_received(lab, "h1", "h2", 200) == 200
        # across racks: two lossy spine links (0.7 * 0.7 = 0.49 expected); ICMP untouched
        assert ping(lab, "h1", "h3")
        got = udp_received(lab, "h1", "h3", 200)
        print(f"spine loss 30%: {got}/200 datagrams across racks")
        assert 0 < got < 200
        r = cli("down", name=name)
        assert r.returncode == 0 and "removed (8 namespaces, state file)" in r.stdout, r
        assert nsutil.list_netns(f"{name}-") == [] and not state_path(name).exists()
    finally:
        teardown(name)


def test_one_rack_state_has_racks_and_sw():
    with _Up(workers=1) as lab:
        st = json.loads(state_path(lab.name).read_text())
        assert st["racks"] == 1 and st["spine_impair"] is None
        assert st["switch_netns"] == f"{lab.name}-sw"
        assert st["switches"] == [{"name": "sw", "netns": f"{lab.name}-sw", "role": "single",
                                   "rack": 1, "ports": ["p1"], "uplink": None}]
        assert (st["hosts"][0]["rack"], st["hosts"][0]["switch"]) == (1, "sw")
        assert set(nsutil.list_netns(f"{lab.name}-")) == {f"{lab.name}-sw", f"{lab.name}-h1"}
        assert lab.netns("sw") == f"{lab.name}-sw"


@pytest.mark.parametrize("args, message", [
    (["--racks", "3", "--workers", "2"], "3 racks need at least 3 workers"),
    (["--racks", "9", "--workers", "9"], "racks must be between 1 and 8"),
    (["--workers", "2", "--spine-rate", "1gbit"], "need --racks 2 or more"),
    (["--racks", "2", "--workers", "2", "--spine-rate", "fast"], "spine links: invalid rate"),
])
def test_bad_rack_arguments(args, message):
    name = new_name()
    r = cli("up", *args, name=name)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r
    assert nsutil.list_netns(f"{name}-") == [] and not state_path(name).exists()
