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

import enum
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmio._abi import PAGE_SIZE
from kvmio._closing import Closing
from kvmio.errors import DirtyRingError, DirtyRingOverrunError, KvmInvalidArgumentError
from kvmio.exits import DirtyRingFull, Hlt, Interrupted, IoOut, VcpuExit
from kvmio.guests.modes import PAGE_TABLE_ADDR, page_tables_size, setup_long_mode
from kvmio.guests.programs import program
from kvmio.memory import MemoryRegion
from kvmio.system import Kvm
from kvmio.vcpu import Vcpu

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
        order = Order[order.upper()] if isinstance(order, str) else Order(order)
        value = Value[value.upper()] if isinstance(value, str) else Value(value)
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

    def run_vcpu(self, i: int, stop: threading.Event | None = None, *,
                 on_ring_full: Callable[[Vcpu], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 max_stuck: int = 3) -> VcpuExit:
        """Run vCPU ``i`` until ``stop`` is set (then kick it), it halts, or it exits in a way
        the workload does not handle (returned).

        Ring-full exits go to ``on_ring_full`` (default: harvest this vCPU's own ring into its
        pending entries and reset).  ``max_stuck`` ring-full exits in a row with no guest write
        and no harvest raise: :class:`DirtyRingOverrunError` if nothing is left to harvest (the
        ring was overrun), :class:`DirtyRingError` if entries wait for a harvester that does
        not come.
        """
        vcpu = self.vcpus[i]
        stuck, last = 0, (-1, -1)
        while True:
            if stop is not None and stop.is_set():
                return Interrupted()
            ex = vcpu.run()
            if isinstance(ex, IoOut) and ex.port == PROGRESS_PORT:
                if on_progress is not None:
                    on_progress(i, ex.value)
                continue
            if isinstance(ex, Interrupted):
                if stop is None or stop.is_set():
                    return ex
                continue
            if isinstance(ex, DirtyRingFull):
                # No progress = the guest made no write and nobody harvested since the last
                # ring-full exit.  Repeated, with nothing left to harvest, the ring was overrun;
                # with entries waiting, the ring's owner is not harvesting.
                ring = vcpu.ring
                now = (self.writes(i), ring.harvested_total if ring is not None else 0)
                stuck = stuck + 1 if now == last else 0
                last = now
                if stuck >= max_stuck and ring is not None and ring.count_dirty() > 0:
                    raise DirtyRingError(
                        f"vCPU {i} keeps exiting with a full dirty ring that nobody harvests "
                        f"({ring.count_dirty()} entries waiting): the ring's owner must harvest "
                        "and reset on ring-full exits")
                if stuck >= max_stuck:
                    raise DirtyRingOverrunError(
                        f"vCPU {i} keeps exiting with a full dirty ring while the guest makes no "
                        "progress and nothing is left to harvest: the ring was overrun and "
                        "dirty pages were lost; use a bigger ring, a lower write density, or "
                        "bitmap mode", vcpu=i)
                if on_ring_full is not None:
                    on_ring_full(vcpu)
                else:
                    vcpu.ring.drain() if vcpu.ring is not None else None
                continue
            if isinstance(ex, IoOut) and ex.port == PROGRESS_PORT + 1:
                continue
            return ex

    def run_all(self, *, timeout: float | None = None) -> list[VcpuExit]:
        """Run every vCPU in its own thread until each returns (e.g. ``max_writes`` reached and
        halted), or until ``timeout`` seconds (then kick them).  Returns their final exits."""
        results: list[VcpuExit | BaseException | None] = [None] * len(self.vcpus)
        stop = threading.Event()

        def worker(i: int) -> None:
            try:
                results[i] = self.run_vcpu(i, stop)
            except BaseException as e:  # re-raised below in the caller's thread
                results[i] = e

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(len(self.vcpus))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        if any(t.is_alive() for t in threads):
            stop.set()
            for v in self.vcpus:
                v.kick()
            for t in threads:
                t.join()
        out: list[VcpuExit] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            out.append(r if r is not None else Hlt())
        return out

    def close(self) -> None:
        """Close the VM (vCPUs and memory)."""
        self.vm.close()

