"""The pure parts of a lab with racks (issue 18): how hosts are split over
racks, the addresses and switch entries of the state, and the argument errors.
No root: nothing here touches the kernel."""
import pytest

from netns_lab import plan
from netns_lab.cli import build_parser, tree
from netns_lab.errors import LabConfigError, LabError
from netns_lab.topology import Lab


def racks_of(hosts):
    return {h["name"]: (h["rack"], h["switch"]) for h in hosts}


@pytest.mark.parametrize("workers, racks, sizes", [
    (5, 2, [3, 2]), (4, 2, [2, 2]), (7, 3, [3, 2, 2]), (8, 8, [1] * 8), (2, 1, [2]),
    (99, 8, [13, 13, 13, 12, 12, 12, 12, 12]),
])
def test_rack_sizes(workers, racks, sizes):
    assert plan.rack_sizes(workers, racks) == sizes
    assert sum(sizes) == workers


def test_hosts_split_contiguously_ps_in_rack_1():
    hosts = plan.hosts("t", 5, True, racks=2)
    assert racks_of(hosts) == {"h1": (1, "leaf1"), "h2": (1, "leaf1"), "h3": (1, "leaf1"),
                               "h4": (2, "leaf2"), "h5": (2, "leaf2"), "ps": (1, "leaf1")}
    # addresses, gateways and switch ports are those of a one-rack lab
    h4 = hosts[3]
    assert h4 == {"name": "h4", "netns": "t-h4", "ifname": "eth0", "addr": "10.77.4.2",
                  "prefix": 24, "gateway": "10.77.4.1", "switch_port": "p4", "role": "worker",
                  "rack": 2, "switch": "leaf2"}
    assert hosts[-1]["addr"] == "10.77.100.2" and hosts[-1]["switch_port"] == "pps"
    assert plan.host_net(h4) == "10.77.4.0/24" and plan.host_net(hosts[-1]) == "10.77.100.0/24"


def test_one_rack_hosts_and_switch():
    hosts = plan.hosts("t", 2, True)
    assert racks_of(hosts) == {"h1": (1, "sw"), "h2": (1, "sw"), "ps": (1, "sw")}
    assert plan.switches("t", hosts) == [
        {"name": "sw", "netns": "t-sw", "role": "single", "rack": 1,
         "ports": ["p1", "p2", "pps"], "uplink": None}]
    assert plan.switch_netns("t") == "t-sw"


def test_switch_entries_two_racks():
    hosts = plan.hosts("t", 4, True, racks=2)
    sws = plan.switches("t", hosts, racks=2)
    assert [s["name"] for s in sws] == ["leaf1", "leaf2", "spine"]
    assert sws[0] == {"name": "leaf1", "netns": "t-leaf1", "role": "leaf", "rack": 1,
                      "ports": ["p1", "p2", "pps"],
                      "uplink": {"port": "up", "addr": "10.76.1.2", "peer_addr": "10.76.1.1",
                                 "peer_port": "l1", "mid_netns": "t-ls1"}}
    assert sws[1]["ports"] == ["p3", "p4"] and sws[1]["uplink"]["addr"] == "10.76.2.2"
    assert sws[1]["uplink"]["peer_port"] == "l2" and sws[1]["uplink"]["mid_netns"] == "t-ls2"
    assert sws[2] == {"name": "spine", "netns": "t-spine", "role": "spine", "rack": 0,
                      "ports": ["l1", "l2"], "uplink": None}
    assert plan.switch_netns("t", 2) == "t-spine"


def test_lab_state_and_names_two_racks():
    lab = Lab("t", workers=4, racks=2, spine_rate="1Gbit", spine_loss_pct=1)
    st = lab.state
    assert list(st) == ["name", "switch_netns", "mtu", "impair", "hosts", "racks", "switches",
                        "spine_impair"]
    assert st["switch_netns"] == "t-spine" and st["racks"] == 2
    assert st["spine_impair"] == {"loss_pct": 1.0, "reorder_pct": 0.0, "rate": "1gbit",
                                  "delay_ms": None}
    assert plan.lab_netns(st) == ["t-leaf1", "t-leaf2", "t-spine", "t-ls1", "t-ls2",
                                  "t-h1", "t-h2", "t-h3", "t-h4"]
    assert [lab.netns(n) for n in ("sw", "switch", "leaf2", "spine", "ls1", "h3")] == \
        ["t-spine", "t-spine", "t-leaf2", "t-spine", "t-ls1", "t-h3"]
    with pytest.raises(LabError, match="unknown host 'leaf3'.*leaf1, leaf2, "
                       "spine, ls1, ls2, h1"):
        lab.netns("leaf3")
    assert tree(st) == "  spine: l1 -> leaf1 (h1 h2), l2 -> leaf2 (h3 h4); " \
                       "spine links 1gbit, loss 1%"
    # no spine faults: still a dict for a lab with racks
    assert Lab("t", workers=2, racks=2).state["spine_impair"]["rate"] is None


def test_lab_state_one_rack():
    st = Lab("t", workers=2).state
    assert st["racks"] == 1 and st["spine_impair"] is None and st["switch_netns"] == "t-sw"
    assert [s["name"] for s in st["switches"]] == ["sw"]
    assert plan.lab_netns(st) == ["t-sw", "t-h1", "t-h2"]
    # a state written before racks existed reads as one rack
    old = {k: v for k, v in st.items() if k not in ("racks", "switches", "spine_impair")}
    assert plan.switches_of(old) == st["switches"]


@pytest.mark.parametrize("kw, message", [
    (dict(workers=2, racks=3), "3 racks need at least 3 workers"),
    (dict(workers=4, racks=0), "racks must be between 1 and 8"),
    (dict(workers=9, racks=9), "racks must be between 1 and 8"),
    (dict(workers=4, racks=True), "racks must be between 1 and 8"),
    (dict(workers=4, racks="2"), "racks must be between 1 and 8"),
    (dict(workers=4, spine_rate="1gbit"), "need --racks 2 or more"),
    (dict(workers=4, spine_loss_pct=5), "need --racks 2 or more"),
    (dict(workers=4, racks=2, spine_rate="fast"), "spine links: invalid rate 'fast'"),
    (dict(workers=4, racks=2, spine_rate="1kbit"), "spine links: rate '1kbit' out of range"),
    (dict(workers=4, racks=2, spine_loss_pct=101), "spine links: loss must be a percentage"),
])
def test_bad_rack_arguments(kw, message):
    with pytest.raises(LabConfigError, match=message):
        Lab("t", **kw)


def test_cli_flags():
    args = build_parser().parse_args(["up", "--racks", "2", "--workers", "4", "--spine-rate",
                                      "50mbit", "--spine-loss", "2"])
    assert (args.racks, args.spine_rate, args.spine_loss) == (2, "50mbit", 2.0)
    args = build_parser().parse_args(["up", "--workers", "4"])
    assert (args.racks, args.spine_rate, args.spine_loss) == (1, None, 0.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--workers", "4", "--racks", "2", "--spine-loss", "200"])
