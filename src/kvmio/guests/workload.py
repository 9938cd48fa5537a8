"""The page-dirtying workload: a VM running the built-in ``dirtier`` guest on one or more vCPUs.

Memory layout (guest physical):

- slot 0, ``[0, 4 MiB)``, not tracked: GDT, parameter blocks (one per vCPU at
  ``0x1000 + 0x100 * i``), code at ``0x10000``, long-mode page tables at ``0x100000``;
- slot 1, ``[1 GiB, 1 GiB + mem_size)``, tracked (dirty-logged), sparse (MAP_NORESERVE): the
  memory the guest dirties; at 4 GiB instead when it would cover the xAPIC page 0xFEE00000.

Each vCPU makes one 8-byte write per iteration into a page of its working set and counts its
writes in its parameter block, so the host always knows the true number of writes.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmio import _check
from kvmio._abi import PAGE_SIZE
from kvmio._closing import Closing
from kvmio.errors import KvmInvalidArgumentError, MigrationError, SnapshotError
from kvmio.exits import Interrupted, IoOut, VcpuExit
from kvmio.guests.modes import PAGE_TABLE_ADDR, page_tables_size, setup_long_mode
from kvmio.guests.programs import program
from kvmio.memory import MemoryRegion
from kvmio.migration.precopy import (
    DEFAULT_DOWNTIME,
    MigrationReport,
    PassReport,
    ReceivedVm,
    receive_vm,
    send_vm,
)
from kvmio.migration.stream import Connection
from kvmio.runner import ExitHandler, RingFullHandler, VcpuRunner, run_until_handled
from kvmio.snapshot.files import (
    AS_SAVED,
    ChainSpec,
    SnapshotInfo,
    Snapshotter,
    restore_snapshot,
    save_snapshot,
)
from kvmio.system import Kvm
from kvmio.tracker import DirtyTracker
from kvmio.vcpu import RING_FULL_STUCK_LIMIT, Vcpu
from kvmio.vm import Vm

LOW_SLOT = 0
LOW_SIZE = 4 << 20
MEM_SLOT = 1
MEM_BASE = 1 << 30
PARAMS_BASE = 0x1000
PARAMS_STRIDE = 0x100
MAX_VCPUS = 16
PROGRESS_PORT = 0x500
STACK_TOP = 0x7000
#: Guest page that this host's KVM always turns into MMIO exits (the xAPIC's default base),
#: even with the APIC disabled; tracked memory must not cover it.
APIC_PAGE = 0xFEE00000
#: Where the tracked slot goes when it would cover APIC_PAGE from MEM_BASE.
HIGH_MEM_BASE = 4 << 30
#: The ``kind`` of a workload's snapshot (in its guest metadata).
SNAPSHOT_KIND = "workload"

_FMT = "<15Q"  # the parameter block: 15 little-endian u64 (see asm/dirtier.S)
_OFF_COUNT = 64
_OFF_GENERATION = 72


class Order(enum.IntEnum):
    """Which page each write goes to."""

    SEQUENTIAL = 0
    RANDOM = 1


class Value(enum.IntEnum):
    """What each write stores."""

    GENERATION = 0
    COUNT = 1
    CONSTANT = 2


@dataclass
class DirtierParams:
    """One vCPU's parameter block."""

    base: int
    pages: int
    stride: int = 1
    order: Order = Order.RANDOM
    value: Value = Value.GENERATION
    pace: int = 0
    seed: int = 0x9E3779B97F4A7C15
    report_every: int = 0
    max_writes: int = 0
    offset: int = 0
    constant: int = 0
    port: int = PROGRESS_PORT

    def validate(self) -> None:
        """Reject parameters the guest would misbehave with."""
        if self.pages <= 0:
            raise KvmInvalidArgumentError("the working set needs at least one page")
        if not 1 <= self.stride <= self.pages:
            raise KvmInvalidArgumentError(f"stride {self.stride} must be in 1..{self.pages}")
        if self.seed == 0 or self.seed >= 1 << 64:
            raise KvmInvalidArgumentError("seed must be a non-zero u64 (xorshift)")
        if not 0 <= self.offset <= PAGE_SIZE - 8 or self.offset % 8:
            raise KvmInvalidArgumentError("offset must be a multiple of 8 within the page")
        for name in ("pace", "report_every", "max_writes", "constant"):
            v = getattr(self, name)
            if not 0 <= v < 1 << 64:
                raise KvmInvalidArgumentError(f"{name} must be a u64, not {v}")
        if not 0 <= self.port < 0xFFFF:
            raise KvmInvalidArgumentError("port must be 0..0xFFFE")

    def pack(self, generation: int = 0, count: int = 0, cursor: int = 0) -> bytes:
        """The block as the guest reads it."""
        self.validate()
        return struct.pack(_FMT, self.base, self.pages, self.stride, int(self.order),
                           int(self.value), self.pace, self.seed, self.report_every, count,
                           generation, self.max_writes, self.offset, self.constant, self.port,
                           cursor)


#: Guest instructions per tracked write of the dirtier, without pace (measured from its source:
#: random order ~37, sequential ~28); each pace unit adds 2.
INSTRUCTIONS_PER_WRITE = {Order.RANDOM: 37, Order.SEQUENTIAL: 28}


class Workload(Closing):
    """A VM running the dirtier on ``vcpus`` vCPUs over ``mem_size`` bytes of tracked memory.

    ``ring_entries`` enables the dirty ring (before the vCPUs are created) with that many
    entries; ``manual_protect``/``initially_set`` configure the bitmap.  vCPU ``i`` writes into
    its own slice of the working set unless ``shared=True``.
    """

    def __init__(self, kvm: Kvm, *, mem_size: int = 1 << 30, vcpus: int = 1,
                 working_set: int | None = None, order: Order | str = Order.RANDOM,
                 value: Value | str = Value.GENERATION, pace: int = 0, stride: int = 1,
                 seed: int = 0x9E3779B97F4A7C15, report_every: int = 0, max_writes: int = 0,
                 shared: bool = True, ring_entries: int | None = None,
                 manual_protect: bool = False, initially_set: bool = False,
                 noreserve: bool = True):
        vcpus = _check.integer("vcpus", vcpus)
        mem_size = _check.integer("mem_size", mem_size)
        if working_set is not None:
            working_set = _check.integer("working_set", working_set)
        pace, stride, seed = (_check.integer(n, v) for n, v in
                              (("pace", pace), ("stride", stride), ("seed", seed)))
        report_every = _check.integer("report_every", report_every)
        max_writes = _check.integer("max_writes", max_writes)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise KvmInvalidArgumentError(f"vcpus must be 1..{MAX_VCPUS}")
        if mem_size <= 0 or mem_size % PAGE_SIZE:
            raise KvmInvalidArgumentError("mem_size must be a positive multiple of the page size")
        base = MEM_BASE if MEM_BASE + mem_size <= APIC_PAGE else HIGH_MEM_BASE
        self.mem_base = base
        if page_tables_size(base + mem_size) > LOW_SIZE - PAGE_TABLE_ADDR:
            raise KvmInvalidArgumentError("mem_size is too large for the workload's page tables")
        working_set = mem_size if working_set is None else working_set
        if not PAGE_SIZE <= working_set <= mem_size:
            raise KvmInvalidArgumentError("working_set must be between one page and mem_size")
        order = _enum_arg("order", Order, order)
        value = _enum_arg("value", Value, value)
        ws_pages = working_set // PAGE_SIZE
        per = ws_pages if shared else ws_pages // vcpus
        if per == 0:
            raise KvmInvalidArgumentError("working set is smaller than one page per vCPU")
        self.params = [
            DirtierParams(base=base + (0 if shared else i * per * PAGE_SIZE), pages=per,
                          stride=min(stride, per), order=order, value=value, pace=pace,
                          seed=(seed + 0x1000193 * i) & ((1 << 64) - 1) or 1,
                          report_every=report_every, max_writes=max_writes)
            for i in range(vcpus)]
        for p in self.params:
            p.validate()
        self.kvm = kvm
        self.vm = kvm.create_vm()
        try:
            if ring_entries is not None:
                self.vm.enable_dirty_ring(ring_entries)
            if manual_protect:
                self.vm.enable_manual_dirty_log_protect(initially_set=initially_set)
            self.low: MemoryRegion = self.vm.add_memory_region(0, LOW_SIZE, slot=LOW_SLOT)
            self.mem: MemoryRegion = self.vm.add_memory_region(
                base, mem_size, slot=MEM_SLOT, log_dirty=True, noreserve=noreserve)
            code = program("dirtier")
            code.load(self.vm)
            # The host's CPUID, for its physical address width: KVM's default guest CPUID
            # has 36 bits, and memory above 64 GiB would then be unreachable (MMIO exits).
            cpuid = kvm.get_supported_cpuid()
            self.vcpus: list[Vcpu] = []
            for i in range(vcpus):
                v = self.vm.create_vcpu(i)
                v.set_cpuid2(cpuid)
                setup_long_mode(v, self.vm, code.base, identity_map=base + mem_size,
                                stack=STACK_TOP - i * 0x100, write_tables=(i == 0))
                r = v.get_regs()
                r.rdi = self.params_addr(i)
                v.set_regs(r)
                self.vm.write_memory(self.params_addr(i), self.params[i].pack())
                self.vcpus.append(v)
        except BaseException:
            self.vm.close()
            raise
        self._generation = 0
        #: The snapshot this workload was restored from (``None`` if it was built).
        self.restored_from: SnapshotInfo | None = None

    # -- snapshots ------------------------------------------------------------------------------

    def _snapshot_guest(self) -> dict[str, Any]:
        params = [{k: int(v) for k, v in dataclasses.asdict(p).items()} for p in self.params]
        return {"kind": SNAPSHOT_KIND, "mem_base": self.mem_base, "params": params,
                "generation": self._generation}

    def snapshotter(self, *, tracker: DirtyTracker | None = None) -> Snapshotter:
        """A :class:`~kvmio.snapshot.files.Snapshotter` of this workload (for a chain of diff
        snapshots with :meth:`snapshot`): its first save is full, or a diff on the snapshot
        the workload was restored from.  The tracked slot's diffs hold what changed; the small
        untracked slot (parameters, counters, page tables) is held whole by each diff."""
        return Snapshotter(self.vm, tracker=tracker, guest=self._snapshot_guest(),
                           base=self.restored_from)

    def snapshot(self, path: str | os.PathLike[str], *, chain: Snapshotter | None = None,
                 full: bool = False, runner: VcpuRunner | None = None, live_passes: int = 1,
                 durable: bool = False) -> SnapshotInfo:
        """Write a snapshot to the new directory ``path``: a full one of the stopped
        workload, or with ``chain`` (from :meth:`snapshotter`) the chain's next layer, copied
        while ``runner`` (if given and running) runs the vCPUs (see
        :meth:`~kvmio.snapshot.files.Snapshotter.save`).  Raises
        :class:`~kvmio.errors.SnapshotError`."""
        if chain is None:
            return save_snapshot(path, self.vm, self.vcpus, guest=self._snapshot_guest(),
                                 durable=durable)
        return chain.save(path, self.vcpus, guest=self._snapshot_guest(), full=full,
                          runner=runner, live_passes=live_passes, durable=durable)

    @classmethod
    def from_snapshot(cls, kvm: Kvm, path: ChainSpec, *, lazy: bool = True,
                      verify: bool = True, ring_entries: int | None = AS_SAVED) -> Workload:
        """A workload restored from a snapshot :meth:`snapshot` wrote (``path``, ``lazy`` and
        ``verify`` as :func:`~kvmio.snapshot.files.restore_snapshot` takes them;
        ``ring_entries`` as its ``dirty_ring``): its vCPUs go on where they were.  Raises
        :class:`~kvmio.errors.SnapshotError` for a snapshot of something else."""
        restored = restore_snapshot(kvm, path, lazy=lazy, verify=verify,
                                    dirty_ring=ring_entries, guest_kind=SNAPSHOT_KIND)
        try:
            self = cls._adopt(kvm, restored.vm, restored.vcpus, restored.guest)
            self.restored_from = restored.info
        except BaseException:
            restored.close()
            raise
        return self

    @classmethod
    def _adopt(cls, kvm: Kvm, vm: Vm, vcpus: Mapping[int, Vcpu],
               guest: Mapping[str, Any]) -> Workload:
        """A workload around a VM built from a snapshot or a migration (SnapshotError if its
        metadata or machine is not a workload's)."""
        self = cls.__new__(cls)
        self._from_guest(guest)
        regions = vm.regions
        if sorted(regions) != [LOW_SLOT, MEM_SLOT] or \
                regions[MEM_SLOT].guest_phys_addr != self.mem_base or \
                sorted(vcpus) != list(range(len(self.params))):
            raise SnapshotError("the machine is not a workload's")
        self.kvm = kvm
        self.vm = vm
        self.low = regions[LOW_SLOT]
        self.mem = regions[MEM_SLOT]
        self.vcpus = [vcpus[i] for i in range(len(self.params))]
        self.restored_from = None
        return self

    # -- migration ------------------------------------------------------------------------------

    def migrate(self, conn: Connection, *, runner: VcpuRunner | None = None,
                tracker: DirtyTracker | None = None, downtime: float = DEFAULT_DOWNTIME,
                max_passes: int = 30, timeout: float | None = None,
                answer_timeout: float = 60.0, auto_converge: bool = False,
                compress: bool = False,
                on_pass: Callable[[PassReport], None] | None = None) -> MigrationReport:
        """Migrate this workload to a destination (:meth:`from_migration`) at the other end
        of ``conn``, live while ``runner`` runs it (see :func:`kvmio.migration.send_vm`)."""
        return send_vm(conn, self.vm, self.vcpus, runner=runner, tracker=tracker,
                       guest=self._snapshot_guest(), downtime=downtime, max_passes=max_passes,
                       timeout=timeout, answer_timeout=answer_timeout,
                       auto_converge=auto_converge, compress=compress, on_pass=on_pass)

    @classmethod
    def from_migration(cls, kvm: Kvm, conn: Connection, *,
                       ring_entries: int | None = AS_SAVED) -> Workload:
        """The workload a source's :meth:`migrate` sends on ``conn`` (its vCPUs go on where
        the source's stopped).  Raises :class:`~kvmio.errors.MigrationError`."""
        def adopt(got: ReceivedVm) -> Workload:  # before the hand-over: it may refuse
            try:
                return cls._adopt(kvm, got.vm, got.vcpus, got.guest)
            except SnapshotError as e:
                raise MigrationError(f"the migrated VM is not a workload: {e.message}") from e

        w: Workload = receive_vm(kvm, conn, dirty_ring=ring_entries, accept=adopt).accepted
        return w

    def _from_guest(self, g: Mapping[str, Any]) -> None:
        if g.get("kind") != SNAPSHOT_KIND:
            raise SnapshotError(f"not a snapshot of a workload (its guest is "
                                f"{g.get('kind')!r})")
        try:
            self.mem_base = int(g["mem_base"])
            self._generation = int(g["generation"])
            params = []
            for raw in g["params"]:
                values: dict[str, Any] = {k: int(v) for k, v in raw.items()}
                values["order"], values["value"] = Order(values["order"]), Value(values["value"])
                p = DirtierParams(**values)
                p.validate()
                params.append(p)
        except (KeyError, TypeError, ValueError, AttributeError, KvmInvalidArgumentError) as e:
            raise SnapshotError(f"the snapshot's workload metadata is malformed ({e})") from None
        if not 1 <= len(params) <= MAX_VCPUS:
            raise SnapshotError("the snapshot's workload metadata has no vCPUs")
        self.params = params

    @staticmethod
    def params_addr(i: int) -> int:
        """Guest physical address of vCPU ``i``'s parameter block."""
        return PARAMS_BASE + i * PARAMS_STRIDE

    @property
    def instructions_per_write(self) -> int:
        """Approximate guest instructions per tracked write (for the ring's lossless rule)."""
        p = self.params[0]
        return INSTRUCTIONS_PER_WRITE[p.order] + 2 * p.pace + (5 if p.report_every else 0)

    @property
    def generation(self) -> int:
        """The value written by ``Value.GENERATION`` workloads."""
        return self._generation

    @generation.setter
    def generation(self, g: int) -> None:
        """Set the value that ``Value.GENERATION`` writes carry, from the next write on.

        Set it while the vCPUs are stopped.  A vCPU stopped between loading the generation and
        storing it would otherwise make one more write with the old value: its ``rdx`` is
        updated too, so that every write after this call carries ``g``.
        """
        data = struct.pack("<Q", g)
        code = program("dirtier")
        window = (code.address("gen_loaded"), code.address("tracked_write"))
        for i, vcpu in enumerate(self.vcpus):
            self.vm.write_memory(self.params_addr(i) + _OFF_GENERATION, data)
            if self.params[i].value == Value.GENERATION:
                r = vcpu.get_regs()
                if window[0] <= r.rip <= window[1]:
                    r.rdx = g
                    vcpu.set_regs(r)
        self._generation = g

    def writes(self, i: int) -> int:
        """Writes vCPU ``i`` has made so far (its own counter)."""
        raw = self.vm.read_memory(self.params_addr(i) + _OFF_COUNT, 8)
        return int(struct.unpack("<Q", raw)[0])

    def total_writes(self) -> int:
        """Writes made by all vCPUs."""
        return sum(self.writes(i) for i in range(len(self.vcpus)))

    def exit_handler(self, on_progress: Callable[[int, int], None] | None = None
                     ) -> ExitHandler:
        """The workload's exit handler for a :class:`~kvmio.runner.VcpuRunner`: progress
        reports (port ``PROGRESS_PORT``) go to ``on_progress(vcpu_id, value)`` and the guest
        runs on; any other exit (``Hlt`` once ``max_writes`` is reached) ends the vCPU."""

        def handle(vcpu: Vcpu, ex: VcpuExit) -> bool:
            if isinstance(ex, IoOut) and ex.port == PROGRESS_PORT:
                if on_progress is not None:
                    on_progress(vcpu.id, ex.value)
                return True
            return isinstance(ex, IoOut) and ex.port == PROGRESS_PORT + 1

        return handle

    def runner(self, *, on_ring_full: RingFullHandler | None = None,
               on_progress: Callable[[int, int], None] | None = None,
               max_stuck: int = RING_FULL_STUCK_LIMIT) -> VcpuRunner:
        """A :class:`~kvmio.runner.VcpuRunner` for every vCPU, with :meth:`exit_handler`
        (start it, or use it as a context manager)."""
        return VcpuRunner(self.vcpus, self.exit_handler(on_progress),
                          on_ring_full=on_ring_full, max_stuck=max_stuck,
                          name="kvmio-workload")

    def run_vcpu(self, i: int, stop: threading.Event | None = None, *,
                 on_ring_full: RingFullHandler | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 max_stuck: int = RING_FULL_STUCK_LIMIT) -> VcpuExit:
        """Run vCPU ``i`` in the calling thread until ``stop`` is set (then kick it), it halts,
        or it exits in a way the workload does not handle (returned).

        Ring-full exits go to ``on_ring_full`` (default: drain this vCPU's own ring, which
        keeps the entries for its owner).  ``max_stuck`` ring-full exits in a row with no
        harvest raise: :class:`DirtyRingOverrunError` if nothing is left to harvest (the ring
        was overrun), :class:`DirtyRingError` if entries wait for a harvester that does not
        come.  For several vCPUs in threads, use :meth:`runner`.
        """
        i = _check.integer("i", i, hi=len(self.vcpus))
        handler = self.exit_handler(on_progress)
        while True:
            if stop is not None and stop.is_set():
                return Interrupted()
            ex = run_until_handled(self.vcpus[i], handler, on_ring_full=on_ring_full,
                                   max_stuck=max_stuck)
            if isinstance(ex, Interrupted) and stop is not None and not stop.is_set():
                continue  # a stray signal
            return ex

    def run_all(self, *, timeout: float | None = None) -> list[VcpuExit]:
        """Run every vCPU in its own thread until each returns (e.g. ``max_writes`` reached and
        halted), or until ``timeout`` seconds (then stop them: their exit is ``Interrupted``).
        Returns their final exits; re-raises the first error of a vCPU thread."""
        with self.runner() as r:
            r.wait(timeout)
        return [ex if ex is not None else Interrupted() for ex in r.exits.values()]

    def close(self) -> None:
        """Close the VM (vCPUs and memory)."""
        self.vm.close()


E = TypeVar("E", bound=enum.IntEnum)


def _enum_arg(name: str, kind: type[E], value: object) -> E:
    """``value`` (a member, its value, or its name in any case) as a member of ``kind``."""
    try:
        if isinstance(value, str):
            return kind[value.upper()]
        return kind(value)  # type: ignore[arg-type]
    except (KeyError, ValueError):
        names = ", ".join(m.name.lower() for m in kind)
        raise KvmInvalidArgumentError(f"{name} must be one of {names}, not {value!r}") from None
