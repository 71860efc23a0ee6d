"""What incd checks of a registration before anything changes: the
control-API version and the member's data path (pure logic; the lab test in test_control_api.py sends it
over a real control connection)."""
from __future__ import annotations

import pytest

from bpf import control
from incd.requests import RegistrationError, check_version, validate_register


def test_the_agents_version_and_none_at_all_are_accepted():
    assert check_version({"op": "register", "version": control.CONTROL_VERSION}) == control.CONTROL_VERSION
    assert check_version({"op": "rejoin"}) == 1  # before the field existed


@pytest.mark.parametrize("v", [control.CONTROL_VERSION + 1, 0, -1, 10**30])
def test_another_version_is_refused_naming_both(v):
    with pytest.raises(RegistrationError) as e:
        check_version({"op": "register", "version": v})
    assert str(e.value) == (f"control API version {v} is not supported by this incd "
                            f"(speaks {control.CONTROL_VERSION}): upgrade inc-agent or incd so both match")


@pytest.mark.parametrize("v", ["1", 1.0, True, None, [1]])
def test_a_version_that_is_not_an_integer_is_refused(v):
    with pytest.raises(RegistrationError, match="'version' must be an integer"):
        check_version({"op": "register", "version": v})


BASE = {"op": "register", "job": 3, "rank": 0, "world": 2, "window": 8, "port": 40000}


@pytest.mark.parametrize("datapath", ["xdp", "socket", None])
def test_the_members_datapath_is_kept(datapath):
    req = dict(BASE, datapath=datapath) if datapath else dict(BASE)
    assert validate_register(req).datapath == datapath


@pytest.mark.parametrize("bad", ["fast", "", 1, ["xdp"]])
def test_an_unknown_datapath_is_refused(bad):
    with pytest.raises(RegistrationError, match="'datapath' must be one of xdp, socket"):
        validate_register(dict(BASE, datapath=bad))


def test_the_frame_is_kept_std_by_default_and_checked():
    assert validate_register(dict(BASE)).frame == "std"
    assert validate_register(dict(BASE, frame="jumbo")).frame == "jumbo"
    for bad in ("huge", "", 1, None):
        with pytest.raises(RegistrationError, match="'frame' must be one of std, jumbo"):
            validate_register(dict(BASE, frame=bad))
    with pytest.raises(RegistrationError, match="jumbo frames are for modulo jobs, not hash mode"):
        validate_register(dict(BASE, frame="jumbo", mode="hash"))


def test_a_jumbo_job_asks_for_and_keeps_a_frames_window():
    """Two frames' slots at least (a window of one frame), however small a
    window its members asked for; the resize policy never goes below it."""
    from bpf import wire
    from incd.jobs import Job
    from incd.memory import MIN_SLOTS

    j = Job(3, 2, "modulo", req_window=1, frame="jumbo")
    assert j.min_slots == 2 * wire.JUMBO_SUBS and j.demand().want_slots == 2 * wire.JUMBO_SUBS
    std = Job(4, 2, "modulo", req_window=1)
    assert std.min_slots == MIN_SLOTS and std.demand().want_slots == 2
