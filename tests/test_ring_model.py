"""The compiled ring harvester against a pure-Python model of the kernel's ring protocol.

A hypothesis state machine drives a "kernel" (push entries, recycle harvested ones on reset,
and optionally overwrite entries as an overrunning emulator does) and two harvesters over two
copies of the same ring: the compiled one (kvmio) and a Python model.  They must agree on every
entry returned, on the index, on why they stopped, and on the ring's memory.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmio.dirty.ring import GFN_DTYPE, STOP_EMPTY, STOP_HOLE, STOP_LIMIT, harvest_array

DIRTY, RESET = 1, 2
HOLE_WINDOW = 2048
M32 = 0xFFFFFFFF


def model_harvest(ring: np.ndarray, index: int, limit: int) -> tuple[list[tuple[int, int]],
                                                                    int, int]:
    size = len(ring)
    out: list[tuple[int, int]] = []
    while len(out) < limit:
        e = ring[index % size]
        if int(e["flags"]) != DIRTY:
            break
        out.append((int(e["slot"]), int(e["offset"])))
        ring[index % size]["flags"] = RESET
        index = (index + 1) & M32
    if len(out) == limit:
        return out, index, STOP_LIMIT
    window = min(size - 1, HOLE_WINDOW)
    for k in range(1, window + 1):
        if int(ring[(index + k) % size]["flags"]) == DIRTY:
            return out, index, STOP_HOLE
    return out, index, STOP_EMPTY


class RingProtocol(RuleBasedStateMachine):
    """Kernel + two harvesters over identical rings."""

    @initialize(log2=st.integers(min_value=2, max_value=7),
                start=st.sampled_from([0, 5, M32 - 3]))
    def setup(self, log2: int, start: int) -> None:
        self.size = 1 << log2
        self.c_ring = np.zeros(self.size, dtype=GFN_DTYPE)
        self.py_ring = np.zeros(self.size, dtype=GFN_DTYPE)
        # Free-running indices may start anywhere, including just before 2**32 (wrap-around).
        self.dirty_index = self.reset_index = start
        self.c_index = self.py_index = start
        self.pushed: list[tuple[int, int]] = []
        self.harvested: list[tuple[int, int]] = []
        self.harvested_since_reset = 0
        self.overran = False
        self.detected = False
        self.published_after_overrun = False
        self.next_offset = 0

    def _write(self, i: int, slot: int, offset: int) -> None:
        for ring in (self.c_ring, self.py_ring):
            e = ring[i % self.size]
            e["slot"], e["offset"], e["flags"] = slot, offset, DIRTY

    @rule(n=st.integers(min_value=0, max_value=40), slot=st.integers(0, 3))
    def push(self, n: int, slot: int) -> None:
        """The kernel publishes entries while there is room (as a well-behaved ring does)."""
        for _ in range(n):
            if (self.dirty_index - self.reset_index) & M32 >= self.size:
                break
            self._write(self.dirty_index, slot, self.next_offset)
            self.pushed.append((slot, self.next_offset))
            self.published_after_overrun = self.overran
            self.next_offset += 1
            self.dirty_index = (self.dirty_index + 1) & M32

    @rule(n=st.integers(min_value=1, max_value=20))
    def overrun(self, n: int) -> None:
        """The emulator pushes past the end: the newest entries overwrite the oldest."""
        if ((self.dirty_index - self.reset_index) & M32) + n <= self.size:
            return
        self.overran = True
        for _ in range(n):
            self._write(self.dirty_index, 9, self.next_offset)
            self.next_offset += 1
            self.dirty_index = (self.dirty_index + 1) & M32

    @rule(limit=st.one_of(st.none(), st.integers(min_value=0, max_value=150)))
    def harvest(self, limit: int | None) -> None:
        lim = self.size if limit is None else min(limit, self.size)
        got, self.c_index, c_stop = harvest_array(self.c_ring, self.c_index, limit)
        exp, self.py_index, py_stop = model_harvest(self.py_ring, self.py_index, lim)
        assert list(zip(got.slots.tolist(), got.offsets.tolist(), strict=True)) == exp
        assert self.c_index == self.py_index
        assert c_stop == py_stop or (lim == 0 and c_stop == STOP_LIMIT)
        if not self.overran:
            assert c_stop != STOP_HOLE
            self.harvested.extend(exp)
        before = self.harvested_since_reset
        self.harvested_since_reset += len(exp)
        # kvmio's signals: a hole, or a ring that filled completely since the last reset.
        if c_stop == STOP_HOLE or self.harvested_since_reset >= self.size > before:
            self.detected = True
        # An overrun is noticed at the latest once the kernel has published past it and the
        # harvester has caught up (a hole).  Not sooner in every case: if a partial harvest
        # took the entry that wrapped around and a reset followed, the full-ring signal never
        # forms, and the loss shows only when the kernel publishes again.
        if self.overran and c_stop == STOP_EMPTY and self.published_after_overrun:
            assert self.detected, "an overrun went unnoticed after the kernel published again"

    @rule()
    def reset(self) -> None:
        """KVM_RESET_DIRTY_RINGS: recycle harvested entries in order, stop at the first other."""
        count = 0
        while self.reset_index != self.dirty_index:
            i = self.reset_index % self.size
            if not int(self.c_ring[i]["flags"]) & RESET:
                break
            for ring in (self.c_ring, self.py_ring):
                ring[i]["flags"] = 0
            self.reset_index = (self.reset_index + 1) & M32
            count += 1
        if not self.overran:
            assert count == self.harvested_since_reset  # reset == harvested
        elif count != self.harvested_since_reset:
            self.detected = True  # kvmio's reset check raises
        self.harvested_since_reset = 0

    @rule(k=st.integers(0, 127))
    def stale_reset_flag(self, k: int) -> None:
        """A harvested-but-not-recycled entry ahead of the index is never taken as dirty."""
        i = (self.c_index + k) % self.size
        if int(self.c_ring[i]["flags"]) == 0:
            for ring in (self.c_ring, self.py_ring):
                ring[i]["flags"] = RESET

    @invariant()
    def same_memory(self) -> None:
        if hasattr(self, "c_ring"):
            assert np.array_equal(self.c_ring, self.py_ring)

    @invariant()
    def in_order_and_nothing_lost(self) -> None:
        if hasattr(self, "pushed") and not self.overran:
            assert self.harvested == self.pushed[: len(self.harvested)]


RingProtocol.TestCase.settings = settings(max_examples=400, stateful_step_count=40,
                                          deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_ring_protocol = RingProtocol.TestCase


def test_harvest_array_rejects_bad_rings() -> None:
    with pytest.raises(ValueError, match="power of two"):
        harvest_array(np.zeros(6, dtype=GFN_DTYPE), 0)
    with pytest.raises(ValueError, match="GFN_DTYPE"):
        harvest_array(np.zeros(8, dtype=np.uint64), 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        harvest_array(np.zeros(8, dtype=GFN_DTYPE), 0, -1)


def test_full_wrap_around_harvest() -> None:
    ring = np.zeros(16, dtype=GFN_DTYPE)
    ring["flags"] = DIRTY
    ring["offset"] = np.arange(16)
    got, idx, stop = harvest_array(ring, 10)
    assert got.offsets.tolist() == [*range(10, 16), *range(10)]
    assert idx == 26 and stop == STOP_LIMIT
    assert (ring["flags"] == RESET).all()
