"""Memory checkpoints on the real /dev/kvm: reset restores guest memory exactly, through the
dirty ring, the dirty bitmap or a tracker, for guest writes and host writes, over a small slot
and a large sparse one above 4 GiB, and falls back to a full compare when a ring overran.

The guest (``WRITER``, long mode) reads a list of ``(gpa, value)`` pairs and stores each value
at its address, then reports on port 0xE9.  It spends 57 instructions per write (a delay
loop): a write pushes one ring entry, or two when it is the first into a 2 MiB page of the
identity map (the CPU sets the accessed and dirty bits of its page-table entry), so at least
28 instructions per entry, above this host's overrun threshold of 16: the ring never loses
an entry to it.
Each check compares memory with the checkpoint two ways: the bytes of every page the test ever
touched against a copy read at the checkpoint, and a hash of all of guest memory.
"""

from __future__ import annotations

import errno
import hashlib
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmio import (
    DirtyPages,
    DirtyRingFull,
    FileMemory,
    IoOut,
    Kvm,
    KvmClosedError,
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    MemfdMemory,
    SnapshotError,
    Vcpu,
    Vm,
    _abi,
)
from kvmio.guests.modes import setup_long_mode
from kvmio.guests.programs import program
from kvmio.memory import HostWriteRecord

# The write-list guest (its source is in kvmio.resetbench): stores each (gpa, value) pair of
# the list at rsi, 57 instructions per write, then ``out 0xE9``.
from kvmio.resetbench import CODE_AT, LIST_AT, WRITER
from kvmio.snapshot.memory import MemoryCheckpoint, ResetStats
from kvmio.tracker import DirtyTracker

pytestmark = pytest.mark.kvm

PAGE = 4096
BURST_AT = 0x30000
LOW_SIZE = 2 << 20
#: Pages of the low slot the guest may write: past the page tables (0x100000 + 14 pages).
LOW_PAGES = range(0x120, LOW_SIZE // PAGE)
HIGH_BASE = 4 << 30
HIGH_SIZE = 8 << 30
HIGH_PAGES = HIGH_SIZE // PAGE


@dataclass
class Machine:
    """A VM with a small slot 0 at 0 and a large sparse slot 1 at 4 GiB, and one vCPU in long
    mode that runs the writer."""

    vm: Vm
    vcpu: Vcpu
    touched: set[int] = field(default_factory=set)  # guest physical pages ever written

    def run_writes(self, pairs: list[tuple[int, int]]) -> None:
        """Let the guest store each value at its address (the list is a host write)."""
        block = struct.pack("<Q", len(pairs)) + b"".join(struct.pack("<QQ", g, v)
                                                         for g, v in pairs)
        self.vm.write_memory(LIST_AT, block)
        self.touched.update(range(LIST_AT // PAGE, (LIST_AT + len(block) - 1) // PAGE + 1))
        self.touched.update(g // PAGE for g, _ in pairs)
        r = self.vcpu.get_regs()
        r.rip, r.rsi, r.rflags = CODE_AT, LIST_AT, 2
        self.vcpu.set_regs(r)
        ring = self.vcpu.ring
        while True:
            ex = self.vcpu.run()
            if isinstance(ex, DirtyRingFull):
                assert ring is not None
                ring.drain()  # whoever owns the ring (the checkpoint): its entries wait there
                continue
            assert ex == IoOut(0xE9, 1, 1, ex.data), ex
            break
        final = dict(pairs)  # the last write to an address wins
        for g, v in final.items():
            assert self.vm.read_memory(g, 8) == struct.pack("<Q", v)

    def host_write(self, gpa: int, data: bytes) -> None:
        self.vm.write_memory(gpa, data)
        self.touched.update(range(gpa // PAGE, (gpa + len(data) - 1) // PAGE + 1))


@pytest.fixture(params=["ring", "bitmap"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def machine(kvm: Kvm, mode: str, *, ring_entries: int = 4096, high: bool = True) -> Machine:
    """``mode``: "ring", "bitmap", or "bitmap-manual" (manual dirty-log protect)."""
    vm = kvm.create_vm()
    if mode == "ring":
        vm.enable_dirty_ring(ring_entries)
    elif mode.startswith("bitmap-manual"):
        vm.enable_manual_dirty_log_protect(initially_set=mode.endswith("-init"))
    vm.add_memory_region(0, LOW_SIZE, log_dirty=True)
    if high:
        vm.add_memory_region(HIGH_BASE, HIGH_SIZE, log_dirty=True, noreserve=True)
    vm.write_memory(CODE_AT, WRITER)
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    setup_long_mode(vcpu, vm, CODE_AT, identity_map=HIGH_BASE + HIGH_SIZE)
    return Machine(vm, vcpu)


def fill(m: Machine, seed: int) -> None:
    """Give memory some content before the checkpoint: random bytes in a few pages of each
    slot (the rest of the large slot is never touched)."""
    rng = np.random.default_rng(seed)
    for page in rng.choice(range(0x110, LOW_SIZE // PAGE), 8, replace=False).tolist():
        m.host_write(page * PAGE, rng.bytes(PAGE))
    for page in [0, 1, 2, HIGH_PAGES - 1, *rng.integers(0, HIGH_PAGES, 12).tolist()]:
        m.host_write(HIGH_BASE + page * PAGE, rng.bytes(PAGE))


def memory_hash(vm: Vm) -> str:
    """A hash of all of guest memory: of a sparse slot, every page that holds data (pages
    outside ``populated_pages()`` read as zero: checked for a sample of them); of a file
    mapping, every byte."""
    h = hashlib.sha256()
    for slot, r in sorted(vm.regions.items()):
        words = r.array(np.uint64).reshape(-1, PAGE // 8)
        if not r.memory.unpopulated_is_zero:
            h.update(struct.pack("<Q", slot))
            h.update(words.tobytes())
            continue
        pages = r.memory.populated_pages()
        nonzero = pages[words[pages.astype(np.intp)].any(axis=1)]
        h.update(struct.pack("<QQ", slot, len(nonzero)))
        h.update(nonzero.tobytes())
        h.update(words[nonzero.astype(np.intp)].tobytes())
        outside = np.setdiff1d(np.arange(0, r.num_pages, 997, dtype=np.uint64), pages)
        assert not words[outside.astype(np.intp)].any()
    return h.hexdigest()


def snapshot_pages(m: Machine, pages: set[int]) -> dict[int, bytes]:
    return {p: m.vm.read_memory(p * PAGE, PAGE) for p in pages}


def assert_restored(m: Machine, before: dict[int, bytes], digest: str) -> None:
    """Every page the test touched holds its checkpoint bytes again, and the whole of memory
    hashes as at the checkpoint."""
    for page in sorted(m.touched):
        want = before.get(page)
        got = m.vm.read_memory(page * PAGE, PAGE)
        assert want is not None, f"page {page:#x} was not read at the checkpoint"
        assert got == want, f"page {page:#x} differs from the checkpoint"
    assert memory_hash(m.vm) == digest


# -- property: random cycles of guest and host writes, then reset ------------------------------

page_choice = st.one_of(
    st.tuples(st.just(0), st.sampled_from(LOW_PAGES)),
    st.tuples(st.just(1), st.sampled_from([0, 1, 2, 3, 4095, 4096, HIGH_PAGES - 1])),
    st.tuples(st.just(1), st.integers(0, HIGH_PAGES - 1)),
)
write = st.tuples(page_choice, st.integers(0, PAGE // 8 - 1), st.integers(0, (1 << 64) - 1))
host = st.tuples(page_choice, st.integers(0, PAGE - 1), st.binary(min_size=1, max_size=300))
cycle = st.tuples(st.lists(write, max_size=40), st.lists(host, max_size=4),
                  st.booleans())  # whether to repeat some writes with other values
Cycle = tuple[list[tuple[tuple[int, int], int, int]], list[tuple[tuple[int, int], int, bytes]],
              bool]


def gpa_of(slot_page: tuple[int, int], offset: int) -> int:
    slot, page = slot_page
    return (HIGH_BASE if slot else 0) + page * PAGE + offset


def host_write_of(slot_page: tuple[int, int], offset: int, data: bytes) -> tuple[int, bytes]:
    """The host write at that place, cut at the end of its slot."""
    g = gpa_of(slot_page, offset)
    end = HIGH_BASE + HIGH_SIZE if slot_page[0] else LOW_SIZE
    return g, data[:end - g]


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cycles=st.lists(cycle, min_size=1, max_size=4), seed=st.integers(0, 1 << 16))
def test_random_cycles_reset_exactly(kvm: Kvm, mode: str, cycles: list[Cycle],
                                     seed: int) -> None:
    m = machine(kvm, mode)
    with m.vm:
        fill(m, seed)
        # Every page a cycle may touch, read at the checkpoint (a superset is fine): the
        # writes, the host writes, the list, and the page tables (the CPU sets A/D bits).
        candidates = set(m.touched) | pages_of(LIST_AT, 16 * 64) | set(range(0x100, 0x110))
        for writes, hosts, _ in cycles:
            candidates |= {gpa_of(sp, 8 * off) // PAGE for sp, off, _ in writes}
            for sp, off, data in hosts:
                g, d = host_write_of(sp, off, data)
                candidates |= pages_of(g, len(d))
        with MemoryCheckpoint.take(m.vm) as cp:
            before = snapshot_pages(m, candidates)
            digest = memory_hash(m.vm)
            for writes, hosts, again in cycles:
                pairs = [(gpa_of(sp, 8 * off), v) for sp, off, v in writes]
                if again and pairs:  # some addresses twice, with new values
                    pairs += [(g, v ^ 0x5A5A) for g, v in pairs[::3]]
                for sp, off, data in hosts:
                    m.host_write(*host_write_of(sp, off, data))
                m.run_writes(pairs)
                assert m.touched <= candidates
                stats = cp.reset()
                assert stats.path == mode, stats
                written = {g // PAGE for g, _ in pairs}
                assert stats.pages >= len(written) and stats.host >= 1  # the list at least
                assert_restored(m, before, digest)
            assert cp.differences().count == 0


@pytest.mark.parametrize("shape", ["run", "scattered", "unpopulated", "long-unpopulated",
                                   "mixed", "half-of-dense"])
def test_many_pages_in_every_shape(kvm: Kvm, shape: str) -> None:
    """Hundreds of pages: in runs (a slice copy per run), scattered (gathered in chunks),
    never populated (zero-filled), a long run never populated (discarded), all of these
    together, and every other page of densely stored memory (all of it copied back)."""
    m = machine(kvm, "ring")
    with m.vm:
        base = HIGH_BASE // PAGE
        populated = list(range(base + 1000, base + 1400))
        if shape != "half-of-dense":
            populated += list(range(base + 5000, base + 5000 + 300 * 37, 37))
        for p in populated:
            m.host_write(p * PAGE, (p % 251 + 1).to_bytes(1, "little") * PAGE)
        if shape == "run":
            pages = list(range(base + 1010, base + 1390))
        elif shape == "scattered":
            pages = populated[400::1] + populated[0:400:9]
        elif shape == "unpopulated":
            pages = list(range(base + 50000, base + 50000 + 200 * 5, 5))
        elif shape == "half-of-dense":
            pages = [*populated[1::2], base + 3000]  # the last page of the run too
        elif shape == "long-unpopulated":
            pages = list(range(base + 20000, base + 20700))
        else:
            pages = populated[::2] + list(range(base + 30000, base + 30600)) + \
                list(range(base + 40000, base + 40900, 3))
        pairs = [(p * PAGE + 8 * (p % 7), p) for p in pages]
        with MemoryCheckpoint.take(m.vm) as cp:
            before = snapshot_pages(m, set(m.touched) | set(pages) | pages_of(LIST_AT, 16 * 2000)
                                    | set(range(0x100, 0x110)))
            digest = memory_hash(m.vm)
            for _ in range(2):
                m.run_writes(pairs)
                stats = cp.reset()
                assert stats.path == "ring" and stats.dirty >= len(pages), stats
                assert_restored(m, before, digest)


# -- the overrun fallback ---------------------------------------------------------------------


def overrun(m: Machine, pages: int = 8192) -> None:
    """Run the dense burst writer over the large slot until a ring-full exit finds the ring
    completely full: entries were overwritten (by construction: one emulation batch pushes
    ~745 entries, far past the ring's 64 reserved ones)."""
    code = program("burst")
    m.host_write(BURST_AT, code.code)
    r = m.vcpu.get_regs()
    r.rip, r.rdi, r.rsi, r.rax, r.rflags = BURST_AT, HIGH_BASE + 0x100000, pages, 0xAA, 2
    m.vcpu.set_regs(r)
    ring = m.vcpu.ring
    assert ring is not None
    for _ in range(100):
        assert isinstance(m.vcpu.run(), DirtyRingFull)
        if ring.count_dirty() == ring.size:
            m.touched.update(range((HIGH_BASE + 0x100000) // PAGE,
                                   (HIGH_BASE + 0x100000) // PAGE + pages))
            return
        ring.drain()
    raise AssertionError("the burst guest never overran the ring")


def test_an_overrun_is_detected_and_the_reset_stays_exact(kvm: Kvm) -> None:
    m = machine(kvm, "ring", ring_entries=4096)
    with m.vm:
        fill(m, 7)
        burst_pages = range((HIGH_BASE + 0x100000) // PAGE, (HIGH_BASE + 0x100000) // PAGE + 8192)
        writes = [(HIGH_BASE + 0x5000, 1), (HIGH_BASE + 0x900000, 2), (0x150000, 3)]
        candidates = set(m.touched) | set(burst_pages) | {g // PAGE for g, _ in writes} | \
            {LIST_AT // PAGE, BURST_AT // PAGE, *range(0x100, 0x110)}
        with MemoryCheckpoint.take(m.vm) as cp:
            before = snapshot_pages(m, candidates)
            digest = memory_hash(m.vm)
            overrun(m)
            # The pages the burst wrote (never populated before): at least a ring's worth of
            # entries, less the page-table pages some of those entries name.
            first = (HIGH_BASE + 0x100000 - m.vm.regions[1].guest_phys_addr) // PAGE
            words = m.vm.regions[1].page_words()[first:first + 8192]
            written = int(np.count_nonzero(words))
            assert written >= 4096 - 64
            stats = cp.reset()
            assert stats.path == "full" and "overrun" in (stats.reason or ""), stats
            assert stats.full_slots == {0, 1}
            assert stats.pages >= written  # each of them differs from the checkpoint
            assert_restored(m, before, digest)
            # The lost entries leave a hole in the ring that shows once the guest runs again:
            # that reset goes the full way too (and repairs the ring); then the log is clean.
            paths = []
            for _ in range(3):
                m.run_writes(writes)
                paths.append(cp.reset().path)
                assert_restored(m, before, digest)
            assert paths == ["full", "ring", "ring"], paths
            assert cp.differences().count == 0


@pytest.mark.parametrize("mode, where", [
    ("ring", "fused"),  # after the native call that collected and copied (a clean log)
    ("ring", "general"),  # page by page, after a collection (a host write on the way)
    ("bitmap", "fused"),
    ("bitmap", "general"),
])
def test_an_interrupted_reset_makes_the_next_one_full(kvm: Kvm, monkeypatch: pytest.MonkeyPatch,
                                                      mode: str, where: str) -> None:
    m = machine(kvm, mode)
    with m.vm:
        fill(m, 3)
        with MemoryCheckpoint.take(m.vm) as cp:
            before = snapshot_pages(m, set(m.touched) | {0x150, LIST_AT // PAGE,
                                                         *range(0x100, 0x110)})
            digest = memory_hash(m.vm)
            m.run_writes([(0x150000, 9)])
            target = (_abi.PageRestore, "counts") if where == "fused" else \
                (MemoryCheckpoint, "_restore")
            if where == "general":
                # An extra list out of order makes the native call restore nothing: the
                # reset then copies the collected pages itself.
                monkeypatch.setattr(HostWriteRecord, "take",
                                    lambda self: np.array([2, 1], dtype=np.uint64))

            def fail(self: object, *args: object) -> int:
                raise KeyboardInterrupt  # a Ctrl-C half-way through

            monkeypatch.setattr(*target, fail)
            with pytest.raises(KeyboardInterrupt):
                cp.reset()
            monkeypatch.undo()
            stats = cp.reset()  # the dirty pages were collected by the failed reset
            assert stats.path == "full", stats
            # The fused call had copied them back before the interrupt; else they differ.
            assert (stats.pages == 0) if where == "fused" else (stats.pages >= 1), stats
            assert_restored(m, before, digest)
            m.run_writes([(0x150000, 9)])
            assert cp.reset().path == mode
            assert_restored(m, before, digest)


# -- sources of the dirty log -----------------------------------------------------------------


def test_reset_through_a_running_tracker(kvm: Kvm, mode: str) -> None:
    m = machine(kvm, mode)
    with m.vm:
        fill(m, 11)
        with DirtyTracker(m.vm, interval=0.01) as tracker:
            with pytest.raises(SnapshotError, match="tracker="):
                MemoryCheckpoint.take(m.vm)  # the tracker holds the log
            with MemoryCheckpoint.take(m.vm, tracker=tracker) as cp:
                writes = [(HIGH_BASE + 0x7000, 5), (HIGH_BASE + 0x7008, 6), (0x151000, 7)]
                before = snapshot_pages(m, set(m.touched) | {g // PAGE for g, _ in writes}
                                        | {LIST_AT // PAGE, *range(0x100, 0x110)})
                digest = memory_hash(m.vm)
                for _ in range(3):
                    m.run_writes(writes)
                    time.sleep(0.02)  # a worker pass or two meanwhile
                    stats = cp.reset()
                    assert stats.path == mode and stats.pages >= 3, stats
                    assert_restored(m, before, digest)
        assert tracker.error is None


def test_the_checkpoint_is_the_one_consumer_of_the_log(kvm: Kvm, mode: str) -> None:
    m = machine(kvm, mode, high=False)
    with m.vm:
        cp = MemoryCheckpoint.take(m.vm)
        with pytest.raises(KvmStateError):
            m.vm.collect_dirty_pages()  # would take pages from the checkpoint
        with pytest.raises(KvmStateError):
            DirtyTracker(m.vm).start()
        with pytest.raises(SnapshotError):
            MemoryCheckpoint.take(m.vm)
        cp.close()
        cp.close()
        m.vm.collect_dirty_pages()  # given back
        with pytest.raises(Exception, match="closed"):
            cp.reset()
        # Dropped without close(): the finaliser gives the log back.
        MemoryCheckpoint.take(m.vm)
        import gc

        gc.collect()
        MemoryCheckpoint.take(m.vm).close()


def test_vcpus_created_after_the_checkpoint_are_followed(kvm: Kvm) -> None:
    m = machine(kvm, "ring", high=False)
    with m.vm, MemoryCheckpoint.take(m.vm) as cp:
        before = snapshot_pages(m, {0x150, 0x151, LIST_AT // PAGE, *range(0x100, 0x110)})
        digest = memory_hash(m.vm)
        second = m.vm.create_vcpu()
        second.set_cpuid2(kvm.get_supported_cpuid())
        setup_long_mode(second, m.vm, CODE_AT, identity_map=LOW_SIZE, write_tables=False)
        first, m.vcpu = m.vcpu, second
        m.run_writes([(0x150000, 1), (0x151000, 2)])  # through the new vCPU's ring
        m.vcpu = first
        stats = cp.reset()
        assert stats.path == "ring" and stats.dirty >= 2
        assert_restored(m, before, digest)


# -- host writes ------------------------------------------------------------------------------


def test_host_writes_and_marked_raw_writes_are_reset(kvm: Kvm, mode: str) -> None:
    m = machine(kvm, mode)
    with m.vm:
        fill(m, 5)
        hi = m.vm.regions[1]
        with MemoryCheckpoint.take(m.vm) as cp:
            pages = {HIGH_BASE // PAGE + p for p in (0, 5, 6, 9, 10)} | {0x150}
            before = snapshot_pages(m, pages)
            digest = memory_hash(m.vm)
            m.vm.write_memory(HIGH_BASE + 5 * PAGE + 100, b"\xee" * PAGE)  # pages 5 and 6
            hi.write(HIGH_BASE, b"\x01")
            raw = hi.array()
            raw[9 * PAGE] = 0x77  # a raw write, marked
            m.vm.mark_dirty(HIGH_BASE + 9 * PAGE, 1)
            raw[10 * PAGE] = 0x66  # a raw write, not marked: invisible to the reset...
            stats = cp.reset()
            assert stats.path == mode and stats.pages == 4 and stats.host == 4, stats
            assert stats.dirty == 0
            assert raw[10 * PAGE] == 0x66  # ...as documented
            assert cp.differences().count == 1
            assert list(cp.differences()[1]) == [10]
            raw[10 * PAGE] = 0
            del raw
            m.touched = pages
            assert_restored(m, before, digest)


def test_a_reset_with_nothing_dirty_restores_nothing_and_is_cheap(kvm: Kvm, mode: str) -> None:
    m = machine(kvm, mode)
    with m.vm:
        fill(m, 1)
        with MemoryCheckpoint.take(m.vm) as cp:
            times = []
            for _ in range(30):
                stats = cp.reset()
                assert (stats.pages, stats.dirty, stats.host, stats.path) == (0, 0, 0, mode)
                times.append(stats.ns)
            # Generous (a busy 2-core host): an empty reset is tens of microseconds here.
            assert statistics.median(times) < 2_000_000, times


# -- the fused reset (ring mode: collection and copies in one native call) ---------------------


class Spy:
    """Records what Vm.collect_and_restore returned and how often MemoryCheckpoint._restore
    (the page-by-page path) ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.results: list[object] = []
        self.restores = 0
        fused, restore = Vm.collect_and_restore, MemoryCheckpoint._restore

        def spy_fused(vm: Vm, *args: object, **kw: object) -> object:
            got = fused(vm, *args, **kw)  # type: ignore[arg-type]
            self.results.append(got)
            return got

        def spy_restore(cp: MemoryCheckpoint, *args: object) -> int:
            self.restores += 1
            return restore(cp, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Vm, "collect_and_restore", spy_fused)
        monkeypatch.setattr(MemoryCheckpoint, "_restore", spy_restore)


@pytest.mark.parametrize("variant", ["ring", "bitmap", "bitmap-manual", "bitmap-manual-init"])
def test_a_clean_reset_is_one_native_call(kvm: Kvm, monkeypatch: pytest.MonkeyPatch,
                                          variant: str) -> None:
    m = machine(kvm, variant)
    with m.vm:
        fill(m, 5)
        spy = Spy(monkeypatch)
        writes = [(0x150000, 1), (0x150008, 2), (HIGH_BASE + 0x3000, 3),  # stored pages
                  (HIGH_BASE + 0x9000, 4), (HIGH_BASE + 0x123000, 5)]  # not populated then
        with MemoryCheckpoint.take(m.vm) as cp:
            before = snapshot_pages(m, set(m.touched) | {g // PAGE for g, _ in writes}
                                    | {0x151, LIST_AT // PAGE, *range(0x100, 0x110)})
            digest = memory_hash(m.vm)
            for k in range(3):
                spy.results.clear()
                m.run_writes(writes)
                m.host_write(0x150010, b"host")  # a page the guest wrote too: counted once
                m.host_write(0x151000 + k, b"x")
                stats = cp.reset()
                assert spy.results == [None], spy.results  # restored by the native call
                assert spy.restores == 0
                assert stats.path == variant.split("-")[0], stats
                assert stats.full_slots == frozenset(), stats
                guest = {g // PAGE for g, _ in writes}
                host = {0x150, 0x151} | pages_of(LIST_AT, 8 + 16 * len(writes))
                assert stats.host == len(host)
                # The guest's CPU also dirties page-table pages (accessed and dirty bits).
                assert len(guest) <= stats.dirty <= len(guest) + 8, stats
                # Page 0x150, written by both, is restored (and counted) once.
                assert len(guest | host) <= stats.pages <= stats.dirty + stats.host - 1, stats
                assert_restored(m, before, digest)
            # Nothing written: the native call restores nothing, and says so.
            stats = cp.reset()
            assert spy.results[-1] is None and (stats.pages, stats.dirty, stats.host) == (0, 0, 0)


@pytest.mark.parametrize("variant", ["ring", "bitmap"])
def test_a_fused_reset_zero_fills_short_and_discards_long_runs_it_has_no_copy_of(
        kvm: Kvm, monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    m = machine(kvm, variant)
    with m.vm:
        fill(m, 6)
        spy = Spy(monkeypatch)
        region = m.vm.regions[1]
        with MemoryCheckpoint.take(m.vm) as cp:
            digest = memory_hash(m.vm)
            for first, count in ((100_000, 40), (200_000, 600)):  # below and above 512 pages
                m.host_write(HIGH_BASE + first * PAGE, b"\xff" * (count * PAGE))
                stats = cp.reset()
                assert spy.results[-1] is None and stats.pages == count, stats
                populated = set(region.memory.populated_pages().tolist())
                run = set(range(first, first + count))
                if count < 512:
                    assert run <= populated  # zero-filled in place: cheaper than a discard
                else:
                    assert not run & populated  # discarded: the memory is given back
                assert not region.page_words()[first:first + count].any()
                assert memory_hash(m.vm) == digest


def test_collect_and_restore_is_all_or_nothing(kvm: Kvm) -> None:
    m = machine(kvm, "ring")
    with m.vm:
        fill(m, 7)
        ring = m.vcpu.take_dirty_ring()
        rings = [ring]
        regions = m.vm.regions
        mems = [regions[s].memory.mapping for s in sorted(regions)]
        none = np.zeros(0, dtype=np.uint64)
        # Each slot's table entry stores page 0x160 (slot 0) / 5 (slot 1) as 0xAB bytes, and
        # zero-fills what it has no copy of: a restore would change the guest's values.
        stored = np.full((1, PAGE), 0xAB, dtype=np.uint8)
        entries = {0: (0, stored, np.array([0x160], dtype=np.uint64), 1 << 20),
                   1: (1, stored, np.array([5], dtype=np.uint64), 1 << 20)}

        def attempt(slots: list[int], capacity: int) -> tuple[DirtyPages | None, bool]:
            m.run_writes([(0x160000, 11), (HIGH_BASE + 0x5000, 12)])
            table = _abi.PageRestore([entries[s] for s in slots])
            table.bind([mems[s] for s in slots], [none] * len(slots), capacity)
            try:
                return m.vm.collect_and_restore(table, rings=rings), table.done
            finally:
                table.unbind()
                table.close()

        m.vm.collect_and_restore(_abi.PageRestore([]), rings=rings)  # start from a clean log
        # A table without slot 0 while the guest writes both slots; then a table of both
        # slots without room for the pages it has no copy of: nothing written.
        for slots, capacity in (([1], 1 << 20), ([0, 1], 0)):
            got, done = attempt(slots, capacity)
            assert isinstance(got, DirtyPages) and not done
            assert {0x160} <= set(got.pages[0].tolist())
            assert {5} <= set(got.pages[1].tolist())
            assert m.vm.read_memory(0x160000, 8) == struct.pack("<Q", 11)
            assert m.vm.read_memory(HIGH_BASE + 0x5000, 8) == struct.pack("<Q", 12)
        # The control: the same writes with a table of both slots and room: all restored.
        got, done = attempt([0, 1], 1 << 20)
        assert got is None and done
        assert m.vm.read_memory(0x160000, 8) == b"\xab" * 8
        assert m.vm.read_memory(HIGH_BASE + 0x5000, 8) == b"\xab" * 8
        ring.release()


def test_a_bitmap_collect_and_restore_falls_back_or_keeps_what_it_took(
        kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(kvm, "bitmap")
    with m.vm:
        fill(m, 8)
        regions = m.vm.regions
        mems = [regions[s].memory.mapping for s in sorted(regions)]
        none = np.zeros(0, dtype=np.uint64)
        stored = np.zeros((0, PAGE), dtype=np.uint8)
        m.vm.collect_dirty_pages()  # start from a clean log
        # Tables whose bitmaps do not match the VM's logged slots (one missing, one too
        # small for its slot: the kernel would write past it): collect_dirty_pages instead.
        for sizes in ([512, 0], [512, 64]):
            table = _abi.PageRestore([(0, stored, none, 0), (1, stored, none, 0)], sizes)
            m.run_writes([(0x160000, 11), (HIGH_BASE + 100 * PAGE, 12)])
            table.bind(mems, [none, none], 1 << 20)
            try:
                got = m.vm.collect_and_restore(table)
            finally:
                table.unbind()
                table.close()
            assert isinstance(got, DirtyPages)
            assert {0x160} <= set(got.pages[0].tolist())
            assert {100} <= set(got.pages[1].tolist())
            assert m.vm.read_memory(0x160000, 8) == struct.pack("<Q", 11)
        # A real failure part-way, in C: a bitmap for a slot the VM does not have, after
        # slot 0's.  The bits taken before it are in its bitmap, and say which call failed.
        m.run_writes([(0x162000, 15)])
        bad = _abi.PageRestore([(0, stored, none, 0), (7, stored, none, 0)],
                               [regions[0].num_pages, 64])
        try:
            fetched, err, name = bad.collect_bitmaps(m.vm.fd, False)
            assert (fetched, err, name) == (1, errno.ENOENT, "KVM_GET_DIRTY_LOG")
            assert not bad.done
            words = bad.bitmap(0)
            assert words[0x162 // 64] >> (0x162 % 64) & 1
        finally:
            bad.close()
        # A call that fails part-way (a fake failure after the real one, with nothing
        # restored): the bitmaps it took are kept for the next collection, and it raises.
        sizes = [regions[s].num_pages for s in sorted(regions)]
        table = _abi.PageRestore([(0, stored, none, 0), (1, stored, none, 0)], sizes)
        real = _abi.PageRestore.collect_bitmaps

        def fails_at_the_second(self: _abi.PageRestore, fd: int, manual: bool
                                ) -> tuple[int, int, str]:
            real(self, fd, manual)
            self._done[0] = 0
            return 1, 5, "KVM_GET_DIRTY_LOG"  # slot 0 taken, then EIO

        monkeypatch.setattr(_abi.PageRestore, "collect_bitmaps", fails_at_the_second)
        m.run_writes([(0x161000, 13), (HIGH_BASE + 0x6000, 14)])
        table.bind(mems, [none, none], 0)  # no room: the real call restores nothing
        try:
            with pytest.raises(KvmError) as ei:
                m.vm.collect_and_restore(table)
        finally:
            table.unbind()
            table.close()
        assert ei.value.errno == 5 and ei.value.ioctl == "KVM_GET_DIRTY_LOG"
        monkeypatch.undo()
        assert {0x161} <= set(m.vm.collect_dirty_pages().pages[0].tolist())
        # A Ctrl-C right after the call returns (the kernel's bits are taken): kept too.
        table = _abi.PageRestore([(0, stored, none, 0), (1, stored, none, 0)], sizes)

        def interrupted(self: _abi.PageRestore) -> bool:
            raise KeyboardInterrupt

        monkeypatch.setattr(_abi.PageRestore, "done", property(interrupted))
        m.run_writes([(0x163000, 16), (HIGH_BASE + 0x7000, 17)])
        table.bind(mems, [none, none], 0)
        try:
            with pytest.raises(KeyboardInterrupt):
                m.vm.collect_and_restore(table)
        finally:
            table.unbind()
            table.close()
        monkeypatch.undo()
        got = m.vm.collect_dirty_pages().pages
        assert {0x163} <= set(got[0].tolist()) and {7} <= set(got[1].tolist())


@pytest.mark.parametrize("mode", ["ring", "bitmap", "bitmap-manual"])
def test_a_slot_that_ends_inside_a_bitmap_word_is_reset(kvm: Kvm,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        mode: str) -> None:
    vm = kvm.create_vm()
    if mode == "ring":
        vm.enable_dirty_ring(4096)
    elif mode == "bitmap-manual":
        vm.enable_manual_dirty_log_protect()
    vm.add_memory_region(0, LOW_SIZE, log_dirty=True)
    small = 0x400000
    vm.add_memory_region(small, 100 * PAGE, log_dirty=True)  # 100 pages: 1 word and a bit
    vm.write_memory(CODE_AT, WRITER)
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    setup_long_mode(vcpu, vm, CODE_AT, identity_map=1 << 30)
    m = Machine(vm, vcpu)
    with vm:
        for p in (0, 63, 64, 99):
            m.host_write(small + p * PAGE, bytes([p + 1]) * 64)
        spy = Spy(monkeypatch)
        writes = [(small + p * PAGE + 8, p) for p in (1, 63, 64, 98, 99)]
        with MemoryCheckpoint.take(vm) as cp:
            before = snapshot_pages(m, set(m.touched) | {small // PAGE + p for p in range(100)}
                                    | {LIST_AT // PAGE, *range(0x100, 0x110)})
            digest = memory_hash(vm)
            for _ in range(2):
                m.run_writes(writes)
                stats = cp.reset()
                assert spy.results[-1] is None and spy.restores == 0
                assert stats.path == mode.split("-")[0] and stats.dirty >= len(writes), stats
                assert_restored(m, before, digest)


def test_collect_and_restore_refuses_bad_input(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        with pytest.raises(KvmInvalidArgumentError, match="restore"):
            vm.collect_and_restore("table")  # type: ignore[arg-type]
        # Bitmap mode, no slot: nothing to collect or restore, and it says it restored.
        assert vm.collect_and_restore(_abi.PageRestore([])) is None
        claim = vm.claim_dirty_log("a test")
        with pytest.raises(KvmStateError, match="claimed"):
            vm.collect_and_restore(_abi.PageRestore([]))  # a second consumer
        assert vm.collect_and_restore(_abi.PageRestore([]), claim=claim) is None
        with pytest.raises(KvmInvalidArgumentError, match="one bitmap size per slot"):
            _abi.PageRestore([], [1])
    index = np.array([1, 2], dtype=np.uint64)
    with pytest.raises(KvmInvalidArgumentError, match="does not match"):
        _abi.PageRestore([(0, np.zeros((1, PAGE), dtype=np.uint8), index, 0)])
    with pytest.raises(KvmInvalidArgumentError, match="does not match"):
        _abi.PageRestore([(0, np.zeros((2, PAGE), dtype=np.uint8), index.astype(np.int64), 0)])
    with pytest.raises(KvmInvalidArgumentError, match="strictly increasing"):
        _abi.PageRestore([(0, np.zeros((2, PAGE), dtype=np.uint8), index[::-1].copy(), 0)])
    with pytest.raises(KvmInvalidArgumentError, match="named twice"):
        _abi.PageRestore([(0, np.zeros((2, PAGE), dtype=np.uint8), index, 0)] * 2)
    store = np.zeros((2, PAGE), dtype=np.uint8)
    for bad in ([(0, store, index)], [(-1, store, index, 0)], [(True, store, index, 0)],
                [(0, store, index, 1.5)], [(0, bytes(2 * PAGE), index, 0)],
                [(0, store, [1, 2], 0)], ["slot"]):
        with pytest.raises(KvmInvalidArgumentError):
            _abi.PageRestore(bad)  # type: ignore[arg-type]
    for sizes in ([-1], [1.0], [True]):
        with pytest.raises(KvmInvalidArgumentError, match="bitmap size"):
            _abi.PageRestore([(0, store, index, 0)], sizes)  # type: ignore[list-item]
    table = _abi.PageRestore([(0, np.zeros((2, PAGE), dtype=np.uint8), index, 0)])
    with pytest.raises(KvmInvalidArgumentError, match="Mappings"):
        table.bind(["memory"], [np.zeros(0, dtype=np.uint64)], 0)  # type: ignore[list-item]
    page = _abi.Mapping(PAGE)
    with pytest.raises(KvmInvalidArgumentError, match="Mappings"):
        table.bind([page], [[1]], 0)  # type: ignore[list-item]
    page.close()
    with pytest.raises(KvmInvalidArgumentError, match="one memory"):
        table.bind([], [], 0)
    mem = _abi.Mapping(4 * PAGE)
    with pytest.raises(KvmInvalidArgumentError, match="uint64"):
        table.bind([mem], [np.array([1], dtype=np.int64)], 0)
    mem.close()
    with pytest.raises(KvmClosedError):
        table.bind([mem], [np.zeros(0, dtype=np.uint64)], 0)
    table.close()


# -- refusals ---------------------------------------------------------------------------------


def test_a_running_vcpu_is_refused(kvm: Kvm) -> None:
    m = machine(kvm, "ring", high=False)
    with m.vm:
        m.vm.write_memory(0x40000, b"\xeb\xfe")  # jmp $
        cp = MemoryCheckpoint.take(m.vm)
        r = m.vcpu.get_regs()
        r.rip = 0x40000
        m.vcpu.set_regs(r)
        t = threading.Thread(target=m.vcpu.run)
        t.start()
        try:
            deadline = time.monotonic() + 30
            while not m.vcpu.running:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            with pytest.raises(KvmStateError, match="running"):
                MemoryCheckpoint.take(m.vm)
            with pytest.raises(KvmStateError, match="running"):
                cp.reset()
        finally:
            m.vcpu.kick()
            t.join()
        cp.reset()
        cp.close()


def test_slots_must_be_dirty_logged(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 1 << 20, log_dirty=True)
        vm.add_memory_region(1 << 20, 1 << 20)
        with pytest.raises(SnapshotError, match="slot 1 is not dirty-logged"):
            MemoryCheckpoint.take(vm)
        vm.collect_dirty_pages()  # nothing held after the refusal
        vm.set_dirty_logging(1, True)
        with MemoryCheckpoint.take(vm) as cp:
            vm.set_dirty_logging(1, False)
            with pytest.raises(SnapshotError, match="dirty logging of slot 1 was turned off"):
                cp.reset()


def test_slots_changed_after_the_checkpoint_are_refused(kvm: Kvm, mode: str) -> None:
    m = machine(kvm, mode, high=False)
    with m.vm, MemoryCheckpoint.take(m.vm) as cp:
        m.vm.add_memory_region(HIGH_BASE, 1 << 20, log_dirty=True, slot=5)
        with pytest.raises(SnapshotError, match="slots added: 5"):
            cp.reset()
        m.vm.delete_memory_region(5)
        cp.reset()  # as at the checkpoint again
        m.vm.delete_memory_region(0)
        m.vm.add_memory_region(0, LOW_SIZE, log_dirty=True, slot=0)
        with pytest.raises(SnapshotError, match="slots replaced: 0"):
            cp.reset()


# -- other memory backends --------------------------------------------------------------------


def test_memfd_and_private_file_memory(kvm: Kvm, tmp_path: pytest.TempPathFactory) -> None:
    image = tmp_path / "image"  # type: ignore[operator]
    image.write_bytes(bytes(range(256)) * (LOW_SIZE // 256))
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(4096)
        vm.add_memory_region(0, memory=MemfdMemory(LOW_SIZE), log_dirty=True)
        vm.add_memory_region(HIGH_BASE, memory=FileMemory(image), log_dirty=True)
        vm.write_memory(CODE_AT, WRITER)
        vcpu = vm.create_vcpu()
        setup_long_mode(vcpu, vm, CODE_AT, identity_map=HIGH_BASE + LOW_SIZE)
        m = Machine(vm, vcpu)
        m.host_write(HIGH_BASE + 3 * PAGE, b"own copy")  # a private copy at the checkpoint
        with MemoryCheckpoint.take(vm) as cp:
            pages = {0x150, 0x151, HIGH_BASE // PAGE + 3, HIGH_BASE // PAGE + 4,
                     HIGH_BASE // PAGE + 200, LIST_AT // PAGE, *range(0x100, 0x103)}
            before = snapshot_pages(m, pages)
            digest = memory_hash(vm)
            for _ in range(2):
                m.run_writes([(0x150000, 1), (HIGH_BASE + 3 * PAGE, 2),
                              (HIGH_BASE + 4 * PAGE + 8, 3), (HIGH_BASE + 200 * PAGE, 4)])
                m.host_write(0x151000, b"x" * 10)
                stats = cp.reset()
                assert stats.path == "ring" and stats.pages >= 5
                assert_restored(m, before, digest)
                # The file's own pages read as the file again, not as zero.
                assert vm.read_memory(HIGH_BASE + 200 * PAGE, 4) == bytes([0, 1, 2, 3])
            assert image.read_bytes()[:256] == bytes(range(256))


def test_stats_and_stored_pages(kvm: Kvm) -> None:
    m = machine(kvm, "ring")
    with m.vm:
        m.host_write(HIGH_BASE + 7 * PAGE, b"\x01" * 16)
        _ = m.vm.read_memory(HIGH_BASE + 8 * PAGE, 16)  # read only: nothing to store
        with MemoryCheckpoint.take(m.vm) as cp:
            pages, data = cp.stored(1)
            assert pages.tolist() == [7] and data.shape == (1, PAGE)
            assert bytes(data[0, :16]) == b"\x01" * 16
            assert cp.nbytes < 64 * PAGE  # the 8 GiB slot costs one page
            assert cp.slots.keys() == {0, 1} and cp.vm is m.vm and cp.tracker is None
            assert isinstance(cp.reset(m.vm), ResetStats)
            with pytest.raises(Exception, match="another VM"), kvm.create_vm() as other:
                cp.reset(other)


def test_the_native_page_restore_copies_zeroes_or_lists_and_checks_bounds() -> None:
    """``_abi.restore_pages``, the compiled copy a reset uses: stored pages come back, pages
    the store lacks are zeroed or listed, and a page beyond the memory or a store that does
    not match its index is refused before anything is written."""
    from kvmio import _abi

    m = _abi.Mapping(8 * 4096, what="test memory")
    try:
        mem = np.frombuffer(m.mm, dtype=np.uint8).reshape(8, 4096)
        mem[:] = 0xEE
        store = np.zeros((2, 4096), dtype=np.uint8)
        store[0] = 1
        store[1] = 2
        index = np.array([2, 5], dtype=np.uint64)
        pages = np.array([1, 2, 5, 7], dtype=np.uint64)
        missing = _abi.restore_pages(m, store, index, pages, zero=False)
        assert missing.tolist() == [1, 7]
        assert (mem[2] == 1).all() and (mem[5] == 2).all()
        assert (mem[1] == 0xEE).all() and (mem[7] == 0xEE).all() and (mem[0] == 0xEE).all()
        assert len(_abi.restore_pages(m, store, index, pages, zero=True)) == 0
        assert (mem[1] == 0).all() and (mem[7] == 0).all() and (mem[3] == 0xEE).all()
        mem[:] = 0xEE
        with pytest.raises(KvmInvalidArgumentError, match="beyond"):
            _abi.restore_pages(m, store, index, np.array([2, 8], dtype=np.uint64), zero=True)
        assert (mem == 0xEE).all()  # refused before anything was written
        with pytest.raises(KvmInvalidArgumentError, match="not sorted"):
            _abi.restore_pages(m, store, index, np.array([7, 2], dtype=np.uint64), zero=True)
        with pytest.raises(KvmInvalidArgumentError, match="beyond"):  # not only the last
            _abi.restore_pages(m, store, index, np.array([9, 2], dtype=np.uint64), zero=True)
        assert (mem == 0xEE).all()
        with pytest.raises(KvmInvalidArgumentError, match="does not match"):
            _abi.restore_pages(m, store[:1], index, pages, zero=True)
        with pytest.raises(KvmInvalidArgumentError, match="uint64"):
            _abi.restore_pages(m, store, index.astype(np.int64), pages, zero=True)
        del mem
    finally:
        m.close()


def test_closing_the_memory_during_a_native_restore_is_safe() -> None:
    """A restore pins the guest memory for its call: a close() from another thread meanwhile
    defers the unmap instead of pulling the memory from under the copy (which crashed the
    process).  Whichever comes first, the restore completes or raises KvmClosedError."""
    import threading

    from kvmio import KvmClosedError, _abi

    pages = 16384  # 64 MiB: a copy long enough for the close to land during it
    for _ in range(5):
        m = _abi.Mapping(pages * 4096, what="test memory")
        store = np.ones((pages, 4096), dtype=np.uint8)
        index = np.arange(pages, dtype=np.uint64)
        started = threading.Event()
        closer = threading.Thread(target=lambda m=m, s=started: (s.wait(), m.close()))
        closer.start()
        try:
            started.set()
            _abi.restore_pages(m, store, index, index, zero=True)
        except KvmClosedError:
            pass
        finally:
            closer.join()
            m.close()
