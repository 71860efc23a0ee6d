"""Where a reduce starts near the wire psn's wrap (hostagent.reduction.first_psn)."""
from types import SimpleNamespace

from hostagent.reduction import WIRE_PSNS, first_psn


def params(mode="modulo", slots=96):
    return SimpleNamespace(mode=mode, slots=slots)


def test_a_reduce_that_does_not_cross_the_wrap_starts_where_it_is():
    assert first_psn(5, 100, params()) == 5
    assert first_psn(WIRE_PSNS - 100, 100, params()) == WIRE_PSNS - 100  # ends exactly at the wrap


def test_slot_counts_that_divide_2_32_and_other_modes_cross_as_they_are():
    assert first_psn(WIRE_PSNS - 10, 100, params(slots=128)) == WIRE_PSNS - 10
    assert first_psn(WIRE_PSNS - 10, 100, params(mode="hash")) == WIRE_PSNS - 10


def test_a_crossing_reduce_moves_to_the_next_lap_keeping_the_slot_sequence():
    for lap in (0, 3):
        start = lap * WIRE_PSNS + WIRE_PSNS - 10
        got = first_psn(start, 100, params())
        assert got > start and got // WIRE_PSNS == lap + 1  # in the next lap, not crossing it
        assert (got % WIRE_PSNS) % 96 == (start % WIRE_PSNS) % 96  # the slot it would have used
        assert got % WIRE_PSNS + 100 <= WIRE_PSNS
