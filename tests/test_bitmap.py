"""The dirty bitmap: KVM_GET_DIRTY_LOG, manual protect (with INITIALLY_SET), KVM_CLEAR_DIRTY_LOG
and its alignment rules, and collect_dirty_pages() without a ring."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmio import Kvm, KvmInvalidArgumentError, KvmStateError, KvmUnsupportedError
from kvmio.guests.workload import MEM_SLOT, Workload


def _written(w: Workload) -> np.ndarray:
    return np.flatnonzero(w.mem.page_words()).astype(np.uint64)


def test_get_dirty_log_clears(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, max_writes=500, value="count") as w:
        w.run_vcpu(0)
        first = w.vm.get_dirty_log(MEM_SLOT)
        assert first.dtype == np.uint64
        assert np.array_equal(first, _written(w))
        assert len(w.vm.get_dirty_log(MEM_SLOT)) == 0  # cleared and re-protected


def test_manual_protect_keeps_bits_until_cleared(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=64 << 20, working_set=4096 * 256, order="sequential",
                  max_writes=256, value="count", manual_protect=True) as w:
        assert w.vm.manual_dirty_log_protect
        w.run_vcpu(0)
        a = w.vm.get_dirty_log(MEM_SLOT)
        assert a.tolist() == list(range(256))
        assert np.array_equal(w.vm.get_dirty_log(MEM_SLOT), a)  # not cleared by GET
        w.vm.clear_dirty_log(MEM_SLOT, 0, 128)
        assert w.vm.get_dirty_log(MEM_SLOT).tolist() == list(range(128, 256))
        w.vm.clear_dirty_log(MEM_SLOT, 128, 128, pages=[130, 200])
        left = w.vm.get_dirty_log(MEM_SLOT).tolist()
        assert 130 not in left and 200 not in left and len(left) == 126
        w.vm.clear_dirty_log(MEM_SLOT)  # the whole slot
        assert len(w.vm.get_dirty_log(MEM_SLOT)) == 0
        # Cleared pages are write-protected again: new writes are reported.
        w.vm.write_memory(w.params_addr(0) + 80, (300).to_bytes(8, "little"))
        w.run_vcpu(0)
        assert w.vm.get_dirty_log(MEM_SLOT).tolist() == list(range(44))


def test_initially_set(kvm: Kvm) -> None:
    with Workload(kvm, mem_size=4 << 20, manual_protect=True, initially_set=True) as w:
        assert len(w.vm.get_dirty_log(MEM_SLOT)) == w.mem.num_pages


def test_clear_rules(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 1000 * 4096, log_dirty=True)
        vm.add_memory_region(1 << 30, 4096)
        with pytest.raises(KvmStateError, match="manual protect"):
            vm.clear_dirty_log(0)
        vm.enable_manual_dirty_log_protect()
        with pytest.raises(KvmInvalidArgumentError, match="multiple of 64"):
            vm.clear_dirty_log(0, 32, 64)
        with pytest.raises(KvmInvalidArgumentError, match="multiple of 64 unless"):
            vm.clear_dirty_log(0, 0, 100)
        vm.clear_dirty_log(0, 960, 40)  # ends at the end of the slot: allowed
        with pytest.raises(KvmInvalidArgumentError, match="outside slot"):
            vm.clear_dirty_log(0, 960, 64)
        with pytest.raises(KvmInvalidArgumentError, match="outside slot"):
            vm.clear_dirty_log(0, 0, 0)
        with pytest.raises(KvmInvalidArgumentError, match="outside the range"):
            vm.clear_dirty_log(0, 0, 64, pages=[64])
        with pytest.raises(KvmInvalidArgumentError, match="log_dirty"):
            vm.get_dirty_log(1)
        with pytest.raises(KvmInvalidArgumentError, match="no memory region"):
            vm.get_dirty_log(9)


def test_collect_without_ring_uses_bitmaps(kvm: Kvm) -> None:
    for manual in (False, True):
        with Workload(kvm, mem_size=64 << 20, max_writes=400, value="count",
                      manual_protect=manual) as w:
            w.run_vcpu(0)
            d = w.vm.collect_dirty_pages()
            assert np.array_equal(d.pages[MEM_SLOT], _written(w))
            assert d.count == len(_written(w)) and d.entries == 0
            assert w.vm.collect_dirty_pages().count == 0


def test_manual_protect_unsupported_message(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    with kvm.create_vm() as vm:
        monkeypatch.setattr(vm, "check_extension", lambda cap: 0)
        with pytest.raises(KvmUnsupportedError, match="MANUAL_DIRTY_LOG_PROTECT2"):
            vm.enable_manual_dirty_log_protect()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 700), st.data())
def test_bitmap_decoding_matches_a_simple_model(num_pages: int, data: st.DataObject) -> None:
    from kvmio.vm import bitmap_to_pages

    pages = sorted(data.draw(st.sets(st.integers(0, num_pages - 1))))
    words = np.zeros((num_pages + 63) // 64, dtype=np.uint64)
    for p in pages:
        words[p // 64] |= np.uint64(1) << np.uint64(p % 64)
    # Bits beyond the slot's end (never set by the kernel) are ignored anyway.
    if num_pages % 64:
        words[-1] |= np.uint64(1) << np.uint64(63)
    got = bitmap_to_pages(words, num_pages)
    assert got.dtype == np.uint64 and got.tolist() == pages
