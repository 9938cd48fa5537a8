"""Proofs for collection paths that only fail under faults: a collection that fails half-way
hands every harvested entry back, a tracker whose worker failed re-raises that error from every
public method, and a vCPU closed while another owner holds its ring loses nothing.

Faults are injected through the documented patch point for fakes, ``kvmio._abi.ioctl``.  The
tests that use such a FAKE say so and are marked ``fake``; everything else, the guest and its
rings, is the real kernel's.
"""

from __future__ import annotations

import contextlib
import errno
import random
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvmio import Hlt, Kvm, KvmClosedError, KvmError, Vcpu, _abi
from kvmio._abi import lib
from kvmio.guests.workload import MEM_SLOT, Workload
from kvmio.tracker import DirtyTracker

from guests import wait_until

#: A tracker worker that never wakes by itself.
NO_WORKER = 3600.0
_MAX_WRITES = 80  # offset of max_writes in a dirtier parameter block


class FailOnce:
    """FAKE: wraps the real ``kvmio._abi.ioctl`` and makes the calls numbered ``at`` of ``request``
    fail as a failing ioctl does (a :class:`KvmError` with the errno and the ioctl's name);
    every other call reaches the kernel."""

    def __init__(self, request: int, err: int = errno.EIO, at: tuple[int, ...] = (1,)):
        self.request = request
        self.err = err
        self.at = at
        self.calls = 0
        self.failed_in: str | None = None  # the thread that met the failure
        self.real = _abi.ioctl

    def ioctl(self, fd: int, request: int, arg: Any = 0, *, name: str) -> int:
        if request == self.request:
            self.calls += 1
            if self.calls in self.at:
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
@pytest.mark.parametrize("fault", ["reset-refused", "reset-refused-twice",
                                   "reset-refused-with-a-closed-vcpu"])
def test_a_failed_two_ring_collection_loses_nothing(kvm: Kvm, monkeypatch: pytest.MonkeyPatch,
                                                    fault: str) -> None:
    """FAKE fault inside ``Vm.collect_dirty_pages`` on two real rings, after both were
    harvested: KVM_RESET_DIRTY_RINGS fails (the kernel reset nothing); or it fails in two
    collections in a row (entries handed back twice keep their order and count); or vCPU 1
    was closed first, so the collection also took its leftovers from the ring set.  The
    collection raises that error; the guests write more; the next collection reports every
    page the guests wrote, checked against guest memory, and the reset accounting is in step
    (a mismatch would raise DirtyRingOverrunError)."""
    with Workload(kvm, mem_size=64 << 20, vcpus=2, ring_entries=4096, max_writes=300,
                  order="random", value="generation") as w:
        w.generation = 1
        for i in (0, 1):  # 300 entries in each ring, far below its soft limit
            assert isinstance(w.run_vcpu(i), Hlt)
        assert all(v.dirty_ring.count_dirty() == 300 for v in w.vcpus)
        w.generation = 2  # what later writes carry (set while every vCPU is open)
        running = [0, 1]
        if fault == "reset-refused-with-a-closed-vcpu":
            w.vcpus[1].close()  # its 300 entries go to the ring set, counted for the reset
            running = [0]
        failures = 2 if fault == "reset-refused-twice" else 1
        injected = FailOnce(lib.KVM_RESET_DIRTY_RINGS, at=tuple(range(1, failures + 1)))
        monkeypatch.setattr(_abi, "ioctl", injected.ioctl)
        try:
            for _ in range(failures):
                with pytest.raises(KvmError, match="injected failure") as e:
                    w.vm.collect_dirty_pages()
                assert e.value.errno == errno.EIO
                assert e.value.ioctl == "KVM_RESET_DIRTY_RINGS"
        finally:
            monkeypatch.undo()
        assert injected.calls == failures
        only_first = set(_written(w).tolist())
        for i in running:
            _set_max_writes(w, i, 600)
            assert isinstance(w.run_vcpu(i), Hlt)
        assert w.total_writes() == 600 + 300 * len(running)
        words = w.mem.page_words()
        assert (words == 1).any()  # pages only the first run wrote: only a hand-back has them
        d = w.vm.collect_dirty_pages(final=True)
        assert set(d.pages) == {MEM_SLOT}
        assert np.array_equal(d.pages[MEM_SLOT], _written(w))
        assert only_first <= set(d.pages[MEM_SLOT].tolist())
        assert d.entries == w.total_writes()  # one entry per write: none lost, none twice
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


# --------------------------------------------------------------------------------------------
# 4. A vCPU closed on its own while another owner holds its ring


def _two_vcpus(kvm: Kvm, running: bool) -> Workload:
    """Two vCPUs in separate halves of the tracked slot (so each page tells which vCPU wrote
    it), writing generation 1.  vCPU 0 stops after 500 writes; vCPU 1 after 1000 writes (its
    ring then holds 1000 entries, below its soft limit), or never when it is to be closed
    while running."""
    w = Workload(kvm, mem_size=64 << 20, vcpus=2, shared=False, ring_entries=4096,
                 order="random", value="generation")
    w.generation = 1
    _set_max_writes(w, 0, 500)
    _set_max_writes(w, 1, 0 if running else 1000)
    return w


def _vcpu1_pages(w: Workload, pages: set[int]) -> set[int]:
    per = w.params[0].pages
    return {p for p in pages if per <= p < 2 * per}


def _run_in_thread(w: Workload, i: int, on_ring_full: Any,
                   errors: list[BaseException]) -> threading.Thread:
    def body() -> None:
        try:
            w.run_vcpu(i, threading.Event(), on_ring_full=on_ring_full)
        except KvmClosedError:
            if i != 1:
                raise
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_closing_a_vcpu_whose_ring_another_thread_owns(kvm: Kvm, running: bool) -> None:
    """A harvester thread owns vCPU 1's ring (``take_dirty_ring``) and harvests it at random
    limits, resetting only sometimes; vCPU 1 is closed on its own (``vcpu.close()``), halted or
    while inside KVM_RUN.  What the ring still held (unharvested entries, entries its
    ring-full drains kept, a harvested count not reset yet) goes to the next
    ``collect_dirty_pages``: with the owner's harvests it covers exactly the pages the guest
    wrote, and the reset count matches.  The owner's next harvest raises KvmClosedError."""
    rng = random.Random(4)
    with _two_vcpus(kvm, running) as w:
        v1 = w.vcpus[1]
        ring1 = v1.take_dirty_ring()
        owned: set[int] = set()
        errors: list[BaseException] = []
        go, pause, paused, closed = (threading.Event() for _ in range(4))
        after_close: list[BaseException] = []

        def owner() -> None:
            try:
                go.wait()
                # Halted, vCPU 1 left 1000 entries: the owner takes 400 to 499 of them, then
                # 100 more that it does not reset, and leaves the rest in the ring.
                while not pause.is_set() and (running or ring1.harvested_total < 400):
                    got = ring1.harvest(limit=rng.randint(1, 512 if running else 100))
                    owned.update(got.offsets.tolist())
                    if rng.random() < 0.5:
                        w.vm.reset_dirty_rings()
                got = ring1.harvest(limit=100)  # harvested, not reset: pending at the close
                owned.update(got.offsets.tolist())
                paused.set()
                closed.wait(60)
                try:
                    ring1.harvest()
                except BaseException as e:
                    after_close.append(e)
            except BaseException as e:
                errors.append(e)
                paused.set()

        ot = threading.Thread(target=owner, daemon=True)
        ot.start()
        try:
            _close_while_owned(w, running, ot, owned, errors, after_close,
                               (go, pause, paused, closed))
        finally:  # never leave the owner waiting
            go.set()
            pause.set()
            closed.set()
            ot.join(30)


def _close_while_owned(w: Workload, running: bool, ot: threading.Thread, owned: set[int],
                       errors: list[BaseException], after_close: list[BaseException],
                       events: tuple[threading.Event, ...]) -> None:
    go, pause, paused, closed = events
    v1 = w.vcpus[1]
    ring1 = v1.ring
    assert ring1 is not None and ring1.taken
    assert isinstance(w.run_vcpu(0), Hlt) and w.writes(0) == 500
    if running:
        # vCPU 1 writes on and on; its ring-full exits drain its ring (the entries stay
        # with the ring for its owner).
        t1 = _run_in_thread(w, 1, None, errors)
        go.set()
        wait_until(lambda: w.writes(1) > 2 * 4096 or bool(errors), what="vCPU 1 to write")
        pause.set()
        paused.wait(30)
        # Unharvested entries in the ring now, by construction: vCPU 1 writes on and only
        # its own ring-full drains take any.
        wait_until(lambda: ring1.count_dirty() > 0 or bool(errors), what="new entries")
        assert v1.running
        held = ring1.count_dirty()  # at least this many at the close (vCPU 1 writes on)
    else:
        assert isinstance(w.run_vcpu(1), Hlt) and w.writes(1) == 1000
        go.set()
        paused.wait(30)
        held = ring1.count_dirty()
        assert held == 1000 - ring1.harvested_total > 0  # what the owner left in the ring
    assert not errors, errors
    held_pending = ring1.pending_reset
    v1.close()
    if running:
        t1.join(30)
        assert not t1.is_alive()
    assert not errors, errors
    d = w.vm.collect_dirty_pages(final=True)  # a reset mismatch would raise here
    got = set(d.pages.get(MEM_SLOT, np.zeros(0, dtype=np.uint64)).tolist())
    written = set(_written(w).tolist())
    assert owned | got == written
    # The entries vCPU 1's ring held were reported: the collection took vCPU 0's 500 entries
    # from its ring, and the rest from what the closed ring left.
    assert 1 not in d.per_vcpu and len(d.per_vcpu[0]) > 0
    if running:
        assert d.entries - 500 >= held
    else:
        assert d.entries - 500 == held
    if not running:
        # Harvested by the owner but not reset when the vCPU closed: the ring set took the
        # count over (else the reset check above would have raised).
        assert held_pending > 0
    closed.set()
    ot.join(30)
    assert not errors, errors
    assert len(after_close) == 1 and isinstance(after_close[0], KvmClosedError)
    assert "closed" in str(after_close[0])
    assert w.vm.collect_dirty_pages().count == 0  # in step: nothing is reported twice


@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_closing_a_vcpu_whose_ring_the_tracker_owns(kvm: Kvm, running: bool) -> None:
    """A DirtyTracker owns both rings; vCPU 1 is closed on its own, halted with 1000 entries in
    its ring (the worker asleep, so they are there by construction), or while it runs with the
    worker harvesting every millisecond and ring-full exits passed to ``on_ring_full``.  The
    tracker goes on without an error, the next take reports the closed vCPU's entries (with
    the earlier takes: exactly the pages written), and a harvest of the closed ring raises
    KvmClosedError."""
    with _two_vcpus(kvm, running) as w:
        v1 = w.vcpus[1]
        tracker = DirtyTracker(w.vm, "ring", interval=0.001 if running else NO_WORKER)
        tracker.start()
        errors: list[BaseException] = []
        reported: set[int] = set()
        try:
            assert isinstance(w.run_vcpu(0, on_ring_full=tracker.on_ring_full), Hlt)
            if running:
                t1 = _run_in_thread(w, 1, tracker.on_ring_full, errors)
                for _ in range(3):
                    n = w.writes(1)
                    wait_until(lambda: w.writes(1) > n + 2000 or bool(errors),  # noqa: B023
                               what="vCPU 1 to write")
                    reported |= _pages_of(tracker.take(), w)
                wait_until(lambda: v1.running or bool(errors), what="vCPU 1 inside run()")
            else:
                assert isinstance(w.run_vcpu(1, on_ring_full=tracker.on_ring_full), Hlt)
                assert w.writes(1) == 1000
                assert v1.ring is not None and v1.ring.count_dirty() == 1000
            v1.close()
            if running:
                t1.join(30)
                assert not t1.is_alive()
            assert not errors, errors
            last = tracker.take(final=True)
            assert last.wholly_dirty == frozenset()
            new = _pages_of(last, w)
            reported |= new
            assert reported == set(_written(w).tolist())
            if not running:
                assert len(_vcpu1_pages(w, new)) == len(_vcpu1_pages(w, reported))
            assert tracker.take().pages == 0
            assert tracker.error is None
            ring1 = v1.ring
            assert ring1 is not None and ring1.closed
            with pytest.raises(KvmClosedError, match="dirty ring of vCPU 1 is closed"):
                ring1.harvest()
        finally:
            tracker.close()
        assert tracker.error is None
