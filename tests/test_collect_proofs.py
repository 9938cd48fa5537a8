"""Proofs for collection paths that only fail under faults: a collection that fails half-way
hands every harvested entry back, a tracker whose worker failed re-raises that error from every
public method, and a vCPU closed while another owner holds its ring loses nothing.

Faults are injected through the documented patch point for fakes, ``kvmio._abi.ioctl`` (and,
for a harvest that fails, the module-level compiled-harvest wrapper ``_harvest_raw`` of
:mod:`kvmio.dirty.ring`).  The tests that use such a FAKE say so and are marked ``fake``;
everything else, the guest and its rings, is the real kernel's.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvmio import Hlt, Kvm, KvmError, Vcpu, _abi
from kvmio._abi import lib
from kvmio.dirty import ring as ring_module
from kvmio.guests.workload import MEM_SLOT, Workload
from kvmio.tracker import DirtyTracker

from guests import wait_until

#: A tracker worker that never wakes by itself.
NO_WORKER = 3600.0
_MAX_WRITES = 80  # offset of max_writes in a dirtier parameter block


class FailOnce:
    """FAKE: wraps the real ``kvmio._abi.ioctl`` and makes call number ``at`` of ``request``
    fail as a failing ioctl does (a :class:`KvmError` with the errno and the ioctl's name);
    every other call reaches the kernel."""

    def __init__(self, request: int, err: int = errno.EIO, at: int = 1):
        self.request = request
        self.err = err
        self.at = at
        self.calls = 0
        self.failed_in: str | None = None  # the thread that met the failure
        self.real = _abi.ioctl

    def ioctl(self, fd: int, request: int, arg: Any = 0, *, name: str) -> int:
        if request == self.request:
            self.calls += 1
            if self.calls == self.at:
                self.failed_in = threading.current_thread().name
                raise KvmError("injected failure", errno=self.err, ioctl=name)
        return self.real(fd, request, arg, name=name)


def _written(w: Workload) -> np.ndarray:
    return np.flatnonzero(w.mem.page_words())


def _pages_of(ranges: Any, w: Workload) -> set[int]:
    out: set[int] = set()
    for gpa, length in ranges:
        first = (gpa - w.mem.guest_phys_addr) // 4096
        out.update(range(first, first + length // 4096))
    return out


def _set_max_writes(w: Workload, i: int, n: int) -> None:
    w.vm.write_memory(w.params_addr(i) + _MAX_WRITES, n.to_bytes(8, "little"))


# --------------------------------------------------------------------------------------------
# 2. A failed two-ring collection hands everything back


@pytest.mark.fake
@pytest.mark.parametrize("fault", ["reset-refused", "reset-fails-after-a-real-reset",
                                   "second-ring-harvest-fails"])
def test_a_failed_two_ring_collection_loses_nothing(kvm: Kvm, monkeypatch: pytest.MonkeyPatch,
                                                    fault: str) -> None:
    """FAKE faults inside ``Vm.collect_dirty_pages`` on two real rings: KVM_RESET_DIRTY_RINGS
    fails at its first call (the kernel reset nothing), or fails after a real call that reset
    everything (the loop calls again until 0), or the second ring's harvest fails after the
    first ring was harvested.  The collection raises that error; the guests write more; the
    next collection reports every page the guests wrote, checked against guest memory, and
    the reset accounting is in step (a mismatch would raise DirtyRingOverrunError)."""
    with Workload(kvm, mem_size=64 << 20, vcpus=2, ring_entries=4096, max_writes=300,
                  order="random", value="generation") as w:
        w.generation = 1
        for i in (0, 1):  # 300 entries in each ring, far below its soft limit
            assert isinstance(w.run_vcpu(i), Hlt)
        assert all(v.dirty_ring.count_dirty() == 300 for v in w.vcpus)
        injected: FailOnce | None = None
        if fault == "second-ring-harvest-fails":
            real_harvest = ring_module._harvest_raw
            calls = []

            def harvest_raw(*args: Any, **kw: Any) -> Any:
                calls.append(1)
                if len(calls) == 2:
                    raise KvmError("injected failure", errno=errno.EIO)
                return real_harvest(*args, **kw)

            monkeypatch.setattr(ring_module, "_harvest_raw", harvest_raw)
        else:
            injected = FailOnce(lib.KVM_RESET_DIRTY_RINGS,
                                at=1 if fault == "reset-refused" else 2)
            monkeypatch.setattr(_abi, "ioctl", injected.ioctl)
        with pytest.raises(KvmError, match="injected failure") as e:
            w.vm.collect_dirty_pages()
        assert e.value.errno == errno.EIO
        if injected is not None:
            assert e.value.ioctl == "KVM_RESET_DIRTY_RINGS" and injected.calls == injected.at
        else:
            assert len(calls) == 2  # the first ring was harvested, the second failed
        monkeypatch.undo()
        only_first = set(_written(w).tolist())
        w.generation = 2
        for i in (0, 1):
            _set_max_writes(w, i, 600)
            assert isinstance(w.run_vcpu(i), Hlt)
        assert w.total_writes() == 1200
        words = w.mem.page_words()
        assert (words == 1).any()  # pages only the first run wrote: only a hand-back has them
        d = w.vm.collect_dirty_pages(final=True)
        assert set(d.pages) == {MEM_SLOT}
        assert np.array_equal(d.pages[MEM_SLOT], _written(w))
        assert only_first <= set(d.pages[MEM_SLOT].tolist())
        again = w.vm.collect_dirty_pages()  # in step: nothing left, no reset mismatch
        assert again.count == 0 and again.entries == 0


# --------------------------------------------------------------------------------------------
# 3. A worker error is re-raised by every public method


_CALLS: dict[str, Callable[[DirtyTracker, Vcpu], object]] = {
    "take": lambda t, v: t.take(),
    "rate": lambda t, v: t.rate(),
    "on_ring_full": lambda t, v: t.on_ring_full(v),
    "start": lambda t, v: t.start(),
    "stop": lambda t, v: t.stop(),
}


@pytest.mark.fake
@pytest.mark.parametrize(("mode", "method"),
                         [("ring", m) for m in _CALLS] +
                         [("bitmap", m) for m in _CALLS if m != "on_ring_full"])
def test_a_worker_error_is_reraised_by_every_public_method(
        kvm: Kvm, monkeypatch: pytest.MonkeyPatch, mode: str, method: str) -> None:
    """FAKE: the worker's first pass meets a failing KVM_RESET_DIRTY_RINGS (ring mode) or
    KVM_GET_DIRTY_LOG (bitmap mode).  The class docstring promises that take, rate,
    on_ring_full, start and stop re-raise that error: the very same exception."""
    with Workload(kvm, mem_size=16 << 20, ring_entries=4096 if mode == "ring" else None,
                  max_writes=100) as w:
        assert isinstance(w.run_vcpu(0), Hlt)  # something for the worker to harvest
        request = lib.KVM_RESET_DIRTY_RINGS if mode == "ring" else lib.KVM_GET_DIRTY_LOG
        injected = FailOnce(request)
        monkeypatch.setattr(_abi, "ioctl", injected.ioctl)
        tracker = DirtyTracker(w.vm, mode, interval=0.001)  # type: ignore[arg-type]
        tracker.start()
        try:
            wait_until(lambda: tracker.error is not None, what="the worker's pass to fail")
            wait_until(lambda: not tracker.running, what="the worker to stop")
            assert injected.failed_in == "kvmio-dirty-tracker"  # the worker met it, not us
            err = tracker.error
            assert isinstance(err, KvmError)
            monkeypatch.undo()  # the fault is over: only the recorded error can raise now
            with pytest.raises(KvmError, match="injected failure") as e:
                _CALLS[method](tracker, w.vcpus[0])
            assert e.value is err
            assert e.value.errno == errno.EIO
            assert e.value.ioctl == ("KVM_RESET_DIRTY_RINGS" if mode == "ring"
                                     else "KVM_GET_DIRTY_LOG")
        finally:
            with contextlib.suppress(KvmError):
                tracker.close()
        assert tracker.error is err  # the first error stays the tracker's error
