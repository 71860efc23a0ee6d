"""Aggregator pool allocation: contiguous regions, first fit, coalescing on free.

A modulo job needs 2W contiguous slots because the data plane addresses them as
offset + psn % size.
"""
from __future__ import annotations

import bisect


class AllocError(RuntimeError):
    pass


class RegionAllocator:
    def __init__(self, size: int):
        if size <= 0:
            raise ValueError("pool size must be positive")
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)
        self._used: dict[int, int] = {}

    def alloc(self, length: int) -> int:
        if length <= 0:
            raise AllocError(f"region length must be positive, got {length}")
        for i, (off, ln) in enumerate(self._free):
            if ln >= length:
                if ln == length:
                    del self._free[i]
                else:
                    self._free[i] = (off + length, ln - length)
                self._used[off] = length
                return off
        raise AllocError(
            f"switch memory full: need {length} contiguous slots, largest free run is "
            f"{self.largest_free()} of {self.size}"
        )

    def reserve(self, offset: int, length: int) -> None:
        """Take exactly [offset, offset+length), which must be free."""
        for i, (off, ln) in enumerate(self._free):
            if off <= offset and offset + length <= off + ln:
                pieces = [(off, offset - off), (offset + length, off + ln - offset - length)]
                self._free[i:i + 1] = [p for p in pieces if p[1] > 0]
                self._used[offset] = length
                return
        raise AllocError(f"slots {offset}..{offset + length - 1} are not free")

    def free(self, offset: int) -> None:
        length = self._used.pop(offset, None)
        if length is None:
            raise AllocError(f"no region at offset {offset}")
        i = bisect.bisect(self._free, (offset, length))
        self._free.insert(i, (offset, length))
        # Merge with neighbours so a later large request can fit.
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            self._free[i] = (offset, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def lower_fit(self, offset: int) -> int | None:
        """Where first fit would put the region at offset if it were allocated
        again, if that is lower: a move that compacts the pool."""
        old = self._used[offset]
        self.free(offset)
        try:
            for off, ln in self._free:
                if ln >= old:
                    return off if off < offset else None
            return None
        finally:
            self.reserve(offset, old)

    def fits_if_moved(self, offset: int, length: int) -> bool:
        """Whether the region at offset could be replaced by one of `length`."""
        old = self._used[offset]
        self.free(offset)
        try:
            return self.largest_free() >= length
        finally:
            self.reserve(offset, old)

    def largest_free(self) -> int:
        return max((ln for _, ln in self._free), default=0)

    def free_slots(self) -> int:
        return sum(ln for _, ln in self._free)

    def free_runs(self) -> list[tuple[int, int]]:
        return list(self._free)

    def regions(self) -> dict[int, int]:
        return dict(self._used)
