"""Memory-slot bookkeeping against a model, on the real kernel (hypothesis state machine):
adds succeed exactly when the range is aligned, non-empty and free and the slot id unused;
deletes exactly when the slot exists; every region reads back what was written through it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmio import Kvm, KvmInvalidArgumentError

pytestmark = pytest.mark.kvm
PAGE = 4096


class Slots(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.model: dict[int, tuple[int, int, bytes]] = {}  # slot -> (gpa, size, marker)
        self.counter = 0

    def teardown(self) -> None:
        self.vm.close()
        self.kvm.close()

    def _free(self, gpa: int, size: int) -> bool:
        return all(gpa + size <= g or g + s <= gpa for g, s, _ in self.model.values())

    @rule(page=st.integers(0, 64), pages=st.integers(0, 8), misalign=st.sampled_from([0, 0, 8]),
          slot=st.one_of(st.none(), st.integers(0, 6)))
    def add(self, page: int, pages: int, misalign: int, slot: int | None) -> None:
        gpa, size = page * PAGE + misalign, pages * PAGE
        ok = (size > 0 and misalign == 0 and self._free(gpa, size)
              and (slot is None or slot not in self.model))
        try:
            r = self.vm.add_memory_region(gpa, size, slot=slot, log_dirty=bool(page % 2))
        except KvmInvalidArgumentError:
            assert not ok
            return
        assert ok
        assert slot is None or r.slot == slot
        assert slot is not None or r.slot == min(set(range(100)) - set(self.model))
        self.counter += 1
        marker = self.counter.to_bytes(8, "little")
        self.vm.write_memory(gpa + size - 8, marker)
        self.model[r.slot] = (gpa, size, marker)

    @rule(slot=st.integers(0, 6))
    def delete(self, slot: int) -> None:
        try:
            self.vm.delete_memory_region(slot)
        except KvmInvalidArgumentError:
            assert slot not in self.model
            return
        assert slot in self.model
        del self.model[slot]

    @invariant()
    def agrees(self) -> None:
        regions = self.vm.regions
        assert {s: (r.guest_phys_addr, r.size) for s, r in regions.items()} == {
            s: (g, n) for s, (g, n, _) in self.model.items()}
        for s, (g, n, marker) in self.model.items():
            assert regions[s].read(g + n - 8, 8) == marker


Slots.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
test_slots = Slots.TestCase
