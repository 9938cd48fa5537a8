"""The checkpoint-reset benchmark behind ``kvmio bench reset`` and ``bench/reset.py``:
:meth:`MemoryCheckpoint.reset <kvmio.snapshot.memory.MemoryCheckpoint.reset>` against a
full-memory copy, by dirty pages, guest size and dirty-log mode (ring or bitmap).

Each cycle lets a long-mode guest write one 8-byte value into each of ``N`` distinct pages
(chosen at random among the populated pages, the same ones every cycle; 57 guest instructions
per write, lossless for the ring even when a write also dirties a page-table page), then
resets.  The reference is the reset a checkpoint without dirty tracking must do: copy every
page the checkpoint holds back into guest memory (one ``memcpy`` for a dense guest, a scatter
of the stored pages for a sparse one), measured in the same run after the same guest work.
The guest memory lies at 4 GiB; a guest with fewer populated bytes than its size is sparse
(``MAP_NORESERVE``), its populated pages spread at random over all of it.

Each :class:`ResetCell` holds the p50 of the whole reset in wall time and in CPU time of the
calling thread (``time.thread_time_ns``: a busy host's other processes do not count), of its
collection (harvest and reset of the ring, or GET_DIRTY_LOG; with a clean log, the one
native call that also copies the pages back) and of the rest (restoring the pages,
bookkeeping), and the reference's p50 (wall).  The first Python code after KVM_RUN
runs cold, and each reset follows a guest run, as in real use.  The pages a reset restores
include the pages of the guest's write list (a host write) and the page-table pages whose
entries the guest's CPU marks accessed and dirty (one per GiB touched, and the top levels).
Every cell checks what it measured: each reset takes the mode's own path (not the full
compare), restores at least the pages the guest wrote, and leaves them as they were at the
checkpoint.

The guest runs in the calling thread.  Ctrl-C (:class:`KeyboardInterrupt`) ends the
benchmark with every VM closed; the cells measured until then have gone to ``progress``.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from kvmio._abi import PAGE_SIZE
from kvmio.errors import KvmError, KvmInvalidArgumentError
from kvmio.exits import DirtyRingFull, Interrupted, IoOut
from kvmio.guests.modes import PAGE_TABLE_ADDR, page_tables_size, setup_long_mode
from kvmio.snapshot.memory import MemoryCheckpoint
from kvmio.system import Kvm
from kvmio.units import format_size

__all__ = ["DEFAULT_DIRTY", "DEFAULT_GUESTS", "DEFAULT_POPULATED", "DEFAULT_REPEAT",
           "LARGE_DIRTY", "MAX_DIRTY", "MAX_MEMORY", "MODES", "RING_ENTRIES", "ResetBench",
           "ResetCell", "ResetGuest", "ResetMode", "check_config", "measure_resets",
           "planned_cycles", "repeats_for"]

#: A dirty-log mode of the benchmark.
ResetMode = Literal["ring", "bitmap"]
#: Both modes, in the order they are measured.
MODES: tuple[ResetMode, ...] = ("ring", "bitmap")

#: The write-list guest (long mode, position independent), from this source:
#:
#:     mov rcx, [rsi]          ; number of pairs
#:     add rsi, 8
#: 1:  test rcx, rcx
#:     jz 3f
#:     mov rax, [rsi]          ; gpa
#:     mov rdx, [rsi + 8]      ; value
#:     mov [rax], rdx
#:     add rsi, 16
#:     mov ebx, 24             ; delay: 57 instructions per write
#: 2:  dec ebx
#:     jnz 2b
#:     dec rcx
#:     jmp 1b
#: 3:  out 0xe9, al
#:     hlt
WRITER = bytes.fromhex("488b0e4883c6084885c9741c488b06488b56084889104883c610bb18000000"
                       "ffcb75fc48ffc9ebdfe6e9f4")
#: Where the writer's code, its write list and the benchmark memory are in the guest.
CODE_AT = 0x10000
LIST_AT = 0x20000
HIGH_BASE = 4 << 30
#: The low slot (code, write list, GDT, stack, page tables from 1 MiB).
LOW_SIZE = 4 << 20
#: The byte every populated page holds at the checkpoint.
FILL = 0x5A
#: Dirty-ring entries per vCPU in ring mode.
RING_ENTRIES = 16384
#: The largest dirty set: one ring's worth, less room for the page-table pages the guest's
#: writes dirty too and the kernel's reserve.  (The write list also fits below the tables.)
MAX_DIRTY = RING_ENTRIES - 1024
#: The largest guest (its identity map, 4 GiB more, has its page tables in the low slot).
MAX_MEMORY = 256 << 30
#: Populated bytes of a guest by default: all of it up to this, a larger one is sparse.
DEFAULT_POPULATED = 1 << 30
#: Dirty-set sizes measured by default.
DEFAULT_DIRTY = (1, 10, 100, 1_000, 10_000)
#: Resets per cell by default (see :func:`repeats_for`).
DEFAULT_REPEAT = 21
#: Dirty sets at least this large take a third of the repeats (:func:`repeats_for`).
LARGE_DIRTY = 10_000

assert page_tables_size(HIGH_BASE + MAX_MEMORY) <= LOW_SIZE - PAGE_TABLE_ADDR
assert LIST_AT + 8 + 16 * MAX_DIRTY <= PAGE_TABLE_ADDR


@dataclass(frozen=True)
class ResetGuest:
    """A benchmark guest: ``size`` bytes of memory, of which ``populated`` hold data (a
    sparse guest, ``MAP_NORESERVE``, when fewer: its populated pages spread at random over all
    of it).  Both are multiples of a page, ``0 < populated <= size <= MAX_MEMORY``."""

    size: int
    populated: int

    def __post_init__(self) -> None:
        for name in ("size", "populated"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise KvmInvalidArgumentError(f"{name} must be an int, not {value!r}")
            if value % PAGE_SIZE:
                raise KvmInvalidArgumentError(f"{name} {value} is not a multiple of a page")
        if not 0 < self.size <= MAX_MEMORY:
            raise KvmInvalidArgumentError(f"a benchmark guest of {format_size(self.size)}: it "
                                          f"must be between 4 KiB and {format_size(MAX_MEMORY)}")
        if not 0 < self.populated <= self.size:
            raise KvmInvalidArgumentError(
                f"{format_size(self.populated)} populated in a guest of "
                f"{format_size(self.size)}: it must be between 4 KiB and the guest's size")

    @classmethod
    def of(cls, size: int, populated: int = DEFAULT_POPULATED) -> ResetGuest:
        """A guest of ``size`` bytes with all of it populated, up to ``populated`` bytes."""
        return cls(size, min(size, populated))

    @property
    def sparse(self) -> bool:
        """Whether fewer bytes are populated than the guest has."""
        return self.populated < self.size

    @property
    def pages(self) -> int:
        """Pages of guest memory."""
        return self.size // PAGE_SIZE

    @property
    def populated_pages(self) -> int:
        """Pages that hold data: the most a cell may dirty."""
        return self.populated // PAGE_SIZE

    @property
    def label(self) -> str:
        """``"64 MiB"``, or ``"64 GiB sparse"``."""
        return format_size(self.size) + (" sparse" if self.sparse else "")

    def describe(self) -> str:
        """The label, with the populated size of a sparse guest (``"64 GiB sparse (1 GiB
        populated)"``)."""
        return f"{self.label} ({format_size(self.populated)} populated)" if self.sparse \
            else self.label


#: The guests measured by default: 64 MiB and 1 GiB fully populated, and 64 GiB sparse with
#: 1 GiB populated.
DEFAULT_GUESTS = (ResetGuest(64 << 20, 64 << 20), ResetGuest(1 << 30, 1 << 30),
                  ResetGuest(64 << 30, DEFAULT_POPULATED))


@dataclass(frozen=True)
class ResetCell:
    """One cell of the benchmark: a mode, a guest and a dirty-set size; times are p50s over
    the repeats, in microseconds."""

    mode: ResetMode
    #: The guest's label (:attr:`ResetGuest.label`).
    guest: str
    #: Bytes of guest memory, and of them populated.
    size: int
    populated: int
    #: Distinct pages the guest wrote before each reset.
    dirty: int
    #: Resets timed (and full copies).
    repeats: int
    #: Pages a reset restored (p50): the dirty pages, the write list, the page-table pages.
    restored: int
    #: The whole reset, wall time.
    reset_us: float
    #: The whole reset, CPU time of the calling thread.
    reset_cpu_us: float
    #: Of the reset, collecting the dirty log (wall).
    collect_us: float
    #: Of the reset, the rest: restoring the pages, bookkeeping (wall).
    rest_us: float
    #: The reference: every stored page copied back (wall).
    full_copy_us: float

    @property
    def ratio(self) -> float:
        """Reset time over the reference's (below 1: the reset is cheaper)."""
        return self.reset_us / self.full_copy_us if self.full_copy_us else float("inf")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: the fields and the ratio."""
        return {"mode": self.mode, "guest": self.guest, "size": self.size,
                "populated": self.populated, "dirty": self.dirty, "repeats": self.repeats,
                "restored": self.restored, "reset_us": self.reset_us,
                "reset_cpu_us": self.reset_cpu_us, "collect_us": self.collect_us,
                "rest_us": self.rest_us, "full_copy_us": self.full_copy_us,
                "ratio": self.ratio}


def repeats_for(dirty: int, repeat: int) -> int:
    """Resets timed (and full copies) in a cell of ``dirty`` pages: ``repeat``, or for
    :data:`LARGE_DIRTY` pages or more (whose guest runs take longest) a third of it, at
    least 3 and at most ``repeat``."""
    return min(repeat, max(3, repeat // 3)) if dirty >= LARGE_DIRTY else repeat


def planned_cycles(guests: Sequence[ResetGuest], dirty: Sequence[int],
                   modes: Sequence[ResetMode] = MODES, repeat: int = DEFAULT_REPEAT) -> int:
    """Guest runs (each followed by a reset or a full copy) that :func:`measure_resets`
    makes: one warm-up and twice :func:`repeats_for` per cell."""
    per_guest = sum(1 + 2 * repeats_for(n, repeat) for n in dirty)
    return len(modes) * len(guests) * per_guest


def _p50(xs: list[int]) -> float:
    return float(statistics.median(xs))


class ResetBench:
    """One benchmark VM: a low slot (code, write list, page tables) and the guest memory at
    4 GiB, filled, with a :class:`MemoryCheckpoint` of it.  Use it as a context manager (or
    call :meth:`close`).

    ``on_interrupted`` is called whenever a kick ends a guest run early (it may raise to end
    the benchmark; the run resumes otherwise).  ``seed`` chooses the populated pages of a
    sparse guest and the dirty sets.
    """

    def __init__(self, kvm: Kvm, mode: ResetMode, guest: ResetGuest, *, seed: int = 1,
                 on_interrupted: Callable[[], None] | None = None):
        if mode not in MODES:
            raise KvmInvalidArgumentError(f"mode must be one of {', '.join(MODES)}, not "
                                          f"{mode!r}")
        self.mode: ResetMode = mode
        self.guest = guest
        self._on_interrupted = on_interrupted
        self.vm = kvm.create_vm()
        try:
            if mode == "ring":
                self.vm.enable_dirty_ring(RING_ENTRIES)
            self.vm.add_memory_region(0, LOW_SIZE, log_dirty=True)
            self.mem = self.vm.add_memory_region(HIGH_BASE, guest.size, log_dirty=True,
                                                 noreserve=True)
            self.vm.write_memory(CODE_AT, WRITER)
            self.vcpu = self.vm.create_vcpu()
            self.vcpu.set_cpuid2(kvm.get_supported_cpuid())  # memory above 64 GiB
            setup_long_mode(self.vcpu, self.vm, CODE_AT, identity_map=HIGH_BASE + guest.size)
            self.rng = np.random.default_rng(seed)
            #: The populated pages (indices into the guest memory), sorted.
            self.populated: npt.NDArray[np.uint64]
            if not guest.sparse:
                self.populated = np.arange(guest.pages, dtype=np.uint64)
                self.mem.array()[:] = FILL
            else:
                self.populated = np.sort(self.rng.choice(
                    guest.pages, guest.populated_pages, replace=False)).astype(np.uint64)
                self._pages()[self.populated.astype(np.intp)] = FILL
            self.checkpoint = MemoryCheckpoint.take(self.vm)
            self._index, self._stored = self.checkpoint.stored(self.mem.slot)
        except BaseException:
            self.vm.close()
            raise

    def use(self, checkpoint: MemoryCheckpoint) -> None:
        """Reset with, and copy back from, ``checkpoint`` from now on (a checkpoint of this
        VM's memory taken since, e.g. the memory half of a whole
        :class:`~kvmio.snapshot.Checkpoint`, which needs the dirty log that the one taken at
        set-up holds: close that one first); the previous one is closed."""
        if checkpoint.vm is not self.vm:
            raise KvmInvalidArgumentError("the checkpoint belongs to another VM")
        if checkpoint is not self.checkpoint:
            self.checkpoint.close()
        self.checkpoint = checkpoint
        self._index, self._stored = checkpoint.stored(self.mem.slot)

    def close(self) -> None:
        """Close the checkpoint and the VM."""
        try:
            if hasattr(self, "checkpoint"):
                self.checkpoint.close()
        finally:
            self.vm.close()

    def __enter__(self) -> ResetBench:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _pages(self) -> npt.NDArray[np.uint8]:
        """The guest memory, one row per page."""
        return self.mem.array(np.uint8).reshape(-1, PAGE_SIZE)  # type: ignore[return-value]

    def choose(self, n: int) -> npt.NDArray[np.uint64]:
        """``n`` distinct populated pages at random, sorted (the next draw of the seed)."""
        if not 0 < n <= min(MAX_DIRTY, len(self.populated)):
            raise KvmInvalidArgumentError(
                f"{n} dirty pages: the {self.guest.label} guest has {len(self.populated)} "
                f"populated pages, and a cell dirties at most {MAX_DIRTY}")
        return np.sort(self.rng.choice(self.populated, n, replace=False))

    def dirty(self, pages: npt.NDArray[np.uint64]) -> None:
        """Let the guest write one value into each of ``pages`` (indices into the guest
        memory)."""
        n = len(pages)
        block = struct.pack("<Q", n) + np.stack(
            [np.uint64(HIGH_BASE) + pages * np.uint64(PAGE_SIZE),
             np.arange(n, dtype=np.uint64) + np.uint64(1)], axis=1).astype("<u8").tobytes()
        self.vm.write_memory(LIST_AT, block)
        r = self.vcpu.get_regs()
        r.rip, r.rsi, r.rflags = CODE_AT, LIST_AT, 2
        self.vcpu.set_regs(r)
        while True:
            ex = self.vcpu.run()
            if isinstance(ex, DirtyRingFull) and self.vcpu.ring is not None:
                self.vcpu.ring.drain()  # the entries wait there for the checkpoint
                continue
            if isinstance(ex, Interrupted):
                if self._on_interrupted is not None:
                    self._on_interrupted()  # may raise to end the benchmark
                continue  # the guest goes on where it was
            if isinstance(ex, IoOut) and ex.port == 0xE9:
                return
            raise KvmError(f"the benchmark guest stopped unexpectedly: {ex}")

    def full_copy(self) -> None:
        """The reference: copy every stored page back."""
        view = self._pages()
        if len(self._stored) == len(view):
            view[:] = self._stored  # dense: one copy
        else:
            idx = self._index.astype(np.intp)
            for a in range(0, len(idx), 4096):
                view[idx[a:a + 4096]] = self._stored[a:a + 4096]

    def measure(self, n: int, repeats: int,
                on_cycle: Callable[[], None] | None = None) -> ResetCell:
        """One cell: ``n`` dirty pages (drawn now), a warm-up, ``repeats`` timed resets, then
        ``repeats`` timed full copies (resets first: a full copy of a large guest just before
        a reset would leave it every cache and TLB cold).  ``on_cycle`` is called after each
        guest run and its reset or copy.  Raises :class:`KvmError` if a reset goes another
        way than the mode's, restores fewer pages than the guest wrote, or leaves one of
        them changed."""
        if repeats < 1:
            raise KvmInvalidArgumentError(f"repeats must be at least 1, not {repeats}")
        pages = self.choose(n)

        def cycle_done() -> None:
            if on_cycle is not None:
                on_cycle()

        wall, cpu, coll, restored, ref = [], [], [], [], []
        self.dirty(pages)
        self.checkpoint.reset()  # warm-up
        cycle_done()
        for _ in range(repeats):
            self.dirty(pages)
            c0 = time.thread_time_ns()
            st = self.checkpoint.reset()
            cpu.append(time.thread_time_ns() - c0)
            if st.path != self.mode:
                raise KvmError(f"a {self.mode} reset took the {st.path} path ({st.reason})")
            if st.pages < n:
                raise KvmError(f"a reset after {n} guest writes restored {st.pages} pages")
            wall.append(st.ns)
            coll.append(st.collect_ns)
            restored.append(st.pages)
            cycle_done()
        changed = np.count_nonzero((self._pages()[pages.astype(np.intp)] != FILL).any(axis=1))
        if changed:
            raise KvmError(f"{changed} of the {n} pages the guest wrote differ from the "
                           "checkpoint after a reset")
        for _ in range(repeats):
            self.dirty(pages)
            t0 = time.perf_counter_ns()
            self.full_copy()
            ref.append(time.perf_counter_ns() - t0)
            self.checkpoint.reset()  # consume the log (untimed)
            cycle_done()
        return ResetCell(
            self.mode, self.guest.label, self.guest.size, self.guest.populated, n, repeats,
            int(statistics.median(restored)), _p50(wall) / 1e3, _p50(cpu) / 1e3,
            _p50(coll) / 1e3, _p50([w - c for w, c in zip(wall, coll, strict=True)]) / 1e3,
            _p50(ref) / 1e3)


def check_config(guests: Sequence[ResetGuest], dirty: Sequence[int],
                 modes: Sequence[ResetMode], repeat: int) -> None:
    """Refuse a configuration :func:`measure_resets` cannot run
    (:class:`KvmInvalidArgumentError`, saying why), before any guest is made."""
    if not guests or not dirty or not modes:
        raise KvmInvalidArgumentError("guests, dirty and modes must not be empty")
    for mode in modes:
        if mode not in MODES:
            raise KvmInvalidArgumentError(f"mode must be one of {', '.join(MODES)}, not "
                                          f"{mode!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise KvmInvalidArgumentError(f"repeat must be a positive int, not {repeat!r}")
    for n in dirty:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_DIRTY:
            raise KvmInvalidArgumentError(f"{n!r} dirty pages: it must be between 1 and "
                                          f"{MAX_DIRTY}")
    for guest in guests:
        if max(dirty) > guest.populated_pages:
            raise KvmInvalidArgumentError(
                f"{max(dirty)} dirty pages do not fit the {guest.describe()} guest "
                f"({guest.populated_pages} populated pages)")


def measure_resets(kvm: Kvm, guests: Sequence[ResetGuest] = DEFAULT_GUESTS,
                   dirty: Sequence[int] = DEFAULT_DIRTY, *, modes: Sequence[ResetMode] = MODES,
                   repeat: int = DEFAULT_REPEAT, seed: int = 1,
                   progress: Callable[[ResetCell], None] | None = None,
                   on_cycle: Callable[[ResetMode, ResetGuest, int, int], None] | None = None,
                   on_interrupted: Callable[[], None] | None = None) -> list[ResetCell]:
    """Measure every cell: for each mode, each guest (one VM, set up once), each dirty-set
    size, in that order (see the module documentation for what is timed).

    ``progress`` gets each cell once measured; ``on_cycle(mode, guest, dirty, cycles)`` is
    called with ``cycles=0`` when a cell starts (before its guest is set up, for the first
    cell of a guest) and with ``cycles=1`` after each guest run and its reset or copy
    (:func:`planned_cycles` in all); ``on_interrupted`` as for :class:`ResetBench`.  Either
    callback may raise to end the benchmark (the VM is closed on the way out)."""
    check_config(guests, dirty, modes, repeat)
    cells = []
    for mode in modes:
        for guest in guests:
            if on_cycle is not None:
                on_cycle(mode, guest, dirty[0], 0)
            with ResetBench(kvm, mode, guest, seed=seed, on_interrupted=on_interrupted) as b:
                for k, n in enumerate(dirty):
                    if k and on_cycle is not None:
                        on_cycle(mode, guest, n, 0)

                    def one(mode: ResetMode = mode, guest: ResetGuest = guest,
                            n: int = n) -> None:
                        if on_cycle is not None:
                            on_cycle(mode, guest, n, 1)

                    cell = b.measure(n, repeats_for(n, repeat), one)
                    cells.append(cell)
                    if progress is not None:
                        progress(cell)
    return cells
