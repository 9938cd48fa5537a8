"""Pre-copy live migration: :func:`send_vm` on the source, :func:`receive_vm` on the
destination, over any stream connection (a socket, an SSL socket, a socket pair).

The source sends every populated page once while the vCPUs run (pass 0: zero pages as ZERO
records, not data), then passes of the pages changed since the previous pass (the dirty log,
or a tracker's, plus host writes through kvmio: :class:`~kvmio.snapshot.ChangeLog`), until
the next pass's bytes at the measured bandwidth fit the downtime limit.  It then pauses the
vCPUs, collects the final changes, sends them, the slots no dirty log covers (whole), and the
machine state, and waits for the destination's answer.  A slot the log cannot vouch for (a
ring overrun) is sent whole: nothing it could have hidden is missed.

The hand-over is a three-way exchange, so that one copy of the guest runs, never two: the
destination answers ``OKAY`` once it restored the VM, the source then sends ``LIVE`` (from
here on it never resumes its own copy), and the destination answers ``RUNS`` and hands the VM
over.  If anything fails before ``LIVE`` is sent (the connection, the destination, a
timeout), the source's vCPUs are resumed and :class:`~kvmio.errors.MigrationError` is raised;
the destination, which has not seen ``LIVE``, closes the VM.  If the connection fails after
``LIVE`` was sent and before ``RUNS`` came back, the source cannot know whether the
destination runs the VM: it stays paused and raises
:class:`~kvmio.errors.MigrationInDoubtError`.

The destination builds the VM from the stream's layout, writes pages only after checking them
(:class:`~kvmio.migration.stream.StreamReader`), restores the state after ``DONE``, and
answers; on any error it closes the VM it was building: it never hands over a half-received
one.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from kvmio import _check
from kvmio._abi import PAGE_SIZE
from kvmio.devices import IoBus
from kvmio.errors import (
    KvmError,
    KvmInvalidArgumentError,
    KvmStateError,
    MigrationError,
    MigrationInDoubtError,
    SnapshotError,
)
from kvmio.exits import VcpuExit
from kvmio.limit import DirtyLimit
from kvmio.memory import HUGE_PAGE, AnonymousMemory, Memory, MemoryRegion
from kvmio.migration.stream import MAX_PAGES_PER_RECORD, Connection, StreamReader, StreamWriter
from kvmio.runner import VcpuRunner
from kvmio.snapshot.changelog import ChangeLog, Changes
from kvmio.snapshot.files import AS_SAVED, build_vm, machine_layout
from kvmio.snapshot.state import MachineState, capture, finish_pending_exits, restore
from kvmio.system import Kvm
from kvmio.tracker import DirtyTracker
from kvmio.vcpu import Vcpu
from kvmio.vm import Vm

__all__ = [
    "AUTO_FRACTION",
    "AUTO_SHRINK",
    "DEFAULT_DOWNTIME",
    "MigrationReport",
    "PassReport",
    "Pausable",
    "ReceivedVm",
    "forget_hand_over",
    "receive_vm",
    "send_vm",
]

#: The default downtime limit (seconds): the longest the guest may stand still at switch-over.
DEFAULT_DOWNTIME = 0.3
#: The part of the downtime that depends neither on the pages left nor on the link's round
#: trip (seconds): pausing the vCPUs, reading and restoring the machine state (measured here:
#: 4-7 ms in all for an idle or lightly written Multiboot guest over loopback, between two
#: processes, varying with the host's load from run to run and day to day, of which the two
#: round trips took 0.2-0.6 ms).  The estimate adds two round trips of the link
#: (:attr:`MigrationReport.round_trip`): the last pages and the destination's ``OKAY``, then
#: ``LIVE`` and ``RUNS``.
SWITCH_OVER_COST = 0.0045
#: Auto-converge steps in when the guest dirtied at least this share of what a pass sent,
#: while it was sent.
AUTO_SHRINK = 0.9
#: Auto-converge's first limit: this share of the measured bandwidth, for all vCPUs together.
AUTO_FRACTION = 0.5
#: How far ahead of the first pass's records the destination faults guest memory in, at most,
#: and how many pages beyond the data received it may fault in all (32 MiB; see
#: :class:`_Prefaulter`).
PREFAULT_WINDOW = 8192
_PREFAULT_STEP = HUGE_PAGE // PAGE_SIZE  # pages per populate call (2 MiB, aligned)

Pages = npt.NDArray[np.uint64]


class Pausable(Protocol):
    """What runs the vCPUs during a migration: a :class:`~kvmio.runner.VcpuRunner`, or e.g.
    :class:`kvmio.guests.multiboot.KernelRunner`.  ``pause()`` returns with every vCPU outside
    KVM_RUN, its last exit handled; ``resume()`` lets them go on."""

    def pause(self, timeout: float | None = None) -> None:
        """Stop every vCPU outside KVM_RUN."""
        ...

    def resume(self) -> None:
        """Let the vCPUs run again."""
        ...


@dataclass(frozen=True)
class PassReport:
    """One pass of the source: pages and bytes sent, how long it took, whether the vCPUs were
    paused (the final pass)."""

    number: int
    pages: int
    zero_pages: int
    bytes: int
    seconds: float
    whole_slots: tuple[int, ...] = ()
    final: bool = False
    #: Bytes the pass had to send when it started (the dirty pages found, at 4 KiB each).
    remaining: int = 0
    #: The downtime expected had the switch-over come instead of this pass (seconds).
    estimated_downtime: float = 0.0
    #: The bandwidth measured so far (bytes per second).
    bandwidth: float = 0.0


@dataclass
class MigrationReport:
    """What :func:`send_vm` did."""

    passes: list[PassReport] = field(default_factory=list)
    #: Seconds from the start to the destination's answer.
    total_seconds: float = 0.0
    #: Seconds the guest stood still: from the pause to the destination's ``RUNS``.
    downtime: float = 0.0
    #: The downtime the switch-over expected (bytes left / bandwidth).
    estimated_downtime: float = 0.0
    #: Bytes written to the connection.
    bytes_sent: int = 0
    #: The bandwidth measured on the last live pass (bytes per second).
    bandwidth: float = 0.0
    #: The link's round trip (seconds), as a SYNC sent into an empty stream took to be
    #: answered before the switch-over (the least of those sent); 0.0 without a live pass.
    round_trip: float = 0.0
    #: Why the slots sent whole were (ring overruns, slots without a dirty log).
    whole_reasons: list[str] = field(default_factory=list)
    #: Auto-converge's steps: the pass after which each vCPU's limit was set, and the limit.
    throttle: list[dict[str, float]] = field(default_factory=list)
    #: Where the downtime went (seconds): ``pause`` (stopping the vCPUs and finishing their
    #: pending exits), ``collect`` (the final dirty set), ``final_pass`` (handing the last
    #: pages to the connection), ``state`` (capturing and sending the machine state),
    #: ``answer`` (until the destination said ``OKAY``: it stored the last pages and restored
    #: the VM), ``hand_over`` (``LIVE`` to ``RUNS``).
    downtime_parts: dict[str, float] = field(default_factory=dict)
    #: With ``compress``: the page bytes that went compressed, and what they took on the wire.
    compressed_bytes: int = 0
    compressed_to: int = 0

    @property
    def pages_sent(self) -> int:
        """Pages sent over all passes (zero pages included)."""
        return sum(p.pages for p in self.passes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["pages_sent"] = self.pages_sent
        return d


#: VMs handed over to a destination (or maybe: in doubt): :func:`send_vm` refuses them.
_HANDED_OVER: weakref.WeakSet[Vm] = weakref.WeakSet()


def forget_hand_over(vm: Vm) -> None:
    """Let :func:`send_vm` migrate ``vm`` again after it was handed over or ended in doubt
    (:class:`~kvmio.errors.MigrationInDoubtError`): call it only once you know that no
    destination runs the guest (two copies of one guest must never run)."""
    _HANDED_OVER.discard(vm)


def _paused_rate(nbytes: int, wall: float, cpu: float) -> float:
    """Bytes per second a pass will go at with the vCPUs paused: at its CPU cost, unless the
    wall time says the link was the limit (it took more than twice its CPU time with the
    CPU-bound part taken out: then the wall time's rate)."""
    if nbytes <= 0:
        return float("inf")
    cpu = max(cpu, 1e-6)
    if wall > 2 * cpu + 0.05:  # mostly waiting: the link (or the host) is the limit
        return nbytes / wall
    return nbytes / cpu


def _page_bytes(p: PassReport) -> int:
    """The guest page bytes a pass handled (its pages, zero or not, at 4 KiB each)."""
    return p.pages * PAGE_SIZE


def _unsent(conn: object) -> int:
    """Bytes a TCP connection's kernel send queue still holds (SIOCOUTQ: not yet sent, or
    not yet acknowledged): they go before anything sent next, so they count in the downtime
    of a switch-over made now.  0 for anything else (a socket pair drains at memory speed)."""
    if getattr(conn, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return 0
    try:
        fd = conn.fileno()  # type: ignore[attr-defined]
        raw = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4)  # an int, copied out: no pointer
    except (OSError, ValueError, AttributeError):
        return 0
    return max(0, int.from_bytes(raw, "little", signed=True))


#: One guest page as one numpy item: indexing page arrays of this type copies each page with
#: one memcpy (a (n, 512) uint64 array's fancy indexing went element by element: 15x slower
#: to scatter, measured).
_PAGE = np.dtype((np.void, PAGE_SIZE))


def _merged(a: Changes, b: Changes) -> Changes:
    """The changes of ``a`` and then ``b``."""
    pages = dict(a.pages)
    for slot, p in b.pages.items():
        have = pages.get(slot)
        pages[slot] = p if have is None else np.union1d(have, p)
    return Changes(pages, a.whole | b.whole, a.why + [w for w in b.why if w not in a.why])


_SYNC = struct.Struct("<QQ")


def _sync(w: StreamWriter, conn: Connection, timeout: float) -> tuple[float, float]:
    """Send ``SYNC`` and wait (at most ``timeout`` seconds) for the destination's ``SYNC``:
    everything sent before it has been stored.  A ``FAIL`` answer is the destination's
    refusal.  Returns the rate (bytes/s of its CPU time) at which the destination stored the
    last whole pass (inf if it could not tell, or the pass was too small to tell by), and the
    seconds the answer took (a round trip of the link, if nothing was in flight before)."""
    t0 = time.monotonic()
    w.record(b"SYNC")
    gettimeout = getattr(conn, "gettimeout", None)
    settimeout = getattr(conn, "settimeout", None)
    before = gettimeout() if gettimeout is not None else None
    if settimeout is not None:
        settimeout(timeout)
    try:
        answer = StreamReader(conn).record((b"SYNC", b"FAIL"))
    except MigrationError as e:
        if isinstance(e.__cause__, TimeoutError):
            raise MigrationError(f"the destination did not say within {timeout:.1f} s that "
                                 "it stored what was sent") from e
        raise
    finally:
        if settimeout is not None:
            with contextlib.suppress(OSError):
                settimeout(before)
    took = time.monotonic() - t0
    if answer.tag == b"FAIL":
        raise MigrationError("the destination refused the VM: "
                             + answer.payload.decode("utf-8", "replace"))
    if len(answer.payload) != _SYNC.size:
        raise MigrationError("the destination's SYNC has the wrong length")
    nbytes, cpu_ns = _SYNC.unpack(answer.payload)
    if nbytes <= 64 * PAGE_SIZE or not cpu_ns:  # too little to time
        return float("inf"), took
    return float(nbytes / (cpu_ns / 1e9)), took


class _Sender:
    def __init__(self, w: StreamWriter, regions: Mapping[int, MemoryRegion]):
        self.w = w
        self.regions = regions
        self.pages = 0
        self.zero = 0
        #: While the guest runs: (monotonic deadline, error message) of the whole migration.
        self.deadline: tuple[float, str] | None = None

    def send(self, slot: int, pages: Pages, *, still: bool = False) -> None:
        """Send ``pages`` (sorted, distinct indices) of ``slot``: zero ones as ZERO records.

        ``still``: nothing writes guest memory meanwhile (the final pass, vCPUs paused), so a
        record of consecutive pages goes straight from guest memory; else each record's
        pages are copied first, so that its checksum covers what is sent while the guest
        writes on."""
        region = self.regions[slot]
        flat = cast("npt.NDArray[np.uint8]", region.array(np.uint8))
        view = flat.view(_PAGE)
        for at in range(0, len(pages), MAX_PAGES_PER_RECORD):
            if self.deadline is not None and time.monotonic() > self.deadline[0]:
                raise MigrationError(self.deadline[1])
            idx = pages[at:at + MAX_PAGES_PER_RECORD]
            n = len(idx)
            first = int(idx[0])
            block: npt.NDArray[np.uint8]
            if int(idx[-1]) - first == n - 1:  # consecutive pages (sorted, distinct)
                block = flat[first * PAGE_SIZE:(first + n) * PAGE_SIZE]
                if not still:
                    block = block.copy()  # a plain copy: half the cost of a gather
                block = block.reshape(n, PAGE_SIZE)
            else:
                block = view[idx.astype(np.intp)].view(np.uint8).reshape(n, PAGE_SIZE)
            nonzero = _nonzero_pages(block)
            if nonzero.all():
                self.w.pages(slot, idx, block)
            else:
                self.w.pages(slot, idx[~nonzero], None)
                self.zero += int((~nonzero).sum())
                if nonzero.any():
                    self.w.pages(slot, idx[nonzero], block[nonzero])
            self.pages += n

    def whole(self, slot: int, *, still: bool = False) -> None:
        """Every populated page of ``slot`` (the rest are zero at the destination)."""
        self.send(slot, self.regions[slot].memory.populated_pages(), still=still)


def _nonzero_pages(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Which pages (rows of ``block``, ``PAGE_SIZE`` bytes each) hold a non-zero byte: the
    first 64 bytes of each decide most pages; only pages that start with them zero are read
    whole."""
    words = block.view(np.uint64)
    nonzero = np.asarray(words[:, :8].any(axis=1))
    if not nonzero.all():
        rest = np.flatnonzero(~nonzero)
        nonzero[rest] = words[rest].any(axis=1)
    return nonzero


def _vcpus(vm: Vm, vcpus: Iterable[Vcpu] | None) -> list[Vcpu]:
    out = list(vm.vcpus.values()) if vcpus is None else list(vcpus)
    if not out:
        raise KvmStateError("a migration needs the VM's vCPUs")
    return sorted(out, key=lambda v: v.id)


def send_vm(conn: Connection, vm: Vm, vcpus: Iterable[Vcpu] | None = None, *,
            runner: VcpuRunner | Pausable | None = None,
            tracker: DirtyTracker | None = None,
            devices: IoBus | None = None, guest: Mapping[str, Any] | None = None,
            on_exit: Callable[[VcpuExit], None] | None = None,
            downtime: float = DEFAULT_DOWNTIME, max_passes: int = 30,
            timeout: float | None = None, answer_timeout: float = 60.0,
            auto_converge: bool = False, compress: bool = False,
            on_pass: Callable[[PassReport], None] | None = None) -> MigrationReport:
    """Migrate ``vm`` (its ``vcpus``, default all) to the destination at the other end of
    ``conn`` (see the module).

    ``runner``: the :class:`~kvmio.runner.VcpuRunner` running the vCPUs (passes are copied
    while it runs; it is paused for the switch-over and stays paused after a success or a
    :class:`~kvmio.errors.MigrationInDoubtError`, resumed after any other failure); without
    one, or with one paused already (then it is left as it is), the vCPUs must be stopped.
    A VM handed over (a success, or in doubt) is refused afterwards (see
    :func:`forget_hand_over`).  ``tracker``: a running
    :class:`~kvmio.tracker.DirtyTracker` of the VM whose passes supply the dirty pages (else
    the migration takes the dirty log itself).  ``devices``: the port devices, whose state
    goes with the machine state; ``on_exit``: where exits met while a vCPU's pending exit is
    finished at the switch-over go (e.g. the devices; default: discarded).  ``guest``:
    metadata for the destination (JSON-able).
    ``downtime``: the switch-over's limit in seconds (within it, live passes go on while
    each leaves at most half of what the previous one sent to send, and sending that would
    take longer than :data:`SWITCH_OVER_COST`: such a pass shortens the downtime more than it
    lengthens the migration); ``max_passes`` live passes at most, after which the switch-over
    happens anyway; ``timeout``: seconds after which a migration that has not switched over
    is abandoned (:class:`MigrationError`, the source runs on);
    ``answer_timeout``: seconds the destination has to answer after the state was sent (set
    on ``conn`` if it has ``settimeout``).  ``on_pass(report)`` is called after each pass.
    ``compress``: send page data as zstd frames where that saves at least an eighth (needs the
    ``zstandard`` package, on both sides); it pays on a slow link, and costs on a fast one
    (see the README's measurements).

    ``auto_converge`` (needs ``tracker`` and ``runner``): when the guest dirtied at least
    :data:`AUTO_SHRINK` of what a pass sent while it was sent, every vCPU gets a dirty-rate limit
    (:class:`~kvmio.limit.DirtyLimit`), first :data:`AUTO_FRACTION` of the measured bandwidth
    shared among the vCPUs, then half of the previous limit at each pass that still does not
    shrink; the limit is lifted when the migration ends (on the source's side: it stays
    paused after a success, and runs unthrottled after a failure).
    """
    # Arguments first, each a clear KvmInvalidArgumentError (nothing sent yet).
    downtime = _check.positive_float("downtime", downtime)
    max_passes = _check.integer("max_passes", max_passes, lo=1)
    if timeout is not None:
        timeout = _check.positive_float("timeout", timeout)
    answer_timeout = _check.positive_float("answer_timeout", answer_timeout)
    _check.instance("auto_converge", auto_converge, bool)
    _check.instance("compress", compress, bool)
    if on_pass is not None and not callable(on_pass):
        raise KvmInvalidArgumentError("on_pass must be callable")
    if vm in _HANDED_OVER:
        raise MigrationError("this VM was handed over to a destination (or may have been: "
                             "the migration ended in doubt); it is not migrated again.  If "
                             "you know that no destination runs it, call "
                             "kvmio.migration.forget_hand_over(vm) first")
    if runner is not None and getattr(runner, "paused", False):
        runner = None  # paused by the caller: a stopped VM, and the caller's to resume
    if auto_converge and (tracker is None or not isinstance(runner, VcpuRunner)):
        raise MigrationError("auto-converge needs the VM's running DirtyTracker (tracker=) and "
                             "the runner of its vCPUs (runner=): the dirty-rate limit paces "
                             "the runner and measures with the tracker")
    targets = _vcpus(vm, vcpus)
    t0 = time.monotonic()
    report = MigrationReport()
    layout = machine_layout(vm, targets)
    regions = dict(vm.regions)
    w = StreamWriter(conn, compress=compress)
    sender = _Sender(w, regions)
    paused = handed_over = False
    limit: DirtyLimit | None = None
    try:
        log = ChangeLog(vm, tracker=tracker)
    except SnapshotError as e:
        raise MigrationError(f"the dirty log is not free: {e.message}") from e
    try:
        log.collect(final=False)  # the baseline: pass 0 sends everything after it
        w.preamble()
        w.config(layout, dict(guest or {}))

        cpu = [0.0]  # the last pass's CPU time in this thread

        def run_pass(number: int, changes: Changes | None, final: bool,
                     remaining: int = 0) -> PassReport:
            start, sent0, cpu0 = time.monotonic(), w.sent, time.thread_time()
            pages0, zero0 = sender.pages, sender.zero
            whole: set[int] = set(regions) if changes is None else set(changes.whole)
            if changes is not None:
                for slot, pages in sorted(changes.pages.items()):
                    if slot in regions and slot not in whole and len(pages):
                        sender.send(slot, pages, still=final)
                report.whole_reasons.extend(changes.why)
            for slot in sorted(whole):
                if slot in regions and (final or changes is None or
                                        regions[slot].log_dirty):
                    # Untracked slots: in pass 0 and the final pass only.
                    sender.whole(slot, still=final)
            seconds = time.monotonic() - start
            cpu[0] = time.thread_time() - cpu0
            p = PassReport(number, sender.pages - pages0, sender.zero - zero0, w.sent - sent0,
                           seconds, tuple(sorted(whole)), final, remaining,
                           report.estimated_downtime,
                           (w.sent - sent0) / seconds if seconds > 0 else 0.0)
            w.end_pass(number, p.pages, p.bytes)
            report.passes.append(p)
            if on_pass is not None:
                on_pass(p)
            return p

        if timeout is not None and runner is not None:
            sender.deadline = (t0 + timeout, f"the migration did not converge within "
                                             f"{timeout:g} s (still copying while the guest ran)")
        last = run_pass(0, None, final=False)
        # Rates: `bandwidth` is of bytes on the wire (for the link's backlog); the others are
        # of guest page bytes handled (pages x 4 KiB, zero or not), the unit of the dirty sets
        # they are compared with, whatever a compressed record took on the wire.
        bandwidth = last.bytes / max(last.seconds, 1e-6)
        page_rate = _page_bytes(last) / max(last.seconds, 1e-6)
        # The final pass runs with the vCPUs paused: this thread then has a CPU to itself, so
        # the pass costs about its CPU time, unless the link is slower than that.  The live
        # passes' wall time also counts the waits for a CPU the running guest took.
        send_rate = _paused_rate(_page_bytes(last), last.seconds, cpu[0])
        pending: Changes | None = None
        if runner is not None:
            number = 1
            def dirty_bytes(changes: Changes) -> int:
                return (changes.count + sum(regions[s].memory.populated_pages().size
                                            for s in changes.whole
                                            if s in regions and regions[s].log_dirty)
                        ) * PAGE_SIZE

            carried: Changes | None = None  # pages a SYNC's wait left over the limit
            while True:
                changes = log.collect(final=False)
                if carried is not None:
                    changes, carried = _merged(carried, changes), None
                size = dirty_bytes(changes)
                unsent = _unsent(conn)  # the link's backlog goes first
                report.estimated_downtime = (SWITCH_OVER_COST + 2 * report.round_trip
                                             + size / send_rate + unsent / max(bandwidth, 1.0))
                # Within the limit, another live pass still pays while passes keep halving
                # (the guest dirties much less than the link carries): it takes about the
                # final pass's time, with the guest running, and leaves the downtime a
                # fraction of it (a 512 MiB working set at 160 MiB/s: 80 ms -> 30 ms).  Not
                # when the timeout would end it: a migration within the limit switches over.
                late = timeout is not None and \
                    time.monotonic() + size / max(page_rate, 1.0) > t0 + timeout
                shrinking = (size > 0 and size * 2 <= _page_bytes(last) and not late
                             and size / send_rate > SWITCH_OVER_COST)
                if (report.estimated_downtime <= downtime and not shrinking) \
                        or number > max_passes:
                    # Wait, with the guest running, until the destination has stored all
                    # that was sent: what the link and its buffers still held would be the
                    # downtime's to wait for (over loopback the destination's backlog alone
                    # was 5-8 ms of a 10 ms downtime).
                    wait = answer_timeout if timeout is None else min(
                        answer_timeout, max(t0 + timeout - time.monotonic(), 0.0) + 1.0)
                    stored_rate, _ = _sync(w, conn, wait)
                    # A second SYNC, into a stream now empty: its answer takes a round trip
                    # of the link, and the switch-over's downtime holds two (the last pages
                    # and OKAY, then LIVE and RUNS): 80 ms of it over a 40 ms link.
                    _, took = _sync(w, conn, wait)
                    report.round_trip = min(report.round_trip or took, took)
                    # What the guest dirtied meanwhile goes too.  The final pass costs this
                    # thread's time per byte plus the destination's: over a local link the
                    # two take turns more than they overlap (each waits for the other at
                    # every socket buffer; measured here, the sum came within 25% where the
                    # slower side alone read 30-36% short).  The destination's rate is not
                    # taken from pass 0, which it stored into pages it touched for the first
                    # time (a page fault each): the final pass rewrites pages.
                    if last.number == 0:
                        stored_rate = float("inf")
                    elif last.bytes:  # of the wire's bytes: in page bytes, as the pass went
                        stored_rate *= _page_bytes(last) / last.bytes
                    pending = _merged(changes, log.collect(final=False))
                    report.estimated_downtime = (
                        SWITCH_OVER_COST + 2 * report.round_trip
                        + dirty_bytes(pending) * (1 / send_rate + 1 / stored_rate))
                    if report.estimated_downtime <= downtime or number > max_passes:
                        break
                    # The guest dirtied too much while the destination caught up: those pages
                    # go in one more live pass.
                    changes, pending = pending, None
                    size = dirty_bytes(changes)
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise MigrationError(
                        f"the migration did not converge within {timeout:g} s ({number - 1} "
                        f"passes; {size >> 20} MiB dirty, {report.estimated_downtime:.2f} s "
                        f"to send at {page_rate / 2**20:.1f} MiB/s, limit {downtime:g} s)")
                if auto_converge and size >= AUTO_SHRINK * _page_bytes(last):
                    # The guest dirtied (about) as much while the last pass was sent as that
                    # pass sent: passes do not shrink.  Slow it down.
                    assert tracker is not None
                    if limit is None:
                        assert isinstance(runner, VcpuRunner)
                        try:
                            limit = DirtyLimit(tracker, runner)
                        except KvmStateError as e:
                            raise MigrationError(f"auto-converge cannot pace the vCPUs: "
                                                 f"{e.message}") from e
                        rate = AUTO_FRACTION * page_rate / len(targets)
                    else:
                        rate = report.throttle[-1]["bytes_per_second"] / 2
                    rate = max(rate, float(PAGE_SIZE))
                    limit.set(rate)
                    report.throttle.append({"pass": number - 1, "bytes_per_second": rate})
                last = run_pass(number, changes, final=False, remaining=size)
                if last.seconds > 0 and last.pages > 64:
                    bandwidth = last.bytes / last.seconds
                    page_rate = _page_bytes(last) / last.seconds
                    send_rate = _paused_rate(_page_bytes(last), last.seconds, cpu[0])
                number += 1
            sender.deadline = None  # the final pass is the downtime: it is not cut short
            t_pause = time.monotonic()
            runner.pause()
            paused = True
        else:
            number, t_pause = 1, time.monotonic()
        for v in targets:
            if v.running:
                raise KvmStateError(f"vCPU {v.id} is running; pass its runner")
        finish_pending_exits(targets, on_exit=on_exit)  # may write memory: before the last pass
        parts = report.downtime_parts
        mark = [t_pause]

        def lap(name: str) -> None:
            now = time.monotonic()
            parts[name] = now - mark[0]
            mark[0] = now

        lap("pause")
        final = log.collect(final=True)
        if pending is not None:
            final = _merged(pending, final)
        lap("collect")
        run_pass(number, final, final=True, remaining=final.count * PAGE_SIZE)
        lap("final_pass")
        state = capture(vm, targets, devices=devices)
        w.record(b"STAT", state.to_bytes())
        w.record(b"DONE")
        lap("state")
        reader = StreamReader(conn)
        settimeout = getattr(conn, "settimeout", None)
        if settimeout is not None:  # a destination that never answers is a failure too
            settimeout(answer_timeout)
        answer = reader.record((b"OKAY", b"FAIL"))
        if answer.tag == b"FAIL":
            raise MigrationError("the destination refused the VM: "
                                 + answer.payload.decode("utf-8", "replace"))
        lap("answer")
        # From before the write: an interrupt (Ctrl-C) right after it must not resume the
        # source.  A write that failed never delivered a whole, checksummed LIVE.
        handed_over = True
        try:
            w.record(b"LIVE")
        except MigrationError:
            handed_over = False
            raise
        _HANDED_OVER.add(vm)
        try:
            final_answer = reader.record((b"RUNS", b"FAIL"))
        except MigrationError as e:
            raise MigrationInDoubtError(
                f"the destination was told to run the VM but did not confirm it ({e.message}): "
                "it may be running it, so the source stays paused; resume it only once you "
                "know the destination does not run the VM", errno=e.errno) from e
        if final_answer.tag == b"FAIL":  # it did not run it, for sure: the source goes on
            handed_over = False
            _HANDED_OVER.discard(vm)
            raise MigrationError("the destination refused the VM at the hand-over: "
                                 + final_answer.payload.decode("utf-8", "replace"))
        lap("hand_over")
        report.downtime = mark[0] - t_pause
        report.compressed_bytes, report.compressed_to = w.compressed_in, w.compressed_out
        report.bandwidth = bandwidth
    except BaseException as e:
        if not handed_over:
            # The destination never got LIVE: tell it at once (it would wait for LIVE until
            # its connection timed out, holding the VM), and the source runs on.
            shutdown = getattr(conn, "shutdown", None)
            if shutdown is not None:
                with contextlib.suppress(OSError, ValueError):
                    shutdown(socket.SHUT_RDWR)
        if paused and runner is not None and not handed_over:
            runner.resume()  # the source runs on: nothing was handed over
        if handed_over and isinstance(e, Exception) and not isinstance(e, MigrationInDoubtError):
            raise MigrationInDoubtError(
                f"the migration was interrupted after the destination was told to run the VM "
                f"({e}): the source stays paused", errno=getattr(e, "errno", None)) from e
        if isinstance(e, KvmError) and not isinstance(e, MigrationError):
            raise MigrationError(f"the migration failed: {e.message}", errno=e.errno,
                                 ioctl=e.ioctl) from e
        raise
    finally:
        if limit is not None:
            limit.close()  # the source's vCPUs run unthrottled again (if they run at all)
        log.close()
    report.total_seconds = time.monotonic() - t0
    report.bytes_sent = w.sent
    return report


class _Prefaulter:
    """Faults the destination's guest memory in ahead of the first pass, on its own thread.

    A first write to a page of fresh anonymous memory costs a page fault, and on a host like
    this project's (a virtual machine whose fresh memory the outer host backs on first touch)
    the fault costs several times the copy: the receiving thread spent most of pass 0
    faulting.  The pass arrives in ascending page order, slot by slot, so this thread
    populates (:meth:`kvmio.Memory.populate`, which releases the GIL) the pages just past the
    stream's position, on another CPU: as far ahead as the data pages of the current stretch
    (records that follow each other within a record's span), at most
    :data:`PREFAULT_WINDOW`.  Whatever the source sends, the pages it populates in all are at
    most the data pages received so far plus :data:`PREFAULT_WINDOW`: a source cannot make the
    destination fill more memory than it sent.  It populates whole 2 MiB blocks on huge pages
    where the kernel gives them (``Memory.populate(huge=True)``: one fault per block, where
    512 small ones cost about four times the CPU here, CPU the running guest competes for).
    Only a hint: pages it has not reached are faulted by the writes, as without it."""

    def __init__(self, memories: Mapping[int, Memory]):
        self._memories = dict(memories)
        self._cond = threading.Condition()
        self._slot: int | None = None
        self._end = -1  # the highest page the stream named in the current stretch
        self._run = 0  # data pages in the current stretch
        self._data = 0  # data pages received in all
        self._stopped = False
        self._shown = 0  # saw() calls so far
        self._settled = 0  # saw() calls the helper had seen when it last ran out of work
        #: Pages populated so far.
        self.pages = 0
        self._thread = threading.Thread(target=self._work, name="kvmio-prefault", daemon=True)
        self._thread.start()

    def saw(self, slot: int, pages: Pages, data: bool) -> None:
        """The receiver stored (``data``) or noted as zero ``pages`` (sorted) of ``slot``."""
        first, last, count = int(pages[0]), int(pages[-1]), len(pages)
        n = count if data else 0
        tail = None
        if last - first >= count + MAX_PAGES_PER_RECORD - 1:
            # A gap of more than a record's span inside the record (the end of a stretch and
            # then lone pages, say): what follows the record follows its part after the
            # last such gap, which starts a stretch of its own.
            gaps = np.flatnonzero(np.diff(pages) > MAX_PAGES_PER_RECORD)
            if len(gaps):
                at = int(gaps[-1]) + 1
                tail = count - at if data else 0
        with self._cond:
            # The stretch goes on from a record that starts within a record's span of its end
            # (or inside it: a block's zero pages go first, then its data).
            if tail is None and slot == self._slot and first <= self._end + MAX_PAGES_PER_RECORD:
                self._run += n
                self._end = max(self._end, last)
            else:
                self._slot, self._run, self._end = slot, n if tail is None else tail, last
            self._data += n
            self._shown += 1
            self._cond.notify()

    def settled(self) -> bool:
        """Whether the helper has done all it will do with the records shown so far (it waits
        for more): for tests and diagnostics."""
        with self._cond:
            return self._settled == self._shown

    def stop(self) -> int:
        """Stop and wait for the thread; the pages it populated."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        return self.pages

    def _work(self) -> None:
        done: dict[int, int] = {}  # per slot: populated up to here
        try:
            while True:
                with self._cond:
                    while True:
                        if self._stopped:
                            return
                        if self._slot is not None:
                            slot, memory = self._slot, self._memories[self._slot]
                            start = max(done.get(slot, 0), self._end + 1)
                            end = min(memory.num_pages,
                                      self._end + 1 + min(self._run, PREFAULT_WINDOW),
                                      start + self._data + PREFAULT_WINDOW - self.pages)
                            # Whole 2 MiB blocks, each in one call on a huge page: up to
                            # the last block boundary before `end` where there is one, and
                            # from a boundary, nothing until the whole block may be (the
                            # window moves on a record, half a block, at a time).
                            into = memory.huge_offset(start)
                            cut = end - memory.huge_offset(end) if end > start else start
                            if cut > start:
                                end = cut
                            elif into == 0 and start + _PREFAULT_STEP <= memory.num_pages:
                                end = start
                            if start < end:
                                break
                        self._settled = self._shown
                        self._cond.wait()
                # At most to the next block boundary (2 MiB steps that stay aligned).
                end = min(end, start + _PREFAULT_STEP - into)
                if not memory.populate(start, end - start, huge=True):
                    return  # the kernel cannot: the writes fault the pages in, as without it
                self.pages += end - start
                done[slot] = end
        except KvmError:
            return  # the memory was closed under it (the receive failed): nothing to do


@dataclass
class ReceivedVm:
    """What :func:`receive_vm` built: the VM (memory and state restored, vCPUs never run),
    its vCPUs by id, the state, the guest's metadata, and what arrived.  Close it (or the
    VM) when done."""

    vm: Vm
    vcpus: dict[int, Vcpu]
    state: MachineState
    guest: dict[str, Any]
    passes: int
    pages: int
    bytes: int
    seconds: float
    #: What ``receive_vm``'s ``accept`` made of it (e.g. a guest object around the VM).
    accepted: Any = None
    #: Pages faulted in ahead of the first pass (``receive_vm(prefault=True)``).
    prefaulted: int = 0

    def close(self) -> None:
        """Close the VM."""
        self.vm.close()


def receive_vm(kvm: Kvm, conn: Connection, *,
               devices: IoBus | Callable[[dict[str, Any]], IoBus | None] | None = None,
               dirty_ring: int | object | None = AS_SAVED, log_dirty: bool | None = None,
               on_bytes: Callable[[int], None] | None = None,
               accept: Callable[[ReceivedVm], Any] | None = None,
               prefault: bool = True) -> ReceivedVm:
    """Build a VM from the migration stream on ``conn`` and answer the source (see the
    module): ``OKAY`` once the VM is restored and accepted, then it waits for the source's
    ``LIVE`` (give ``conn`` a timeout: a source that vanished without closing would be
    waited for as long as the connection allows), answers ``RUNS`` and returns; only then may
    the VM run.  ``accept(received)``: a last check of what arrived (e.g. that it is the
    guest the caller expects), before ``OKAY``: raise :class:`MigrationError` to refuse it
    (the source is told and runs on); its result is kept in ``ReceivedVm.accepted``.
    ``devices``: where the port devices' state goes (required if the source sent
    any), or a function of the guest's metadata that says so once it arrived.
    ``dirty_ring``: the new VM's ring (default: as the source had it); ``log_dirty``: whether
    its slots are dirty-logged (default: as the source's were).  ``prefault``: fault guest
    memory in just ahead of the first pass on a helper thread (see :class:`_Prefaulter`; it
    pays on a host with a CPU to spare).  Raises
    :class:`MigrationError` (and answers ``FAIL`` when it can) for anything wrong; the VM it
    was building is closed then."""
    _check.instance("prefault", prefault, bool)
    if on_bytes is not None and not callable(on_bytes):
        raise KvmInvalidArgumentError("on_bytes must be callable")
    if accept is not None and not callable(accept):
        raise KvmInvalidArgumentError("accept must be callable")
    t0 = time.monotonic()
    r = StreamReader(conn, on_bytes=on_bytes)
    vm: Vm | None = None
    try:
        r.preamble()
        guest = r.config(r.record((b"CONF",)))
        if callable(devices):
            devices = devices(guest)
        layout = r.layout
        assert layout is not None
        memories: dict[int, Memory] = {s.slot: AnonymousMemory(s.size, noreserve=True)
                                       for s in layout.slots}
        try:
            vm, vcpus = build_vm(kvm, layout, memories, dirty_ring=dirty_ring,
                                 log_dirty=log_dirty, what="the migration stream")
        except SnapshotError as e:
            raise MigrationError(e.message, errno=e.errno, ioctl=e.ioctl) from e
        regions = vm.regions
        views = {slot: reg.array(np.uint8).view(_PAGE) for slot, reg in regions.items()}
        into = {slot: reg.array(np.uint8).data for slot, reg in regions.items()}
        zero_page = np.zeros(1, _PAGE)[0]
        written = {slot: np.zeros(reg.num_pages, dtype=np.bool_)
                   for slot, reg in regions.items()}
        passes = pages = 0
        # (bytes received, thread CPU ns) at the start of this pass, and for the last whole one
        pass_start = (r.received, time.thread_time_ns())
        last_pass = (0, 0)
        state: MachineState | None = None
        expect: tuple[bytes, ...] = (b"ZERO", b"DATA", b"ZDAT", b"PASS")
        helper: _Prefaulter | None = None
        prefaulted = 0
        try:
            if prefault:
                helper = _Prefaulter(memories)
            while True:
                # DATA goes straight into guest memory (its indices checked first): the VM does
                # not run unless the whole stream checks out.
                rec = r.record(expect, into=into)
                if rec.tag in (b"DATA", b"ZDAT", b"ZERO"):
                    pr = r.pages(rec)  # checked against the layout before it touches memory
                    if helper is not None and len(pr.pages):
                        helper.saw(pr.slot, pr.pages, rec.tag != b"ZERO")
                    ix = pr.pages.astype(np.intp)
                    if rec.stored:
                        written[pr.slot][ix] = True
                    elif pr.data is not None:
                        views[pr.slot][ix] = pr.data.view(_PAGE)
                        written[pr.slot][ix] = True
                    else:
                        had = ix[written[pr.slot][ix]]  # fresh pages are zero already
                        if len(had):
                            views[pr.slot][had] = zero_page
                            written[pr.slot][had] = False
                    pages += len(ix)
                    expect = (b"ZERO", b"DATA", b"ZDAT", b"PASS")
                elif rec.tag == b"PASS":
                    number, _, _ = r.end_pass(rec)
                    if number != passes:
                        raise MigrationError(f"pass {number} ended where pass {passes} was due")
                    if helper is not None:  # later passes re-send pages stored already
                        prefaulted = helper.stop()
                        helper = None
                    passes += 1
                    now_cpu = time.thread_time_ns()
                    last_pass = (r.received - pass_start[0], now_cpu - pass_start[1])
                    pass_start = (r.received, now_cpu)
                    # The state follows the last pass; a SYNC may follow any.
                    expect = (b"ZERO", b"DATA", b"ZDAT", b"PASS", b"STAT", b"SYNC")
                elif rec.tag == b"SYNC":  # all before it is stored: say so, and how fast
                    if rec.payload:
                        raise MigrationError("the source's SYNC record is not empty")
                    StreamWriter(conn).record(b"SYNC", _SYNC.pack(*last_pass))
                    # Another SYNC may follow (the source times the link's round trip).
                    expect = (b"ZERO", b"DATA", b"ZDAT", b"PASS", b"STAT", b"SYNC")
                elif rec.tag == b"STAT":
                    try:
                        state = MachineState.from_bytes(rec.payload)
                    except SnapshotError as e:
                        raise MigrationError(f"the machine state in the stream is not valid: "
                                             f"{e.message}") from e
                    expect = (b"DONE",)
                else:  # DONE
                    break
        finally:
            if helper is not None:
                prefaulted = helper.stop()
        assert state is not None
        try:
            restore(state, vm, vcpus, devices=devices)
        except SnapshotError as e:
            raise MigrationError(f"the machine state does not fit the VM: {e.message}",
                                 errno=e.errno, ioctl=e.ioctl) from e
        got = ReceivedVm(vm, vcpus, state, guest, passes, pages, r.received,
                         time.monotonic() - t0, prefaulted=prefaulted)
        if accept is not None:
            got.accepted = accept(got)  # may refuse: nothing may fail after RUNS
        StreamWriter(conn).record(b"OKAY")
        r.record((b"LIVE",))  # the source let go of its copy: this one may run
        with contextlib.suppress(MigrationError):  # if lost, the source stays paused
            StreamWriter(conn).record(b"RUNS")
    except BaseException as e:
        if vm is not None:
            vm.close()
        if isinstance(e, MigrationError | KvmError):
            with contextlib.suppress(MigrationError, OSError):
                StreamWriter(conn).record(b"FAIL", str(e).encode()[:4096])
        # No more reading: a source still sending learns at once (EPIPE) instead of filling
        # the connection's buffers and waiting.
        shutdown = getattr(conn, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)
        if isinstance(e, KvmError) and not isinstance(e, MigrationError):
            raise MigrationError(f"the VM could not be received: {e.message}", errno=e.errno,
                                 ioctl=e.ioctl) from e
        raise
    got.bytes, got.seconds = r.received, time.monotonic() - t0
    return got
