"""The vCPU file descriptor: :class:`Vcpu` (run loop, registers, kick)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Mapping as MappingType
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from kvmio import _abi, _check
from kvmio._abi import IS_X86, FdOwner, IoctlBatch, Mapping, ffi, lib
from kvmio.errors import (
    DirtyRingOverrunError,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
    from_errno,
)
from kvmio.exits import (
    DirtyRingFull,
    ExitReason,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    VcpuExit,
    stale_answer,
)
from kvmio.x86 import CpuidEntry, Regs, Sregs, cpuid_entries

if TYPE_CHECKING:
    from kvmio.dirty.ring import DirtyRing
    from kvmio.dirty.ringset import RingSet

#: Ring-full exits in a row with nothing to harvest before kvmio declares the ring overrun.
RING_FULL_STUCK_LIMIT = 3

#: The parts of a vCPU's state (x86) that :meth:`Vcpu.get_state` reads and
#: :meth:`Vcpu.prepare_state` / :meth:`Vcpu.set_state` write: part -> (GET ioctl, SET ioctl,
#: C type of the argument, or ``None`` where its size varies).  ``xsave`` is read with
#: KVM_GET_XSAVE2 where the kernel offers KVM_CAP_XSAVE2.
STATE_PARTS: dict[str, tuple[str, str, str | None]] = {
    "mp_state": ("KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "struct kvm_mp_state"),
    "vcpu_events": ("KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events"),
    "regs": ("KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs"),
    "sregs": ("KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs"),
    "fpu": ("KVM_GET_FPU", "KVM_SET_FPU", "struct kvm_fpu"),
    "xsave": ("KVM_GET_XSAVE", "KVM_SET_XSAVE", None),
    "xcrs": ("KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs"),
    "lapic": ("KVM_GET_LAPIC", "KVM_SET_LAPIC", "struct kvm_lapic_state"),
    "debugregs": ("KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
    "msrs": ("KVM_GET_MSRS", "KVM_SET_MSRS", None),
    "cpuid": ("KVM_GET_CPUID2", "KVM_SET_CPUID2", None),
}
#: Bytes of the legacy ``struct kvm_xsave`` (the least KVM_CAP_XSAVE2 ever reports).
XSAVE_LEGACY_SIZE = 4096
#: The most CPUID entries a vCPU can have (the kernel's KVM_MAX_CPUID_ENTRIES).
MAX_CPUID_ENTRIES = 256


# vCPUs inside run(), for kick_running(): weak, so that a dropped vCPU is never kept alive.
_RUNNING: weakref.WeakSet[Vcpu] = weakref.WeakSet()
_RUNNING_LOCK = threading.Lock()


#: The longest ``max_time`` of :meth:`Vcpu.run` (seconds: a day).
MAX_RUN_TIME = 86400.0


def kick_running(thread: int | None = None) -> int:
    """Kick every vCPU that is inside :meth:`Vcpu.run` now (only those running in ``thread``,
    a ``threading.get_ident()``, if given); returns how many.  For a signal helper thread: a
    Ctrl-C that the kernel delivered to another thread leaves a vCPU in KVM_RUN until the
    guest exits, which a guest busy faulting in gigabytes of memory may not do for seconds."""
    with _RUNNING_LOCK:
        vcpus = list(_RUNNING)
    n = 0
    for v in vcpus:
        if thread is None or v.running_thread == thread:
            with contextlib.suppress(KvmClosedError):
                v.kick()
                n += 1
    return n


class Vcpu(FdOwner):
    """A virtual CPU (from :meth:`kvmio.Vm.create_vcpu`).

    :meth:`run` enters the guest and returns a decoded exit.  :meth:`kick` (from any thread)
    makes a ``run`` in progress return :class:`~kvmio.exits.Interrupted` promptly.  A vCPU
    knows nothing of its VM: the VM hands it the ring set (to map its ring) and a callable to
    run when it closes, and the XSAVE size its VM reported (``KVM_CAP_XSAVE2``; ``None``
    where the kernel lacks it: then the legacy 4 KiB KVM_GET_XSAVE is used).
    """

    _what = "Vcpu"

    def __init__(self, vcpu_id: int, fd: int, run: Mapping, *, ring_set: RingSet | None = None,
                 on_close: Callable[[int], None] | None = None, xsave_size: int | None = None):
        super().__init__(fd)
        self.id = vcpu_id
        self._run = _abi.KvmRun(run)
        self._on_close = on_close
        self._exit_gen = 0
        self._kicks = 0  # kicks made (a bounded run's late timer is told from them)
        # Guards the identity of the thread inside KVM_RUN, so that kick() never signals a
        # thread that has left run() (or exited).
        self._run_lock = threading.Lock()
        self._outside = threading.Condition(self._run_lock)  # signalled when a hold ends
        self._running_thread: int | None = None
        self._in_run = False
        self._holds = 0  # outside_run() blocks in progress
        # Whether the last exit's operation completes only at the next KVM_RUN (I/O, MMIO).
        self._exit_pending = False
        self._xsave2 = xsave_size is not None
        self._xsave_size = xsave_size if xsave_size is not None else XSAVE_LEGACY_SIZE
        # Encodings (encode_cpuid) known to equal the CPUID installed now: what kvmio set last,
        # and what KVM_GET_CPUID2 returned since.  Restores skip KVM_SET_CPUID2 for these.
        self._cpuid_known: frozenset[bytes] = frozenset()
        self._state_lock = threading.Lock()
        # Read batches by (parts, MSR indices): a capture reads two (the state, the MSRs).
        self._get_batches: dict[tuple[tuple[str, ...], tuple[int, ...]], IoctlBatch] = {}
        self._ring: DirtyRing | None = None
        if ring_set is not None:
            try:
                self._ring = ring_set.map_ring(vcpu_id, fd, outside_run=self.outside_run)
            except BaseException:
                self._fd = None  # the caller closes the fd and kvm_run; the finaliser must not
                raise

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {'closed' if self.closed else f'fd={self._fd}'}>"

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop a ``run()`` in progress in another thread (kick it and wait for it to return),
        then unmap the ring and ``kvm_run`` and close the fd (idempotent).  That thread's next
        ``run()`` raises :class:`KvmClosedError`."""

        def unmap() -> None:
            # The ring first, without the run lock: a tracker holds the ring set's lock while
            # it takes this vCPU's run lock (to hold it outside KVM_RUN).  No run() is in
            # flight any more (the fd is closing).
            if self._ring is not None:
                self._ring.close()
            with self._run_lock:
                self._run.close()

        if self._close_fd(wake=self._wake, before_close=unmap) and self._on_close is not None:
            self._on_close(self.id)

    def _wake(self) -> None:
        with self._run_lock:
            self._kicks += 1
            if self._running_thread is not None:
                self._run.immediate_exit = True
                signal.pthread_kill(self._running_thread, _abi.kick_signal())

    @property
    def running(self) -> bool:
        """Whether a thread is inside :meth:`run` now."""
        return self._in_run

    @property
    def running_thread(self) -> int | None:
        """The ``threading.get_ident()`` of the thread inside KVM_RUN now, if any."""
        return self._running_thread

    def outside_run(self) -> AbstractContextManager[None]:
        """Hold the vCPU outside ``run()``: raises :class:`KvmStateError` if a thread is in it
        now, and makes ``run()`` wait until the block ends (ring repairs need this).  Holds
        nest and may overlap (from any threads): ``run()`` waits for the last to end."""
        return _Hold(self)

    # -- running ----------------------------------------------------------------------------

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: when set, the next KVM_RUN returns at once (EINTR)."""
        with self._run_lock:
            return self._run.immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        with self._run_lock:
            self._run.immediate_exit = value
            if value:
                self._kicks += 1

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN; safe from any thread while the vCPU is open.

        Sets ``immediate_exit`` and signals the thread inside KVM_RUN, if any.  A kick is never
        lost: if no ``run()`` is in KVM_RUN now, the next ``run()`` returns
        :class:`~kvmio.exits.Interrupted` at once.  Each ``run()`` that returns ``Interrupted``
        consumes all kicks made before it.  Raises :class:`KvmClosedError` once closed.  Do
        not call it from a Python signal handler running on the vCPU's own thread (the handler
        may run while that thread holds the vCPU's lock); kick from another thread instead.
        """
        with self._run_lock:
            self._run.immediate_exit = True
            self._kicks += 1
            if self._running_thread is not None:
                signal.pthread_kill(self._running_thread, _abi.kick_signal())

    def run(self, max_time: float | None = None) -> VcpuExit:
        """KVM_RUN: run the guest until it exits to userspace, and decode the exit.

        ``max_time``: the run lasts at most that many seconds: a kernel timer of the calling
        thread kicks it then (precise to tens of microseconds, whatever Python's other
        threads do), and it returns :class:`~kvmio.exits.Interrupted` like any kick.

        I/O-in and MMIO-read exits carry an ``answer()`` method that writes the value the guest
        reads back into ``kvm_run``; it must be called before the next ``run()``.  The vCPU
        counts as running until the exit is decoded, so ``close()`` cannot unmap ``kvm_run``
        under it.  Raises :class:`KvmClosedError` once the vCPU is closed (or closing).
        """
        if max_time is not None:
            max_time = _check.positive_float("max_time", max_time, hi=MAX_RUN_TIME)
        _abi.kick_signal()  # install the kick handler before the first KVM_RUN
        entered = False
        try:
            with self._run_lock:
                if self._in_run:
                    raise KvmStateError(f"vCPU {self.id} is already running in another thread")
                while self._holds:  # its ring is being repaired: a short wait
                    self._outside.wait()
                if self._in_run:
                    raise KvmStateError(f"vCPU {self.id} is already running in another thread")
                fd = self._acquire_fd()
                # One statement with no call in it: an asynchronous exception (Ctrl-C raised
                # between two bytecodes) cannot come between setting the flag and noting that
                # this call set it, so the finally below always undoes what was done.  (Only
                # the fd hold can leak, right after it is taken, and a leaked hold of the
                # thread that closes the vCPU does not hold up close().)
                self._in_run = entered = True
                kicks = self._kicks
                self._running_thread = threading.get_ident()
                self._exit_gen += 1
                with _RUNNING_LOCK:
                    _RUNNING.add(self)
            if self._ring is not None:
                # Where the ring stood, for telling a stuck ring at a ring-full exit (after
                # _in_run is set, so no other run() can overwrite it; not under the run lock,
                # which a tracker takes while holding the ring set's lock).
                self._ring.before_run()
            spare = False
            if max_time is None:
                r = _abi.ioctl_eintr(fd, lib.KVM_RUN, name="KVM_RUN")
            else:  # kvm_run stays mapped: close() waits for this run (_in_run) to end
                r, spare = _abi.run_bounded(fd, self._run, max_time)
            with self._run_lock:
                self._running_thread = None
                if spare and r is not None and self._kicks == kicks:
                    # The bound's timer fired as the run ended with an exit: its kick is not
                    # one anybody made, and must not cut the next run short.
                    self._run.immediate_exit = False
                if r is None:
                    # Consume the kicks that led here; later ones stay pending.  KVM completes
                    # a pending operation before it looks at immediate_exit and signals.
                    self._run.immediate_exit = False
                    self._exit_pending = False
                    return Interrupted()
                self._exit_pending = True  # until the exit is known to need no completion
            ex = self._decode(self._run)
            self._exit_pending = isinstance(ex, IoOut | IoIn | MmioRead | MmioWrite | Unknown)
            return ex
        finally:
            if entered:
                with _RUNNING_LOCK:
                    _RUNNING.discard(self)
                with self._run_lock:
                    self._running_thread = None
                    self._in_run = False
                self._release_fd()

    def _decode(self, run: _abi.KvmRun) -> VcpuExit:
        reason, f = run.decode()
        gen = self._exit_gen
        if reason == ExitReason.IO:
            if f["out"]:
                return IoOut(f["port"], f["size"], f["count"], f["data"])
            n, offset = f["size"] * f["count"], f["offset"]

            def answer_io(data: bytes) -> None:
                with self._run_lock:
                    self._check_gen(gen)
                    self._run.write(offset, data[:n])

            return IoIn(answer_io, f["port"], f["size"], f["count"])
        if reason == ExitReason.MMIO:
            if f["write"]:
                return MmioWrite(f["address"], f["data"])

            def answer_mmio(data: bytes) -> None:
                with self._run_lock:
                    self._check_gen(gen)
                    self._run.write_mmio_data(data)

            return MmioRead(answer_mmio, f["address"], f["length"])
        if reason == ExitReason.HLT:
            return Hlt()
        if reason == ExitReason.SHUTDOWN:
            return Shutdown()
        if reason == ExitReason.DIRTY_RING_FULL:
            return DirtyRingFull()
        if reason == ExitReason.INTR:
            return Interrupted()
        if reason == ExitReason.FAIL_ENTRY:
            return FailEntry(f["reason"], f["cpu"])
        if reason == ExitReason.INTERNAL_ERROR:
            return InternalError(f["suberror"], f["data"])
        if reason == ExitReason.SYSTEM_EVENT:
            return SystemEvent(f["type"], f["data"])
        return Unknown(reason, f["hardware_exit_reason"])

    def _check_gen(self, gen: int) -> None:
        if gen != self._exit_gen:
            stale_answer(b"")

    @property
    def exit_pending(self) -> bool:
        """Whether the last exit's operation is still incomplete: after an I/O or MMIO exit
        (or one kvmio does not know), KVM finishes the instruction only at the next KVM_RUN,
        and until then the vCPU's registers are not consistent (Documentation/virt/kvm/
        api.rst on ``kvm_run``: "the corresponding operations are complete (and guest state is
        consistent) only after userspace has re-entered the kernel with KVM_RUN").  A state
        read now would be wrong; see :meth:`complete_pending_exit`."""
        return self._exit_pending

    def complete_pending_exit(self, on_exit: Callable[[VcpuExit], None] | None = None, *,
                              max_exits: int = 1 << 16) -> int:
        """Finish the operation of the last exit without running the guest further: re-enter
        KVM_RUN with ``immediate_exit`` set, which completes it and returns at once.

        Answer an :class:`~kvmio.exits.IoIn` or :class:`~kvmio.exits.MmioRead` first: the
        completion stores the answer in the guest's register.  A string instruction (``rep
        ins``/``outs``) exits again for its next item: each such exit goes to ``on_exit``
        (which must answer reads), and completion goes on; without ``on_exit`` it raises
        :class:`KvmStateError`, and more than ``max_exits`` raise too.  Returns how many exits
        went to ``on_exit``; does nothing when no exit is pending (:attr:`exit_pending`).
        """
        max_exits = _check.integer("max_exits", max_exits, lo=1)
        handled = 0
        while self._exit_pending:
            self.immediate_exit = True
            ex = self.run()
            if isinstance(ex, Interrupted):
                break
            # Keep a later run() from returning Interrupted at once.
            self.immediate_exit = False
            if on_exit is None:
                raise KvmStateError(
                    f"completing vCPU {self.id}'s exit led to another exit ({ex!r}, the next "
                    "item of a string instruction); handle it and complete again, or pass "
                    "on_exit")
            if handled >= max_exits:
                raise KvmStateError(f"vCPU {self.id} still exits after {max_exits} exits "
                                    "while its operation was completed")
            on_exit(ex)
            handled += 1
        return handled

    # -- dirty ring -------------------------------------------------------------------------

    @property
    def ring(self) -> DirtyRing | None:
        """The vCPU's ring whoever owns it (``None`` without a ring): for inspection and for
        serving ring-full exits (:meth:`~kvmio.dirty.ring.DirtyRing.drain`).  Harvest it
        through its owner (:attr:`dirty_ring` while the vCPU owns it)."""
        return self._ring

    @property
    def dirty_ring(self) -> DirtyRing:
        """This vCPU's dirty ring while the vCPU still owns it (see :meth:`take_dirty_ring`)."""
        if self._ring is None:
            raise KvmStateError(f"vCPU {self.id} has no dirty ring (enable it on the VM before "
                                "creating vCPUs)")
        if self._ring.taken:
            raise KvmStateError(f"the dirty ring of vCPU {self.id} was handed to a harvester")
        return self._ring

    def take_dirty_ring(self) -> DirtyRing:
        """Hand this vCPU's ring to a harvester (e.g. another thread), once.

        After this the vCPU, :attr:`dirty_ring` and :meth:`kvmio.Vm.collect_dirty_pages` no
        longer harvest it; a second call raises :class:`KvmStateError` until the owner calls
        :meth:`~kvmio.dirty.ring.DirtyRing.release`.
        """
        return self.dirty_ring.take()

    def run_until_exit(self, *, max_stuck: int = RING_FULL_STUCK_LIMIT) -> VcpuExit:
        """Run, handling KVM_EXIT_DIRTY_RING_FULL: drain this vCPU's ring, reset, re-enter.

        Returns the first other exit.  The drained entries are kept by the ring (its owner's
        next :meth:`~kvmio.dirty.ring.DirtyRing.harvest`, or
        :meth:`kvmio.Vm.collect_dirty_pages`, returns them first), so nothing is lost, whoever
        owns the ring.  A ring-full exit with nothing to harvest ``max_stuck`` times in a row
        means the ring was overrun (entries overwritten) and raises
        :class:`DirtyRingOverrunError`; so does a harvest that finds the ring overrun.
        """
        max_stuck = _check.integer("max_stuck", max_stuck, lo=1)
        stuck = 0
        while True:
            ex = self.run()
            if not isinstance(ex, DirtyRingFull):
                return ex
            if self._ring is None:
                return ex
            got = self._ring.drain()
            stuck = stuck + 1 if got == 0 else 0
            if stuck >= max_stuck:
                raise DirtyRingOverrunError(
                    f"vCPU {self.id} keeps exiting with a full dirty ring but nothing to harvest: "
                    "the ring was overrun and dirty pages were lost; treat the tracked slots as "
                    "wholly dirty, and use a bigger ring, a lower write density, or bitmap mode",
                    vcpu=self.id)

    # -- registers --------------------------------------------------------------------------

    def _get(self, ctype: str, req: str) -> Any:
        buf = ffi.new(ctype + " *")
        self._ioctl(getattr(lib, req), buf, name=req)
        return buf

    def _x86(self, what: str) -> None:
        if not IS_X86:
            raise KvmUnsupportedError(f"{what} exists only on x86_64")

    def get_regs(self) -> Regs:
        """KVM_GET_REGS."""
        self._x86("KVM_GET_REGS as Regs")
        return Regs.from_c(self._get("struct kvm_regs", "KVM_GET_REGS"))

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS.  Every register must be a u64."""
        self._x86("KVM_SET_REGS as Regs")
        _check.instance("regs", regs, Regs)
        regs.validate()
        self._ioctl(lib.KVM_SET_REGS, regs.to_c(), name="KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS."""
        self._x86("KVM_GET_SREGS as Sregs")
        return Sregs.from_c(self._get("struct kvm_sregs", "KVM_GET_SREGS"))

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS."""
        self._x86("KVM_SET_SREGS as Sregs")
        _check.instance("sregs", sregs, Sregs)
        self._ioctl(lib.KVM_SET_SREGS, sregs.to_c(), name="KVM_SET_SREGS")

    def _get_raw(self, ctype: str, req: str) -> bytes:
        self._x86(req)
        return _abi.to_bytes(self._get(ctype, req), ctype)

    def _set_raw(self, ctype: str, req: str, data: bytes) -> None:
        self._x86(req)
        raw = bytes(_check.buffer_bytes("data", data))
        self._ioctl(getattr(lib, req), _abi.from_bytes(ctype, raw), name=req)

    def get_fpu(self) -> bytes:
        """KVM_GET_FPU: the raw ``struct kvm_fpu``."""
        return self._get_raw("struct kvm_fpu", "KVM_GET_FPU")

    def set_fpu(self, data: bytes) -> None:
        """KVM_SET_FPU from a raw ``struct kvm_fpu``."""
        self._set_raw("struct kvm_fpu", "KVM_SET_FPU", data)

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the 1 KiB local APIC register page (needs an in-kernel irqchip)."""
        return self._get_raw("struct kvm_lapic_state", "KVM_GET_LAPIC")

    def set_lapic(self, data: bytes) -> None:
        """KVM_SET_LAPIC."""
        self._set_raw("struct kvm_lapic_state", "KVM_SET_LAPIC", data)

    @property
    def xsave_size(self) -> int:
        """Bytes of this vCPU's XSAVE area: what ``KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`` said
        when it was created, or 4096 (the legacy ``struct kvm_xsave``) without that
        capability."""
        return self._xsave_size

    def get_xsave(self) -> bytes:
        """The raw XSAVE area, :attr:`xsave_size` bytes: KVM_GET_XSAVE2 where the kernel
        offers KVM_CAP_XSAVE2, else KVM_GET_XSAVE (4 KiB)."""
        self._x86("KVM_GET_XSAVE")
        buf = self._xsave_buffer()
        req = "KVM_GET_XSAVE2" if self._xsave2 else "KVM_GET_XSAVE"
        self._ioctl(getattr(lib, req), buf, name=req)
        return bytes(ffi.buffer(buf, self._xsave_size))

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE from :attr:`xsave_size` bytes (the kernel reads that many: any other
        length raises :class:`KvmInvalidArgumentError`)."""
        self._x86("KVM_SET_XSAVE")
        raw = bytes(_check.buffer_bytes("data", data))
        if len(raw) != self._xsave_size:
            raise KvmInvalidArgumentError(
                f"the XSAVE area of vCPU {self.id} is {self._xsave_size} bytes, not {len(raw)}")
        self._ioctl(lib.KVM_SET_XSAVE, ffi.new("char[]", raw), name="KVM_SET_XSAVE")

    def _xsave_buffer(self) -> Any:
        # Safety: sized as KVM_CAP_XSAVE2 said, the most KVM_GET_XSAVE2 writes.
        if self._xsave2:
            return ffi.new("char[]", self._xsave_size)
        return ffi.new("struct kvm_xsave *")

    def get_vcpu_events(self) -> bytes:
        """KVM_GET_VCPU_EVENTS: pending exceptions/interrupts/NMIs, raw."""
        return self._get_raw("struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, data: bytes) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._set_raw("struct kvm_vcpu_events", "KVM_SET_VCPU_EVENTS", data)

    def get_debugregs(self) -> bytes:
        """KVM_GET_DEBUGREGS, raw ``struct kvm_debugregs``."""
        return self._get_raw("struct kvm_debugregs", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, data: bytes) -> None:
        """KVM_SET_DEBUGREGS."""
        self._set_raw("struct kvm_debugregs", "KVM_SET_DEBUGREGS", data)

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS: extended control registers by index (XCR0 = 0)."""
        self._x86("KVM_GET_XCRS")
        x = self._get("struct kvm_xcrs", "KVM_GET_XCRS")
        return {int(x.xcrs[i].xcr): int(x.xcrs[i].value) for i in range(x.nr_xcrs)}

    def set_xcrs(self, xcrs: dict[int, int]) -> None:
        """KVM_SET_XCRS."""
        self._x86("KVM_SET_XCRS")
        _check.instance("xcrs", xcrs, dict)
        x = _abi.from_bytes("struct kvm_xcrs", encode_xcrs(xcrs))
        self._ioctl(lib.KVM_SET_XCRS, x, name="KVM_SET_XCRS")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (``KVM_MP_STATE_*``)."""
        return int(self._get("struct kvm_mp_state", "KVM_GET_MP_STATE").mp_state)

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        mp = ffi.new("struct kvm_mp_state *")
        mp.mp_state = _check.u32("state", state)
        self._ioctl(lib.KVM_SET_MP_STATE, mp, name="KVM_SET_MP_STATE")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the values of the given MSRs.  Raises if the kernel reads fewer."""
        self._x86("KVM_GET_MSRS")
        indices = [_check.u32("MSR index", i) for i in _check.sequence("indices", indices)]
        m = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        m.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        n = self._ioctl(lib.KVM_GET_MSRS, m, name="KVM_GET_MSRS")
        if n != len(indices):
            raise KvmError(f"MSR {indices[n]:#x} cannot be read (the kernel read {n} of "
                           f"{len(indices)})", ioctl="KVM_GET_MSRS")
        return {int(m.entries[i].index): int(m.entries[i].data) for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS.  Raises naming the first MSR the kernel refused."""
        self._x86("KVM_SET_MSRS")
        _check.instance("values", values, dict)
        items = [(_check.u32("MSR index", k), _check.u64(f"MSR {k!r} value", v))
                 for k, v in values.items()]
        m = ffi.new("struct kvm_msrs *", {"entries": len(items)})
        m.nmsrs = len(items)
        for i, (idx, val) in enumerate(items):
            m.entries[i].index = idx
            m.entries[i].data = val
        n = self._ioctl(lib.KVM_SET_MSRS, m, name="KVM_SET_MSRS")
        if n != len(items):
            raise KvmError(f"MSR {items[n][0]:#x} cannot be set to {items[n][1]:#x} (the kernel "
                           f"set {n} of {len(items)})", ioctl="KVM_SET_MSRS")

    def readable_msrs(self, indices: Sequence[int]) -> list[int]:
        """The MSRs of ``indices`` (in their order) that KVM_GET_MSRS reads for this vCPU.

        KVM_GET_MSR_INDEX_LIST names MSRs that a given vCPU may still refuse (features its
        CPUID lacks, an APIC it does not have); the kernel stops at the first MSR it refuses,
        so this takes one KVM_GET_MSRS plus one per refused MSR (each reading only the rest).
        """
        self._x86("KVM_GET_MSRS")
        rest = [_check.u32("MSR index", i) for i in _check.sequence("indices", indices)]
        readable: list[int] = []
        while rest:
            m = ffi.new("struct kvm_msrs *", {"entries": len(rest)})
            m.nmsrs = len(rest)
            for i, idx in enumerate(rest):
                m.entries[i].index = idx
            n = self._ioctl(lib.KVM_GET_MSRS, m, name="KVM_GET_MSRS")
            readable += rest[:n]
            rest = rest[n + 1:]
        return readable

    def writable_msrs(self, values: Sequence[tuple[int, int]]) -> list[int]:
        """The MSRs of ``(index, value)`` pairs that KVM_SET_MSRS accepts for this vCPU, found
        by writing them in order (one KVM_SET_MSRS, plus one per refused MSR, each writing
        only the rest).  It writes: pass values just read, so that nothing changes.  Some
        kernels read an MSR they then refuse to have written back (this project's CI host:
        MSR_KVM_POLL_CONTROL reads 0 and takes no value)."""
        self._x86("KVM_SET_MSRS")
        rest = [(_check.u32("MSR index", i), _check.u64(f"MSR {i!r} value", v))
                for i, v in _check.sequence("values", values)]
        writable: list[int] = []
        while rest:
            m = ffi.new("struct kvm_msrs *", {"entries": len(rest)})
            m.nmsrs = len(rest)
            for k, (idx, val) in enumerate(rest):
                m.entries[k].index = idx
                m.entries[k].data = val
            n = self._ioctl(lib.KVM_SET_MSRS, m, name="KVM_SET_MSRS")
            writable += [i for i, _ in rest[:n]]
            rest = rest[n + 1:]
        return writable

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: the CPUID the guest sees (usually from ``get_supported_cpuid``).
        After the vCPU first ran, KVM refuses (EBUSY) any CPUID but the one it has."""
        self._x86("KVM_SET_CPUID2")
        raw = encode_cpuid(_check.sequence("entries", entries))
        try:
            self._ioctl(lib.KVM_SET_CPUID2, ffi.new("char[]", raw), name="KVM_SET_CPUID2")
        except BaseException:
            # The kernel does not promise the old CPUID survives a failed call.
            self._cpuid_known = frozenset()
            raise
        self._cpuid_known = frozenset((raw,))

    def get_cpuid2(self, max_entries: int = MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID entries set on this vCPU."""
        self._x86("KVM_GET_CPUID2")
        max_entries = _check.integer("max_entries", max_entries, lo=1, hi=1 << 16)
        buf = ffi.new("struct kvm_cpuid2 *", {"entries": max_entries})
        buf.nent = max_entries
        self._ioctl(lib.KVM_GET_CPUID2, buf, name="KVM_GET_CPUID2")
        got = cpuid_entries(buf)
        self._know_cpuid(encode_cpuid(got))
        return got

    # -- the whole state, one native call each way ------------------------------------------

    def get_state(self, parts: Sequence[str], *, msr_indices: Sequence[int] = ()
                  ) -> dict[str, bytes]:
        """Read the given :data:`STATE_PARTS` of this vCPU, in the order given, in one native
        call (x86); returns each part's raw kernel struct (``msrs`` and ``cpuid`` with their
        entries, ``xsave`` :attr:`xsave_size` bytes).  ``msrs`` reads ``msr_indices``, which
        must all be readable (see :meth:`readable_msrs`).  Reading stops at the first ioctl
        that fails, which raises naming it."""
        self._x86("reading the vCPU state")
        parts = tuple(_check.sequence("parts", parts))
        msrs = tuple(_check.sequence("msr_indices", msr_indices))
        key = (parts, msrs)
        with self._state_lock:
            batch = self._get_batches.get(key)
            if batch is None:  # checked only when built: a state is often read many times
                batch = self._build_get_batch(parts, tuple(_check.u32("MSR index", i)
                                                           for i in msrs))
                if len(self._get_batches) >= 4:
                    self._get_batches.clear()
                self._get_batches[key] = batch
            if "cpuid" in parts:
                batch.arg(parts.index("cpuid")).nent = MAX_CPUID_ENTRIES  # the kernel sets it
            done, result = self._run_batch(batch)
            if done < len(batch):
                raise _batch_error(batch, done, result)
            out: dict[str, bytes] = {}
            for k, part in enumerate(parts):
                out[part] = _read_part(part, batch.arg(k), self._xsave_size)
        if "cpuid" in out:
            self._know_cpuid(out["cpuid"])
        return out

    def _know_cpuid(self, raw: bytes) -> None:
        """Note an encoding of the installed CPUID (KVM updates a few bits as the guest runs,
        so one CPUID reads back in a few ways; a handful is kept)."""
        known = self._cpuid_known
        self._cpuid_known = known | {raw} if len(known) < 8 else frozenset((raw,))

    def _build_get_batch(self, parts: tuple[str, ...], msrs: tuple[int, ...]) -> IoctlBatch:
        entries: list[tuple[str, Any, int]] = []
        for part in parts:
            if part not in STATE_PARTS:
                raise KvmInvalidArgumentError(f"no vCPU state part {part!r}; choose from "
                                              f"{', '.join(STATE_PARTS)}")
            get, _, ctype = STATE_PARTS[part]
            if part == "xsave":
                entries.append(("KVM_GET_XSAVE2" if self._xsave2 else get, self._xsave_buffer(),
                                -1))
            elif part == "msrs":
                m = ffi.new("struct kvm_msrs *", {"entries": len(msrs)})
                m.nmsrs = len(msrs)
                for i, idx in enumerate(msrs):
                    m.entries[i].index = idx
                entries.append((get, m, len(msrs)))
            elif part == "cpuid":
                entries.append((get, ffi.new("struct kvm_cpuid2 *",
                                             {"entries": MAX_CPUID_ENTRIES}), -1))
            else:
                assert ctype is not None
                entries.append((get, ffi.new(ctype + " *"), -1))
        if len(set(parts)) != len(parts):
            raise KvmInvalidArgumentError(f"a state part is named twice in {parts}")
        return IoctlBatch(entries)

    @staticmethod
    def prepare_state(parts: Sequence[tuple[str, bytes]]) -> IoctlBatch:
        """Build, once, the writes of a vCPU state for :meth:`set_state`: ``(part, raw)``
        pairs of :data:`STATE_PARTS` in the order they are to be written, ``raw`` as
        :meth:`get_state` returns it (or :func:`encode_msrs`, :func:`encode_cpuid`,
        :func:`encode_xcrs`, :func:`encode_mp_state` make it).  Every length is checked here:
        a wrong one raises :class:`KvmInvalidArgumentError`.  The batch holds its own copies
        and serves any number of :meth:`set_state` calls, on any vCPU."""
        if not IS_X86:
            raise KvmUnsupportedError("vCPU states exist only on x86_64")
        entries: list[tuple[str, Any, int]] = []
        payloads: list[bytes] = []
        seen_order: list[str] = []
        for part, data in _check.named_parts("parts", parts, STATE_PARTS, "vCPU state part"):
            seen_order.append(part)
            raw = bytes(_check.buffer_bytes(part, data))
            _, setter, ctype = STATE_PARTS[part]
            expect = -1
            if part == "msrs":
                expect = len(decode_msrs(raw))
            elif part == "cpuid":
                decode_cpuid(raw)  # checks the length against nent
            elif part == "xsave":
                if len(raw) < XSAVE_LEGACY_SIZE or len(raw) % 4:
                    raise KvmInvalidArgumentError(
                        f"an XSAVE area is a multiple of 4 bytes, at least {XSAVE_LEGACY_SIZE}, "
                        f"not {len(raw)}")
            else:
                assert ctype is not None
                if len(raw) != ffi.sizeof(ctype):
                    raise KvmInvalidArgumentError(
                        f"{part} ({ctype}) is {ffi.sizeof(ctype)} bytes, not {len(raw)}")
            # Safety: a copy of exactly the checked length, which is what the kernel reads.
            entries.append((setter, ffi.new("char[]", raw), expect))
            payloads.append(raw)
        by_part = dict(zip(seen_order, payloads, strict=True))
        info = {"xsave": len(by_part["xsave"]) if "xsave" in by_part else None,
                "cpuid": seen_order[:1] == ["cpuid"]}
        return IoctlBatch(entries, payloads, kind="vcpu", info=info)

    def set_state(self, batch: IoctlBatch) -> None:
        """Write a state prepared by :meth:`prepare_state`, in its order, in one native call.

        A leading ``cpuid`` part is skipped when it equals the CPUID known to be installed
        (kvmio set it, or KVM_GET_CPUID2 returned it since: re-setting it is a no-op that
        costs more than the rest of the state here).  An XSAVE area of another size than this
        vCPU's :attr:`xsave_size` raises :class:`KvmInvalidArgumentError` before anything is
        written.  The first ioctl that fails raises :class:`KvmError` naming it (with the
        kernel's errno, or the first MSR the kernel refused); the parts before it are written.
        """
        self._x86("writing the vCPU state")
        self._check_state_batch(batch)
        skip = (0,) if self._cpuid_skippable(batch) else ()
        done, result = self._run_batch(batch, skip)
        self._cpuid_written(batch, skip, done)
        if done < len(batch):
            raise _batch_error(batch, done, result)

    # For Vm.set_states, which writes a VM's and its vCPUs' states in one call.

    def _check_state_batch(self, batch: IoctlBatch) -> None:
        _check.instance("batch", batch, IoctlBatch)
        if batch.kind != "vcpu":
            raise KvmInvalidArgumentError("not a vCPU state write; build the batch with "
                                          "Vcpu.prepare_state")
        size = batch.info["xsave"]
        if size is not None and size != self._xsave_size:
            raise KvmInvalidArgumentError(
                f"the XSAVE area of vCPU {self.id} is {self._xsave_size} bytes; the state "
                f"holds {size}")

    def _cpuid_skippable(self, batch: IoctlBatch) -> bool:
        return bool(batch.info["cpuid"]) and batch.payloads[0] in self._cpuid_known

    def _cpuid_written(self, batch: IoctlBatch, skip: tuple[int, ...], done: int) -> None:
        """After a write of ``batch`` that stopped at its entry ``done``."""
        if batch.info["cpuid"] and 0 not in skip:
            self._cpuid_known = frozenset((batch.payloads[0],)) if done > 0 else frozenset()

    def _hold(self) -> None:
        """Begin an :meth:`outside_run` hold (raises if a thread is inside ``run()``)."""
        with self._run_lock:
            if self._in_run:
                raise KvmStateError(f"vCPU {self.id} is inside run(); stop it first")
            self._holds += 1

    def _unhold(self) -> None:
        with self._run_lock:
            self._holds -= 1
            if not self._holds:
                self._outside.notify_all()


class _Hold:
    """What :meth:`Vcpu.outside_run` returns (a plain object, not a generator: a checkpoint
    reset takes one right after KVM_RUN, where every Python frame is slow)."""

    __slots__ = ("_vcpu",)

    def __init__(self, vcpu: Vcpu):
        self._vcpu = vcpu

    def __enter__(self) -> None:
        self._vcpu._hold()

    def __exit__(self, *exc: object) -> None:
        self._vcpu._unhold()


# -- raw encodings of the variable parts of a vCPU state (x86) --------------------------------


def state_part_size(part: str) -> int | None:
    """Bytes of a fixed-size part of :data:`STATE_PARTS` (``None`` for ``xsave``, ``msrs``
    and ``cpuid``, whose size varies)."""
    if part not in STATE_PARTS:
        raise KvmInvalidArgumentError(f"no vCPU state part {part!r}")
    ctype = STATE_PARTS[part][2]
    return None if ctype is None or not IS_X86 else int(ffi.sizeof(ctype))


def _layout(struct: str, array: str, entry: str) -> tuple[int, int]:
    return int(ffi.offsetof(struct, array)), int(ffi.sizeof(entry))


def encode_msrs(values: Iterable[tuple[int, int]]) -> bytes:
    """The raw ``struct kvm_msrs`` (header and entries) for ``(index, value)`` pairs, in the
    order given (KVM_SET_MSRS writes them in that order)."""
    items = [(_check.u32("MSR index", i), _check.u64(f"MSR {i!r} value", v)) for i, v in values]
    m = ffi.new("struct kvm_msrs *", {"entries": len(items)})
    m.nmsrs = len(items)
    for k, (idx, val) in enumerate(items):
        m.entries[k].index = idx
        m.entries[k].data = val
    head, size = _layout("struct kvm_msrs", "entries", "struct kvm_msr_entry")
    return bytes(ffi.buffer(m, head + size * len(items)))


def decode_msrs(raw: bytes) -> list[tuple[int, int]]:
    """``(index, value)`` pairs of a raw ``struct kvm_msrs``, in order; a length that does not
    match its count raises :class:`KvmInvalidArgumentError`."""
    head, size = _layout("struct kvm_msrs", "entries", "struct kvm_msr_entry")
    n = _counted("struct kvm_msrs", raw, head, size, "nmsrs", 1 << 16)
    fmt = _formats()["msr"]
    return list(fmt.iter_unpack(raw[head:head + n * size]))


#: The fields of a CPUID entry kvmio reads and writes, in their order in the struct.
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def encode_cpuid(entries: Iterable[CpuidEntry]) -> bytes:
    """The raw ``struct kvm_cpuid2`` (header and entries, padding zero) for ``entries``."""
    items = [_check.instance("CPUID entry", e, CpuidEntry) for e in entries]
    if len(items) > MAX_CPUID_ENTRIES:
        raise KvmInvalidArgumentError(f"at most {MAX_CPUID_ENTRIES} CPUID entries, not "
                                      f"{len(items)}")
    values: list[tuple[int, ...]] = [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                                     for e in items]
    # Plain ints in range take one check each (a restore encodes ~80 entries); anything
    # else goes through the named checks, which accept numpy integers and say what is wrong.
    if not all(type(v) is int and 0 <= v <= 0xFFFFFFFF for row in values for v in row):
        values = [tuple(_check.u32(f"CPUID entry {f}", v) for f, v in zip(
            _CPUID_FIELDS, row, strict=True)) for row in values]
    head, size = _layout("struct kvm_cpuid2", "entries", "struct kvm_cpuid_entry2")
    out = bytearray(head + size * len(items))
    nent = int(ffi.offsetof("struct kvm_cpuid2", "nent"))
    out[nent:nent + 4] = len(items).to_bytes(4, sys.byteorder)
    fmt = _formats()["cpuid"]
    for k, row in enumerate(values):
        fmt.pack_into(out, head + k * size, *row)
    return bytes(out)


def decode_cpuid(raw: bytes) -> list[CpuidEntry]:
    """The entries of a raw ``struct kvm_cpuid2``; a length that does not match its count
    raises :class:`KvmInvalidArgumentError`."""
    head, size = _layout("struct kvm_cpuid2", "entries", "struct kvm_cpuid_entry2")
    n = _counted("struct kvm_cpuid2", raw, head, size, "nent", MAX_CPUID_ENTRIES)
    fmt = _formats()["cpuid"]
    return [CpuidEntry(*e) for e in fmt.iter_unpack(raw[head:head + n * size])]


def encode_xcrs(xcrs: MappingType[int, int]) -> bytes:
    """The raw ``struct kvm_xcrs`` for extended control registers by index."""
    x = ffi.new("struct kvm_xcrs *")
    cap = len(x.xcrs)
    if len(xcrs) > cap:
        raise KvmInvalidArgumentError(f"at most {cap} XCRs, not {len(xcrs)}")
    items = sorted((_check.u32("XCR index", k), _check.u64(f"XCR {k!r}", v))
                   for k, v in xcrs.items())
    x.nr_xcrs = len(items)
    for k, (idx, val) in enumerate(items):
        x.xcrs[k].xcr = idx
        x.xcrs[k].value = val
    return _abi.to_bytes(x, "struct kvm_xcrs")


def decode_xcrs(raw: bytes) -> dict[int, int]:
    """Extended control registers by index, from a raw ``struct kvm_xcrs``."""
    x = _abi.from_bytes("struct kvm_xcrs", raw)
    if x.nr_xcrs > len(x.xcrs):
        raise KvmInvalidArgumentError(f"struct kvm_xcrs counts {x.nr_xcrs} XCRs, more than "
                                      f"its {len(x.xcrs)}")
    return {int(x.xcrs[k].xcr): int(x.xcrs[k].value) for k in range(x.nr_xcrs)}


def encode_mp_state(state: int) -> bytes:
    """The raw ``struct kvm_mp_state`` for a ``KVM_MP_STATE_*`` value."""
    mp = ffi.new("struct kvm_mp_state *")
    mp.mp_state = _check.u32("state", state)
    return _abi.to_bytes(mp, "struct kvm_mp_state")


def decode_mp_state(raw: bytes) -> int:
    """The ``KVM_MP_STATE_*`` value of a raw ``struct kvm_mp_state``."""
    return int(_abi.from_bytes("struct kvm_mp_state", raw).mp_state)


_FORMATS: dict[str, Any] = {}


def _formats() -> dict[str, Any]:
    """Bulk decoders of MSR and CPUID entries, laid out as the compiler says."""
    if not _FORMATS:
        _FORMATS["msr"] = _abi.struct_format("struct kvm_msr_entry", ("index", "data"))
        _FORMATS["cpuid"] = _abi.struct_format("struct kvm_cpuid_entry2", _CPUID_FIELDS)
    return _FORMATS


def _counted(struct: str, raw: bytes, head: int, size: int, field: str, most: int) -> int:
    if len(raw) < head:
        raise KvmInvalidArgumentError(f"{struct} needs at least {head} bytes, not {len(raw)}")
    offset = int(ffi.offsetof(struct, field))
    n = int.from_bytes(raw[offset:offset + 4], sys.byteorder)  # a u32 count
    if n > most or len(raw) != head + n * size:
        raise KvmInvalidArgumentError(
            f"{struct} with {field}={n} is {head} + {n} * {size} bytes (at most {most} "
            f"entries), not {len(raw)}")
    return n


def _read_part(part: str, arg: Any, xsave_size: int) -> bytes:
    """A state part's raw bytes from the argument its GET ioctl filled."""
    if part == "xsave":
        return bytes(ffi.buffer(arg, xsave_size))
    if part == "msrs":
        head, size = _layout("struct kvm_msrs", "entries", "struct kvm_msr_entry")
        return bytes(ffi.buffer(arg, head + size * int(arg.nmsrs)))
    if part == "cpuid":
        # As kvmio set it: KVM keeps the entries it was given, whose padding kvmio zeroes.
        head, size = _layout("struct kvm_cpuid2", "entries", "struct kvm_cpuid_entry2")
        return bytes(ffi.buffer(arg, head + size * int(arg.nent)))
    _, _, ctype = STATE_PARTS[part]
    assert ctype is not None
    return _abi.to_bytes(arg, ctype)


def _batch_error(batch: IoctlBatch, done: int, result: int) -> KvmError:
    """The error for a batch that stopped at entry ``done`` with ``result``."""
    name = batch.names[done]
    if result < 0:
        return from_errno(-result, name)
    if name == "KVM_GET_MSRS":
        index = int(batch.arg(done).entries[result].index)
        return KvmError(f"MSR {index:#x} cannot be read (the kernel read {result})", ioctl=name)
    if name == "KVM_SET_MSRS":
        index, value = decode_msrs(batch.payloads[done])[result]
        return KvmError(f"MSR {index:#x} cannot be set to {value:#x} (the kernel set {result})",
                        ioctl=name)
    return KvmError(f"unexpected result {result}", ioctl=name)
