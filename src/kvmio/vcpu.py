"""The vCPU file descriptor: :class:`Vcpu` (run loop, registers, kick)."""

from __future__ import annotations

import contextlib
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kvmio import _abi, _check
from kvmio._abi import IS_X86, FdOwner, Mapping, ffi, lib
from kvmio.errors import (
    DirtyRingOverrunError,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
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


# vCPUs inside run(), for kick_running(): weak, so that a dropped vCPU is never kept alive.
_RUNNING: weakref.WeakSet[Vcpu] = weakref.WeakSet()
_RUNNING_LOCK = threading.Lock()


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
    run when it closes.
    """

    _what = "Vcpu"

    def __init__(self, vcpu_id: int, fd: int, run: Mapping, *, ring_set: RingSet | None = None,
                 on_close: Callable[[int], None] | None = None):
        super().__init__(fd)
        self.id = vcpu_id
        self._run = _abi.KvmRun(run)
        self._on_close = on_close
        self._exit_gen = 0
        # Guards the identity of the thread inside KVM_RUN, so that kick() never signals a
        # thread that has left run() (or exited).
        self._run_lock = threading.Lock()
        self._outside = threading.Condition(self._run_lock)  # signalled when a hold ends
        self._running_thread: int | None = None
        self._in_run = False
        self._holds = 0  # outside_run() blocks in progress
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

    @contextlib.contextmanager
    def outside_run(self) -> Iterator[None]:
        """Hold the vCPU outside ``run()``: raises :class:`KvmStateError` if a thread is in it
        now, and makes ``run()`` wait until the block ends (ring repairs need this).  Holds
        nest and may overlap (from any threads): ``run()`` waits for the last to end."""
        with self._run_lock:
            if self._in_run:
                raise KvmStateError(f"vCPU {self.id} is inside run(); stop it first")
            self._holds += 1
        try:
            yield
        finally:
            with self._run_lock:
                self._holds -= 1
                if not self._holds:
                    self._outside.notify_all()

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
            if self._running_thread is not None:
                signal.pthread_kill(self._running_thread, _abi.kick_signal())

    def run(self) -> VcpuExit:
        """KVM_RUN: run the guest until it exits to userspace, and decode the exit.

        I/O-in and MMIO-read exits carry an ``answer()`` method that writes the value the guest
        reads back into ``kvm_run``; it must be called before the next ``run()``.  The vCPU
        counts as running until the exit is decoded, so ``close()`` cannot unmap ``kvm_run``
        under it.  Raises :class:`KvmClosedError` once the vCPU is closed (or closing).
        """
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
                self._running_thread = threading.get_ident()
                self._exit_gen += 1
                with _RUNNING_LOCK:
                    _RUNNING.add(self)
            if self._ring is not None:
                # Where the ring stood, for telling a stuck ring at a ring-full exit (after
                # _in_run is set, so no other run() can overwrite it; not under the run lock,
                # which a tracker takes while holding the ring set's lock).
                self._ring.before_run()
            r = _abi.ioctl_eintr(fd, lib.KVM_RUN, name="KVM_RUN")
            with self._run_lock:
                self._running_thread = None
                if r is None:
                    # Consume the kicks that led here; later ones stay pending.
                    self._run.immediate_exit = False
                    return Interrupted()
            return self._decode(self._run)
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

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the raw 4 KiB ``struct kvm_xsave``."""
        return self._get_raw("struct kvm_xsave", "KVM_GET_XSAVE")

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE."""
        self._set_raw("struct kvm_xsave", "KVM_SET_XSAVE", data)

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
        x = ffi.new("struct kvm_xcrs *")
        cap = len(x.xcrs)
        if len(xcrs) > cap:
            raise KvmInvalidArgumentError(f"at most {cap} XCRs, not {len(xcrs)}")
        items = sorted((_check.u32("XCR index", k), _check.u64(f"XCR {k!r}", v))
                       for k, v in xcrs.items())
        x.nr_xcrs = len(items)
        for i, (k, v) in enumerate(items):
            x.xcrs[i].xcr = k
            x.xcrs[i].value = v
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

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: the CPUID the guest sees (usually from ``get_supported_cpuid``)."""
        self._x86("KVM_SET_CPUID2")
        entries = [_check.instance("CPUID entry", e, CpuidEntry)
                   for e in _check.sequence("entries", entries)]
        for e in entries:
            for f in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
                _check.u32(f"CPUID entry {f}", getattr(e, f))
        buf = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            c = buf.entries[i]
            c.function, c.index, c.flags = e.function, e.index, e.flags
            c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
        self._ioctl(lib.KVM_SET_CPUID2, buf, name="KVM_SET_CPUID2")

    def get_cpuid2(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID entries set on this vCPU."""
        self._x86("KVM_GET_CPUID2")
        max_entries = _check.integer("max_entries", max_entries, lo=1, hi=1 << 16)
        buf = ffi.new("struct kvm_cpuid2 *", {"entries": max_entries})
        buf.nent = max_entries
        self._ioctl(lib.KVM_GET_CPUID2, buf, name="KVM_GET_CPUID2")
        return cpuid_entries(buf)
