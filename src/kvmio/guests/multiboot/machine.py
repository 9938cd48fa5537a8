"""Running a Multiboot kernel: :class:`MultibootMachine`, :class:`MultibootResult`,
:class:`StopReason` and :func:`run_multiboot`."""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmio._abi import IS_X86, lib
from kvmio._closing import Closing
from kvmio.devices import (
    DebugConsole,
    DebugExit,
    DebugExitPort,
    DeviceEvent,
    IoBus,
    Output,
    PowerControl,
    PowerOff,
    ResetRequest,
    Uart16550,
    VgaText,
    render_vga_text,
)
from kvmio.errors import (
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    KvmUnsupportedError,
    MigrationError,
    SnapshotError,
)
from kvmio.exits import (
    DirtyRingFull,
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
)
from kvmio.guests.modes import setup_protected_mode
from kvmio.guests.multiboot.bootinfo import (
    DEFAULT_MEMORY,
    _encode_cmdline,
    boot_info_layout,
    check_memory,
    write_boot_info,
)
from kvmio.guests.multiboot.header import BOOTLOADER_MAGIC
from kvmio.guests.multiboot.image import KernelImage, parse_kernel, read_kernel_file
from kvmio.migration.precopy import (
    DEFAULT_DOWNTIME,
    MigrationReport,
    PassReport,
    ReceivedVm,
    receive_vm,
    send_vm,
)
from kvmio.migration.stream import Connection
from kvmio.runner import Throttle, check_throttle, run_until_handled
from kvmio.snapshot.checkpoint import Checkpoint
from kvmio.snapshot.files import (
    AS_SAVED,
    ChainSpec,
    SnapshotInfo,
    Snapshotter,
    restore_snapshot,
    save_snapshot,
)
from kvmio.x86 import Regs

if TYPE_CHECKING:
    from kvmio.system import Kvm
    from kvmio.tracker import DirtyTracker
    from kvmio.vcpu import Vcpu
    from kvmio.vm import Vm

__all__ = ["MultibootMachine", "MultibootResult", "StopReason", "run_multiboot"]

#: How many bytes of output a result keeps by default (the last ones).
DEFAULT_MAX_OUTPUT = 1 << 20

#: With the in-kernel irqchip, how often (seconds) a run checks whether the vCPU halted with
#: interrupts disabled (KVM then handles HLT itself and never exits).
HALT_POLL_INTERVAL = 0.05

#: Initial ESP (the specification leaves it undefined).
STACK_TOP = 0x7000

#: The ``kind`` of a Multiboot machine's snapshot (in its guest metadata).
SNAPSHOT_KIND = "multiboot"

_RFLAGS_IF = 1 << 9


class StopReason(enum.Enum):
    """Why :meth:`MultibootMachine.run` returned."""

    #: The kernel wrote to the ``isa-debug-exit`` port (``exit_code`` is set).
    DEBUG_EXIT = "debug-exit"
    #: The kernel executed HLT and nothing can wake it.  With the in-kernel irqchip (the
    #: default) KVM handles HLT itself and no exit comes: a HLT with interrupts enabled waits
    #: for an interrupt (the timer's, say), and only a HLT with interrupts disabled is found,
    #: by checking the vCPU's MP state every :data:`HALT_POLL_INTERVAL` seconds.  Without the
    #: irqchip nothing ever interrupts the guest, and every HLT exits and ends the run.
    HALTED = "halted"
    #: The guest shut down (a triple fault).
    SHUTDOWN = "shutdown"
    #: The kernel asked for a reset (keyboard controller or port 0xCF9).
    RESET = "reset"
    #: The kernel asked for power-off (ACPI PM1a control, QEMU/Bochs style).
    POWEROFF = "poweroff"
    #: KVM could not handle an exit (e.g. an instruction it cannot emulate).
    INTERNAL_ERROR = "internal-error"
    #: The hardware refused to enter the guest.
    FAIL_ENTRY = "fail-entry"
    #: KVM reported a system event (shutdown, reset, crash).
    SYSTEM_EVENT = "system-event"
    #: An exit kvmio does not handle.
    UNHANDLED_EXIT = "unhandled-exit"
    #: The timeout expired (the vCPU was kicked; the last exit is ``Interrupted``).
    TIMEOUT = "timeout"


#: Stops after which the vCPU cannot sensibly be run again.
_TERMINAL = frozenset({StopReason.SHUTDOWN, StopReason.RESET, StopReason.POWEROFF,
                       StopReason.INTERNAL_ERROR, StopReason.FAIL_ENTRY,
                       StopReason.SYSTEM_EVENT, StopReason.UNHANDLED_EXIT})


@dataclass(frozen=True)
class MultibootResult:
    """The outcome of a run.

    ``output`` is every byte written to the debug console and to COM1, in order (``debugcon``
    and ``serial`` hold each one's share); ``exit_code`` is ``(value << 1) | 1`` after a debug
    exit, else ``None``; ``exit`` is the last vCPU exit and ``regs`` the registers at the stop;
    ``vga_text`` is :func:`render_vga_text` of the screen at the stop.

    Only the last ``max_output`` bytes (see :meth:`MultibootMachine.run`) of ``output``, and of
    ``debugcon`` and ``serial`` each, are kept; ``output_dropped`` counts the bytes of
    ``output`` dropped before them (``on_output`` saw every byte).
    """

    reason: StopReason
    detail: str
    exit: VcpuExit
    output: bytes
    debugcon: bytes
    serial: bytes
    exit_code: int | None
    regs: Regs
    vga_text: str
    elapsed: float
    exits: int
    warnings: tuple[str, ...] = ()
    output_dropped: int = 0

    def summary(self) -> str:
        """One line: why the run stopped, how long it took and how many exits it made."""
        return (f"{self.detail} after {self.elapsed:.2f} s ({self.exits} exits, "
                f"{len(self.output) + self.output_dropped} bytes of output)")


@dataclass
class _Stop:
    reason: StopReason
    detail: str
    exit_code: int | None = None


class _Tail:
    """The last ``limit`` bytes written to it, and how many were dropped before them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._buf = bytearray()

    def add(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 2 * self.limit + 4096:  # trim now and then: amortised O(1)
            self._trim()

    def _trim(self) -> None:
        extra = len(self._buf) - self.limit
        if extra > 0:
            del self._buf[:extra]
            self.dropped += extra

    def value(self) -> bytes:
        self._trim()
        return bytes(self._buf)


#: Emits output: (source device name, bytes).
_Emit = Callable[[str, bytes], None]


class MultibootMachine(Closing):
    """A one-vCPU VM with a Multiboot kernel loaded and ready to run.

    ``kernel`` is the file's bytes or its path; ``mem`` the guest RAM in bytes (one memory slot
    from address 0); ``cmdline`` the text appended to the command line, which starts with
    ``name`` (default: the path as given, or ``"kernel"`` for bytes) as QEMU's does.  Raises
    :class:`KvmInvalidArgumentError` for a kernel that cannot be loaded (nothing is created
    then).  Close it (or use ``with``) to release the VM.

    Port I/O goes to the devices on :attr:`bus` (see :mod:`kvmio.devices`): the debug console
    (``0xE9``), ``isa-debug-exit`` (``0xF4``), COM1, the reset and power-off ports and the VGA
    CRT controller; other ports read 0 and ignore writes.  MMIO (addresses outside RAM) reads
    all-ones, as an empty bus does, and ignores writes.

    With ``irqchip`` (the default) the VM has KVM's in-kernel interrupt controllers (PIC,
    IOAPIC, local APIC) and i8254 PIT, created before the vCPU, so kernels that program the
    timer and wait for its interrupt run.  ``irqchip=False`` gives the older machine where
    nothing interrupts the guest and every HLT ends the run.

    ``ring_entries`` enables the dirty ring with that many entries per vCPU; ``log_dirty``
    makes guest RAM dirty-logged from boot (default: when the ring is enabled).  Pass
    ``log_dirty=False`` to boot unlogged and turn logging on when tracking starts (a
    :class:`~kvmio.tracker.DirtyTracker` with ``log_slots=[machine.ram.slot]``).
    """

    def __init__(self, kvm: Kvm, kernel: bytes | str | os.PathLike[str], *,
                 mem: int = DEFAULT_MEMORY, cmdline: str = "", name: str | None = None,
                 log_dirty: bool | None = None, ring_entries: int | None = None,
                 irqchip: bool = True):
        if not IS_X86:
            raise KvmUnsupportedError("Multiboot kernels run only on x86_64 hosts")
        check_memory(mem)
        if isinstance(kernel, bytes | bytearray | memoryview):
            data = bytes(kernel)
            default_name = "kernel"
            if len(data) > mem:
                raise KvmInvalidArgumentError(
                    f"the kernel is {len(data)} bytes, larger than guest memory ({mem} bytes)")
        else:
            default_name = os.fspath(kernel)
            data = read_kernel_file(kernel, mem)
        name = default_name if name is None else name
        self.cmdline = f"{name} {cmdline}" if cmdline else name
        _encode_cmdline(self.cmdline)
        image = parse_kernel(data)
        #: The kernel as loaded (``None`` for a machine restored from a snapshot).
        self.image: KernelImage | None = image
        image.check_placement(mem)
        #: The kernel's format (``"elf"`` or ``"aout"``), entry point, end and load warnings.
        self.kernel_format, self.entry, self.kernel_end = image.format, image.entry, image.end
        self.warnings: tuple[str, ...] = image.warnings
        self.boot_info = boot_info_layout(mem, self.cmdline, image.end)
        self.mem_size = mem
        self._devices()
        self._terminal: StopReason | None = None
        self.irqchip = irqchip
        #: The snapshot this machine was restored from (``None`` if it booted).
        self.restored_from: SnapshotInfo | None = None
        self.vm = kvm.create_vm()
        try:
            self.vm.set_tss_address()
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            if ring_entries is not None:
                self.vm.enable_dirty_ring(ring_entries)
            self.ram = self.vm.add_memory_region(0, mem, slot=0, noreserve=True,
                                                 log_dirty=ring_entries is not None
                                                 if log_dirty is None else bool(log_dirty))
            image.load(self.vm)
            self.info_addr = write_boot_info(self.vm, mem, self.cmdline, image.end)
            self.vcpu: Vcpu = self.vm.create_vcpu(0)
            with contextlib.suppress(KvmUnsupportedError):
                self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
            setup_protected_mode(self.vcpu, self.vm, image.entry, stack=STACK_TOP)
            regs = self.vcpu.get_regs()
            regs.rax, regs.rbx, regs.rflags = BOOTLOADER_MAGIC, self.info_addr, 2
            self.vcpu.set_regs(regs)
        except BaseException:
            self.vm.close()
            raise

    def _devices(self) -> None:
        self.uart = Uart16550()
        self.vga = VgaText()
        self.bus = IoBus([DebugConsole(), DebugExitPort(), self.uart, PowerControl(), self.vga])

    def __repr__(self) -> str:
        return (f"<MultibootMachine {self.kernel_format} entry={self.entry:#x} "
                f"mem={self.mem_size >> 20} MiB {'closed' if self.vm.closed else 'open'}>")

    # -- snapshots ------------------------------------------------------------------------------

    def _snapshot_guest(self) -> dict[str, Any]:
        return {"kind": SNAPSHOT_KIND, "cmdline": self.cmdline, "mem": self.mem_size,
                "irqchip": self.irqchip, "format": self.kernel_format, "entry": self.entry,
                "kernel_end": self.kernel_end, "warnings": list(self.warnings),
                "info_addr": self.info_addr,
                "terminal": None if self._terminal is None else self._terminal.value}

    def _exit_handler(self, on_output: Callable[[bytes], None] | None
                      ) -> Callable[[VcpuExit], None]:
        """Exits met while a pending exit is finished for a snapshot: to the devices, their
        output to ``on_output`` (a stop they cause is the next run's business)."""
        def emit(source: str, data: bytes) -> None:
            if on_output is not None:
                on_output(data)

        def on_exit(ex: VcpuExit) -> None:
            self._handle(ex, emit)

        return on_exit

    def snapshotter(self, *, tracker: DirtyTracker | None = None) -> Snapshotter:
        """A :class:`~kvmio.snapshot.files.Snapshotter` of this machine (for a chain of diff
        snapshots with :meth:`snapshot`): its first save is full, or a diff on the snapshot the
        machine was restored from.  Guest RAM must be dirty-logged (``log_dirty=True`` or a
        dirty ring) for diffs to hold only what changed; without it each diff holds it all."""
        return Snapshotter(self.vm, tracker=tracker, devices=self.bus,
                           guest=self._snapshot_guest(), base=self.restored_from)

    def snapshot(self, path: str | os.PathLike[str], *, chain: Snapshotter | None = None,
                 full: bool = False, on_output: Callable[[bytes], None] | None = None,
                 durable: bool = False) -> SnapshotInfo:
        """Write a snapshot of the stopped machine (between runs) to the new directory
        ``path``: a full one, or with ``chain`` (from :meth:`snapshotter`) the chain's next
        layer (``full`` forces a full one).  Output the kernel makes while its last exit is
        finished goes to ``on_output``.  Raises :class:`~kvmio.errors.SnapshotError`."""
        on_exit = self._exit_handler(on_output)
        if chain is None:
            return save_snapshot(path, self.vm, [self.vcpu], devices=self.bus,
                                 guest=self._snapshot_guest(), on_exit=on_exit,
                                 durable=durable)
        return chain.save(path, [self.vcpu], devices=self.bus, guest=self._snapshot_guest(),
                          full=full, on_exit=on_exit, durable=durable)

    @classmethod
    def from_snapshot(cls, kvm: Kvm, path: ChainSpec, *, lazy: bool = True,
                      verify: bool = True, ring_entries: int | None = AS_SAVED,
                      log_dirty: bool | None = None) -> MultibootMachine:
        """A machine restored from a snapshot :meth:`snapshot` wrote (``path`` as
        :func:`~kvmio.snapshot.files.restore_snapshot` takes it, with ``lazy``, ``verify``,
        ``ring_entries`` as its ``dirty_ring`` and ``log_dirty``): :meth:`run` goes on where
        the kernel was, with its devices as they were.  Raises
        :class:`~kvmio.errors.SnapshotError` for a snapshot of something else."""
        self = cls.__new__(cls)
        self._devices()
        restored = restore_snapshot(kvm, path, lazy=lazy, verify=verify, devices=self.bus,
                                    dirty_ring=ring_entries, log_dirty=log_dirty,
                                    guest_kind=SNAPSHOT_KIND)
        try:
            self._from_guest(restored.guest, restored.vm)
            self.vm = restored.vm
            self.ram = self.vm.regions[0]
            self.vcpu = restored.vcpus[0]
            self.restored_from = restored.info
        except BaseException:
            restored.close()
            raise
        return self

    def _from_guest(self, g: Mapping[str, Any], vm: Vm) -> None:
        try:
            self.cmdline = str(g["cmdline"])
            self.mem_size = int(g["mem"])
            self.irqchip = bool(g["irqchip"])
            self.kernel_format = str(g["format"])
            self.entry = int(g["entry"])
            self.kernel_end = int(g["kernel_end"])
            self.warnings = tuple(str(w) for w in g["warnings"])
            self.info_addr = int(g["info_addr"])
            terminal = g["terminal"]
            self._terminal = None if terminal is None else StopReason(terminal)
            self.boot_info = boot_info_layout(self.mem_size, self.cmdline, self.kernel_end)
        except (KeyError, TypeError, ValueError, KvmInvalidArgumentError) as e:
            raise SnapshotError(f"the snapshot's Multiboot metadata is malformed ({e})") from None
        regions = vm.regions
        if list(regions) != [0] or regions[0].size != self.mem_size or list(vm.vcpus) != [0]:
            raise SnapshotError("the snapshot's machine is not a Multiboot machine's (one slot "
                                "of RAM at 0, one vCPU)")
        self.image = None

    # -- migration ------------------------------------------------------------------------------

    def migrate(self, conn: Connection, *, runner: KernelRunner | None = None,
                tracker: DirtyTracker | None = None, downtime: float = DEFAULT_DOWNTIME,
                max_passes: int = 30, timeout: float | None = None,
                answer_timeout: float = 60.0, on_output: Callable[[bytes], None] | None = None,
                compress: bool = False,
                on_pass: Callable[[PassReport], None] | None = None) -> MigrationReport:
        """Migrate the machine (RAM, vCPU, irqchip, PIT and the port devices) to a destination
        (:meth:`from_migration`) at the other end of ``conn``: live while ``runner`` (a
        started :class:`KernelRunner` of this machine) runs the kernel, else between two
        :meth:`run` calls (see :func:`kvmio.migration.send_vm`).  Output the kernel makes
        while its last exit is finished goes to ``on_output``.  After a success the machine
        stays stopped; after a failure the runner goes on (except after a
        :class:`~kvmio.errors.MigrationInDoubtError`: then it stays paused)."""
        if runner is not None and runner.machine is not self:
            raise KvmStateError("the runner runs another machine")
        return send_vm(conn, self.vm, [self.vcpu], runner=runner, tracker=tracker,
                       devices=self.bus, guest=self._snapshot_guest(),
                       on_exit=self._exit_handler(on_output), downtime=downtime,
                       max_passes=max_passes, timeout=timeout, answer_timeout=answer_timeout,
                       compress=compress, on_pass=on_pass)

    @classmethod
    def from_migration(cls, kvm: Kvm, conn: Connection, *,
                       ring_entries: int | None = AS_SAVED,
                       log_dirty: bool | None = None) -> MultibootMachine:
        """The machine a source's :meth:`migrate` sends on ``conn``: :meth:`run` goes on where
        the kernel was, with its devices as they were.  ``ring_entries`` and ``log_dirty``:
        its dirty ring and whether RAM is dirty-logged (default: as the source had them).
        Raises :class:`~kvmio.errors.MigrationError`."""
        self = cls.__new__(cls)
        self._devices()

        def devices(guest: dict[str, Any]) -> IoBus:
            if guest.get("kind") != SNAPSHOT_KIND:
                raise MigrationError(f"the migrated guest is not a Multiboot kernel (its kind "
                                     f"is {guest.get('kind')!r})")
            return self.bus

        def accept(got: ReceivedVm) -> None:  # before the hand-over: it may refuse
            try:
                self._from_guest(got.guest, got.vm)
            except SnapshotError as e:
                raise MigrationError(f"the migrated VM is not a Multiboot machine: "
                                     f"{e.message}") from e

        got = receive_vm(kvm, conn, devices=devices, dirty_ring=ring_entries,
                         log_dirty=log_dirty, accept=accept)
        self.vm = got.vm
        self.ram = self.vm.regions[0]
        self.vcpu = got.vcpus[0]
        self.restored_from = None
        return self

    def close(self) -> None:
        """Close the VM (idempotent)."""
        self.vm.close()

    def checkpoint(self, *, tracker: DirtyTracker | None = None) -> Checkpoint:
        """An in-memory :class:`~kvmio.snapshot.Checkpoint` of the machine now (between two
        :meth:`run` calls): guest RAM, the vCPU, the in-kernel irqchip and PIT, and the port
        devices.  ``checkpoint.reset()`` brings it all back, and the next :meth:`run` goes
        on from there.  RAM must be dirty-logged (``ring_entries=`` or ``log_dirty=True``);
        ``tracker``: the :class:`~kvmio.tracker.DirtyTracker` that holds the dirty log, if
        any.  An exit the last run stopped at is finished first; output it makes then (the
        rest of a ``rep outs``, say) goes to the devices but is not emitted."""
        terminal = self._terminal

        def restore_flags() -> None:  # a kernel that crashed since may run again after reset
            self._terminal = terminal

        return Checkpoint.take(self.vm, [self.vcpu], devices=self.bus, tracker=tracker,
                               on_exit=self._finish_exit, on_reset=restore_flags)

    def _finish_exit(self, ex: VcpuExit) -> None:
        self._handle(ex, lambda source, data: None)

    def vga_text(self) -> str:
        """The VGA text screen now (see :func:`render_vga_text`)."""
        return render_vga_text(self.vm)

    def run(self, *, timeout: float | None = None,
            on_output: Callable[[bytes], None] | None = None,
            on_ring_full: Callable[[Vcpu], None] | None = None,
            max_output: int = DEFAULT_MAX_OUTPUT,
            on_interrupted: Callable[[], None] | None = None,
            throttle: Throttle | None = None) -> MultibootResult:
        """Run the kernel until it stops (see :class:`StopReason`) or ``timeout`` seconds pass.

        ``throttle`` paces the vCPU (e.g. a :class:`kvmio.limit.DirtyLimit`: see
        :class:`kvmio.runner.Throttle`); each end of one of its slices counts as an exit and
        calls ``on_interrupted``.

        Output bytes are passed to ``on_output`` as they are written; the result keeps the last
        ``max_output`` bytes (1 MiB by default) and counts the ones it dropped, so that a
        kernel that writes without end does not fill the host's memory.

        The timeout is a watcher thread that kicks the vCPU (with the irqchip it also kicks
        every :data:`HALT_POLL_INTERVAL` seconds to find a HLT with interrupts disabled); with
        ``timeout=None`` a kernel that never stops runs forever.  After a debug exit, a halt or
        a timeout the kernel may be run again (it resumes where it stopped); after any other
        stop this raises :class:`KvmStateError`.  ``on_interrupted`` is called whenever a kick
        interrupted the vCPU and the run would go on: a safe point (nothing is half done) at
        which it may raise, e.g. :class:`KeyboardInterrupt` for a Ctrl-C it was told of, to end
        the run.  With a dirty ring (``ring_entries``),
        ring-full exits go to ``on_ring_full`` (e.g.
        :meth:`kvmio.tracker.DirtyTracker.on_ring_full`), or else the vCPU's own ring is
        harvested (the entries are kept for its next harvest) and the rings are reset.
        """
        if self._terminal is not None:
            raise KvmStateError(f"the kernel cannot be resumed after a {self._terminal.value} "
                                "stop")
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
            raise KvmInvalidArgumentError(
                f"max_output must be a non-negative int, not {max_output!r}")
        if timeout is not None and timeout < 0:
            raise KvmInvalidArgumentError(f"timeout must be non-negative, not {timeout}")
        if throttle is not None:
            check_throttle(throttle)
        vcpu = self.vcpu
        lock = threading.Lock()
        done = threading.Event()
        finished = False
        timed_out = False
        kicked = False
        polls = 0  # the watcher's kicks: a dead halt is looked for after each one
        checked = 0
        poll = HALT_POLL_INTERVAL if self.irqchip else None

        def watch(deadline: float | None) -> None:
            # Kicks the vCPU at the deadline, and every `poll` seconds to look for a dead halt.
            nonlocal timed_out, kicked, polls
            while True:
                waits = [w for w in (poll, None if deadline is None
                                     else deadline - time.monotonic()) if w is not None]
                if done.wait(max(0.0, min(waits))):
                    return
                with lock:
                    if finished:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        timed_out = True
                    kicked = True
                    polls += 1
                    with contextlib.suppress(KvmError):
                        vcpu.kick()
                    if timed_out:
                        return

        output = _Tail(max_output)
        shares = {"debugcon": _Tail(max_output), "serial": _Tail(max_output)}

        def emit(source: str, data: bytes) -> None:
            if source not in shares:
                shares[source] = _Tail(max_output)
            shares[source].add(data)
            output.add(data)
            if on_output is not None:
                on_output(data)

        exits = 0
        start = time.monotonic()
        watcher = None
        if timeout is not None or poll is not None:
            watcher = threading.Thread(
                target=watch, args=(None if timeout is None else start + timeout,),
                name="kvmio-multiboot-watch", daemon=True)
        try:
            if watcher is not None:
                watcher.start()
            while True:
                # Ring-full exits are served by the runner's routing (on_ring_full, or the
                # vCPU's own ring drained), which also reports a ring stuck full as overrun.
                ex = run_until_handled(vcpu, on_ring_full=on_ring_full, throttle=throttle)
                exits += 1
                if isinstance(ex, Interrupted):
                    if timed_out:
                        stop = _Stop(StopReason.TIMEOUT, f"timeout ({timeout:g} s)")
                        break
                    # (Not at each end of a throttle's slice: only after the watcher's poll.)
                    dead = self._dead_halt() if self.irqchip and polls != checked else None
                    checked = polls
                    if dead is not None:
                        stop = dead
                        break
                    if on_interrupted is not None:
                        on_interrupted()  # may raise to end the run
                    continue  # a poll that found the vCPU busy, or a stray signal
                got = self._handle(ex, emit)
                if got is not None:
                    stop = got
                    break
        finally:
            done.set()
            with lock:
                finished = True
            if watcher is not None and watcher.is_alive():
                watcher.join()
            # A kick made as the run ended stays pending: drop it, so that a resumed run is not
            # cut short.  (This also drops other threads' kicks made meanwhile.)
            if kicked:
                with contextlib.suppress(KvmError):
                    vcpu.immediate_exit = False
        elapsed = time.monotonic() - start
        if stop.reason in _TERMINAL:
            self._terminal = stop.reason
        regs = vcpu.get_regs()
        return MultibootResult(
            reason=stop.reason, detail=stop.detail, exit=ex, output=output.value(),
            debugcon=shares["debugcon"].value(), serial=shares["serial"].value(),
            exit_code=stop.exit_code, regs=regs, vga_text=self.vga_text(), elapsed=elapsed,
            exits=exits, warnings=self.warnings, output_dropped=output.dropped)

    def _dead_halt(self) -> _Stop | None:
        """With the in-kernel irqchip: a stop if the vCPU sits in HLT with interrupts disabled
        (KVM keeps it halted in the kernel; nothing will wake it)."""
        if self.vcpu.get_mp_state() != lib.KVM_MP_STATE_HALTED:
            return None
        regs = self.vcpu.get_regs()
        if regs.rflags & _RFLAGS_IF:
            return None  # waiting for an interrupt, as it should
        return _Stop(StopReason.HALTED,
                     f"halted at EIP {regs.rip:#x} with interrupts disabled")

    def _handle(self, ex: VcpuExit, emit: _Emit) -> _Stop | None:
        if isinstance(ex, IoOut):
            return self._port_write(ex, emit)
        if isinstance(ex, IoIn):
            ex.answer(b"".join(self.bus.read(ex.port, ex.size).to_bytes(ex.size, "little")
                               for _ in range(ex.count)))
            return None
        if isinstance(ex, MmioRead):
            ex.answer(b"\xff" * ex.length)
            return None
        if isinstance(ex, MmioWrite):
            return None
        regs = self.vcpu.get_regs()
        eip = regs.rip
        if isinstance(ex, Hlt):
            if regs.rflags & _RFLAGS_IF:
                return _Stop(StopReason.HALTED,
                             f"halted at EIP {eip:#x} with interrupts enabled (without the "
                             "irqchip nothing ever interrupts, so it would wait forever)")
            return _Stop(StopReason.HALTED, f"halted at EIP {eip:#x} with interrupts disabled")
        if isinstance(ex, Shutdown):
            return _Stop(StopReason.SHUTDOWN, f"shutdown (triple fault) near EIP {eip:#x}")
        if isinstance(ex, InternalError):
            what = " (emulation failure)" if ex.suberror == InternalError.EMULATION else ""
            data = " ".join(f"{d:#x}" for d in ex.data)
            return _Stop(StopReason.INTERNAL_ERROR,
                         f"KVM internal error, suberror {ex.suberror}{what}, at EIP {eip:#x}"
                         + (f" (data {data})" if data else ""))
        if isinstance(ex, FailEntry):
            return _Stop(StopReason.FAIL_ENTRY,
                         f"VM entry failed (hardware reason "
                         f"{ex.hardware_entry_failure_reason:#x})")
        if isinstance(ex, SystemEvent):
            return _Stop(StopReason.SYSTEM_EVENT, f"KVM system event {ex.type}")
        assert isinstance(ex, DirtyRingFull | Unknown)
        return _Stop(StopReason.UNHANDLED_EXIT,
                     f"unhandled exit {type(ex).__name__} (reason {ex.reason}) at EIP {eip:#x}")

    def _port_write(self, ex: IoOut, emit: _Emit) -> _Stop | None:
        """Each item of a (``rep``) OUT goes to the bus; output is emitted per exit, and the
        first event that stops the machine ends the exit's handling."""
        out = bytearray()
        source = ""
        stop: _Stop | None = None
        for i in range(0, ex.size * ex.count, ex.size):
            event = self.bus.write(ex.port, ex.size, int.from_bytes(ex.data[i:i + ex.size],
                                                                    "little"))
            if isinstance(event, Output):
                out += event.data
                source = event.source
            elif event is not None:
                stop = _stop_for(event)
                break
        if out:
            emit(source, bytes(out))
        return stop


class KernelRunner:
    """Runs a :class:`MultibootMachine`'s kernel in a thread, in slices of
    :meth:`~MultibootMachine.run`, so that it can be paused and resumed from another thread
    (what a live migration needs:
    :meth:`MultibootMachine.migrate`).  Output goes to ``on_output``; when the kernel stops
    for good (an exit, a halt, a fault), :attr:`result` holds why and the thread ends.  Use it
    as a context manager, or :meth:`start` and :meth:`stop`."""

    def __init__(self, machine: MultibootMachine, *,
                 on_output: Callable[[bytes], None] | None = None,
                 on_ring_full: Callable[[Vcpu], None] | None = None, slice_: float = 0.25):
        self.machine = machine
        self._on_output = on_output
        self._on_ring_full = on_ring_full
        self._slice = slice_
        self._cond = threading.Condition()
        self._pause = False
        self._stop = False
        self._parked = False
        self._thread: threading.Thread | None = None
        #: The result of the run that ended the kernel, once it ended.
        self.result: MultibootResult | None = None
        #: The error that ended the thread, if one did.
        self.error: BaseException | None = None

    def start(self) -> KernelRunner:
        """Start running the kernel."""
        if self._thread is not None:
            raise KvmStateError("this runner was started already")
        self._thread = threading.Thread(target=self._loop, name="kvmio-kernel", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> KernelRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._pause and not self._stop:
                        self._parked = True
                        self._cond.notify_all()
                        self._cond.wait()
                    self._parked = False
                    if self._stop:
                        return
                try:
                    r = self.machine.run(timeout=self._slice, on_output=self._on_output,
                                         on_ring_full=self._on_ring_full,
                                         on_interrupted=self._check_pause)
                except _Paused:
                    continue  # the run ended at the kick: park (or stop) above
                if r.reason is not StopReason.TIMEOUT:
                    self.result = r
                    return
        except BaseException as e:
            self.error = e
        finally:
            with self._cond:
                self._parked = True
                self._cond.notify_all()

    def _check_pause(self) -> None:
        if self._pause or self._stop:
            raise _Paused

    @property
    def running(self) -> bool:
        """Whether the thread is alive (the kernel has not stopped for good)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        """Whether the kernel is held outside KVM_RUN (or ended)."""
        with self._cond:
            return self._parked

    def pause(self, timeout: float | None = None) -> None:
        """Return once the kernel's vCPU is outside KVM_RUN (its last exit handled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._pause = True
            while not self._parked:
                if deadline is not None and time.monotonic() > deadline:
                    self._pause = False
                    self._cond.notify_all()
                    raise KvmStateError(f"the kernel did not pause within {timeout:g} s")
                with contextlib.suppress(KvmError):
                    self.machine.vcpu.kick()
                self._cond.wait(0.05)

    def resume(self) -> None:
        """Let the kernel run on."""
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop the kernel's thread and join it (idempotent); re-raise its error."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        t = self._thread
        while t is not None and t.is_alive():
            with contextlib.suppress(KvmError):
                self.machine.vcpu.kick()
            t.join(0.05)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class _Paused(Exception):
    """Ends a run slice early because the runner is pausing or stopping."""


def _stop_for(event: DeviceEvent) -> _Stop:
    if isinstance(event, DebugExit):
        return _Stop(StopReason.DEBUG_EXIT,
                     f"debug exit: the kernel wrote {event.value:#x} to port {event.port:#x} "
                     f"(exit code {event.exit_code})", event.exit_code)
    if isinstance(event, ResetRequest):
        return _Stop(StopReason.RESET, event.detail)
    assert isinstance(event, PowerOff)
    return _Stop(StopReason.POWEROFF, event.detail)


def run_multiboot(kvm: Kvm, kernel: bytes | str | os.PathLike[str], *,
                  mem: int = DEFAULT_MEMORY, cmdline: str = "", name: str | None = None,
                  timeout: float | None = None, irqchip: bool = True,
                  on_output: Callable[[bytes], None] | None = None,
                  max_output: int = DEFAULT_MAX_OUTPUT) -> MultibootResult:
    """Load and run a Multiboot kernel in a new VM, closed afterwards; return the result.

    The arguments are those of :class:`MultibootMachine` and :meth:`MultibootMachine.run`.
    """
    with MultibootMachine(kvm, kernel, mem=mem, cmdline=cmdline, name=name,
                          irqchip=irqchip) as machine:
        return machine.run(timeout=timeout, on_output=on_output, max_output=max_output)
