"""kvmio.snapshot.files: snapshots on disk, restored into new VMs, on the real /dev/kvm.

The guest is a small Multiboot kernel (built here) that prints a line per round over about
half a second; each line depends on guest memory the kernel wrote before, so a restore that
gets one byte of memory wrong, or loses a register, prints something else.  A run cut at
any point, snapshotted and restored in a new VM must print, after the cut, exactly what the
uninterrupted run printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmio import Kvm, KvmStateError, SnapshotError
from kvmio._abi import PAGE_SIZE, ffi
from kvmio.guests.multiboot import MultibootMachine, StopReason
from kvmio.guests.workload import Value, Workload
from kvmio.snapshot import MachineState
from kvmio.snapshot.files import (
    inspect_snapshot,
    merge_snapshots,
    read_chain,
    restore_snapshot,
    save_snapshot,
)
from kvmio.tracker import DirtyTracker

from test_multiboot import CFLAGS, ENTRY_S, LINK_LD, _gcc

MIB = 1 << 20
MEM = 4 * MIB

# Rounds of: 16 pseudo-random read-modify-writes into 256 pages at 2 MiB, a delay in
# registers only (no memory writes: on this host every emulated write is a ring entry),
# and a line "round N <accumulator> <page sum>" through one `rep outsb`; then "done" and a
# debug exit.  The accumulator folds in every value written, each of which depends on the
# word's old value; every 8 rounds one whole page is summed.
TICKER_C = r"""
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define AREA ((volatile u32 *)0x200000)
#define PAGES 256

static void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }

static void out(const char *s, u32 n) {
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"(0xE9) : "memory");
}

static char *hex(char *p, u32 v) {
    int i;
    for (i = 0; i < 8; i++) {
        u32 d = (v >> (28 - 4 * i)) & 15;
        *p++ = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    }
    return p;
}

static char *dec(char *p, u32 v) {
    char t[12];
    int n = 0;
    do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *p++ = t[--n];
    return p;
}

static char *str(char *p, const char *s) { while (*s) *p++ = *s++; return p; }

void kmain(unsigned magic, void *mbi) {
    u32 x = 0x9E3779B9, acc = 0, page_sum = 0, r, k;
    char line[64], *p;
    (void)magic; (void)mbi;
    for (r = 0; r < ROUNDS; r++) {
        for (k = 0; k < 16; k++) {
            u32 i;
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            i = (x % PAGES) * 1024 + ((x >> 8) & 1023);
            AREA[i] = AREA[i] * 33 + (x ^ r);
            acc = (acc << 5 | acc >> 27) ^ AREA[i];
        }
        if ((r & 7) == 7) {
            u32 base = (x % PAGES) * 1024;
            page_sum = 0;
            for (k = 0; k < 1024; k++) page_sum = page_sum * 31 + AREA[base + k];
        }
        { u32 n = DELAY; __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n)); }
        p = str(line, "round ");
        p = dec(p, r);
        *p++ = ' ';
        p = hex(p, acc);
        *p++ = ' ';
        p = hex(p, page_sum);
        *p++ = '\n';
        out(line, (u32)(p - line));
    }
    out("done\n", 5);
    outb(0xF4, 0x21);
}
"""

ROUNDS = 40
EXIT_CODE = (0x21 << 1) | 1


@pytest.fixture(scope="session")
def ticker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ticker kernel (ELF32, Multiboot)."""
    d = tmp_path_factory.mktemp("ticker")
    (d / "entry.S").write_text(ENTRY_S)
    (d / "ticker.c").write_text(TICKER_C)
    (d / "link.ld").write_text(LINK_LD)
    _gcc([*CFLAGS, f"-DROUNDS={ROUNDS}", "-DDELAY=6000", "-Wl,--no-warn-rwx-segments",
          "-Wl,-T,link.ld", "entry.S", "ticker.c", "-o", "ticker.elf"], d)
    return d / "ticker.elf"


@pytest.fixture(scope="session")
def ticker_output(ticker: Path) -> bytes:
    """What the ticker prints when nothing interrupts it."""
    with Kvm() as kvm, MultibootMachine(kvm, ticker, mem=MEM) as m:
        r = m.run(timeout=60)
    assert (r.reason, r.exit_code) == (StopReason.DEBUG_EXIT, EXIT_CODE)
    assert r.output.count(b"\n") == ROUNDS + 1 and r.output.endswith(b"done\n")
    return r.output


class _Cut(Exception):
    pass


def _run_until(m: MultibootMachine, lines: int) -> bytes:
    """Run until the kernel has printed ``lines`` lines (stopped inside that output exit)."""
    out = bytearray()

    def on_output(data: bytes) -> None:
        out.extend(data)
        if out.count(b"\n") >= lines:
            raise _Cut

    with pytest.raises(_Cut):
        m.run(timeout=60, on_output=on_output)
    return bytes(out)


def _run_for(m: MultibootMachine, seconds: float) -> bytes:
    r = m.run(timeout=seconds)
    assert r.reason in (StopReason.TIMEOUT, StopReason.DEBUG_EXIT), r.detail
    return r.output


def _finish(m: MultibootMachine) -> bytes:
    r = m.run(timeout=60)
    assert (r.reason, r.exit_code) == (StopReason.DEBUG_EXIT, EXIT_CODE), r.detail
    return r.output


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _file_hash(path: Path) -> int:
    return xxhash.xxh3_64_intdigest(path.read_bytes())


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_a_restored_kernel_goes_on_as_if_never_stopped(kvm: Kvm, ticker: Path,
                                                       ticker_output: bytes, tmp_path: Path,
                                                       lazy: bool) -> None:
    with MultibootMachine(kvm, ticker, mem=MEM) as m:
        before = _run_until(m, 7)  # inside the output exit of line 7: a pending `rep outsb`
        info = m.snapshot(tmp_path / "s", on_output=lambda d: None)
        memory = m.vm.read_memory(0, MEM)
        assert info.kind == "full" and info.memory_layout == "image"
        assert info.guest["kind"] == "multiboot"
        # only pages holding data are stored, as a sparse file
        assert 0 < info.stored_pages < MEM // PAGE_SIZE // 2
        assert os.stat(tmp_path / "s" / "memory").st_blocks * 512 < MEM // 2
        original_rest = _finish(m)
    assert before + original_rest == ticker_output
    with MultibootMachine.from_snapshot(kvm, tmp_path / "s", lazy=lazy) as r:
        assert r.vm.read_memory(0, MEM) == memory
        assert r.restored_from is not None and r.restored_from.id == info.id
        assert r.image is None and r.entry != 0
        rest = _finish(r)
    assert rest == original_rest


def test_a_snapshot_at_any_moment_restores(kvm: Kvm, ticker: Path, ticker_output: bytes,
                                           tmp_path: Path) -> None:
    # cut by timeouts: at whatever instruction the vCPU is kicked out of
    with MultibootMachine(kvm, ticker, mem=MEM) as m:
        out = b""
        for i in range(3):
            out += _run_for(m, 0.03 + 0.02 * i)
            m.snapshot(tmp_path / f"s{i}")
            with MultibootMachine.from_snapshot(kvm, tmp_path / f"s{i}") as r:
                assert out + _finish(r) == ticker_output


# -- chains -----------------------------------------------------------------------------------


def _chain(kvm: Kvm, ticker: Path, where: Path, layers: int, *, ring: bool,
           step: float = 0.015) -> tuple[list[Path], list[bytes], list[bytes], bytes]:
    """A full snapshot and ``layers - 1`` diffs of the ticker, taken between short runs;
    their paths, the output before each, guest memory at each, and what it printed up to
    its end."""
    paths, outs, mems = [], [], []
    kw: dict[str, Any] = {"ring_entries": 4096} if ring else {"log_dirty": True}
    with MultibootMachine(kvm, ticker, mem=MEM, **kw) as m, m.snapshotter() as chain:
        out = _run_for(m, step)
        for i in range(layers):
            p = where / f"layer{i}"
            info = m.snapshot(p, chain=chain)
            assert info.kind == ("full" if i == 0 else "diff")
            paths.append(p)
            outs.append(out)
            mems.append(m.vm.read_memory(0, MEM))
            out += _run_for(m, step)
        out += _finish(m)
    return paths, outs, mems, out


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "bitmap"])
def test_a_chain_of_ten_layers(kvm: Kvm, ticker: Path, ticker_output: bytes, tmp_path: Path,
                               ring: bool) -> None:
    paths, outs, mems, total = _chain(kvm, ticker, tmp_path, 11, ring=ring)
    assert total == ticker_output
    infos = read_chain(paths[-1])
    assert [i.path for i in infos] == [str(p) for p in paths]
    assert [i.kind for i in infos] == ["full"] + ["diff"] * 10
    for lower, upper in itertools.pairwise(infos):
        assert upper.base is not None and upper.base.id == lower.id
        assert upper.whole_slots == () and upper.memory_layout == "packed"
        # a diff holds what the kernel dirtied in one short step: a few of its 256 pages
        assert upper.stored_pages < 128
    for k in (10, 4):  # the top, and a layer in the middle (its own chain)
        for lazy in (True, False):
            with MultibootMachine.from_snapshot(kvm, paths[k], lazy=lazy) as r:
                assert r.vm.read_memory(0, MEM) == mems[k]
                assert outs[k] + _finish(r) == ticker_output
    # every layer named explicitly, bottom up
    with MultibootMachine.from_snapshot(kvm, [str(p) for p in paths[:8]]) as r:
        assert r.vm.read_memory(0, MEM) == mems[7]


def test_a_restored_machine_snapshots_diffs_on_its_snapshot(kvm: Kvm, ticker: Path,
                                                            ticker_output: bytes,
                                                            tmp_path: Path) -> None:
    with MultibootMachine(kvm, ticker, mem=MEM) as m:
        out = _run_for(m, 0.03)
        m.snapshot(tmp_path / "a")
    with MultibootMachine.from_snapshot(kvm, tmp_path / "a", log_dirty=True) as r, \
            r.snapshotter() as chain:
        out += _run_for(r, 0.03)
        info = r.snapshot(tmp_path / "b", chain=chain)
        memory = r.vm.read_memory(0, MEM)
    assert info.kind == "diff" and info.base is not None
    assert info.base.path == "../a"
    with MultibootMachine.from_snapshot(kvm, tmp_path / "b") as r2:
        assert r2.vm.read_memory(0, MEM) == memory
        assert out + _finish(r2) == ticker_output


def test_merges(kvm: Kvm, ticker: Path, ticker_output: bytes, tmp_path: Path) -> None:
    paths, outs, mems, _ = _chain(kvm, ticker, tmp_path, 4, ring=True)
    merged = merge_snapshots(paths[-1], tmp_path / "merged")
    assert merged.kind == "full" and merged.base is None
    assert read_chain(tmp_path / "merged") == [merged]
    # a merge of the first two layers, named explicitly: the memory of layer 1
    two = merge_snapshots([paths[0], paths[1]], tmp_path / "two")
    top = inspect_snapshot(paths[-1])
    assert merged.machine == top.machine and merged.guest == top.guest
    for lazy in (True, False):
        with MultibootMachine.from_snapshot(kvm, tmp_path / "merged", lazy=lazy) as r:
            assert r.vm.read_memory(0, MEM) == mems[-1]
            assert outs[-1] + _finish(r) == ticker_output
    with MultibootMachine.from_snapshot(kvm, tmp_path / "two") as r:
        assert r.vm.read_memory(0, MEM) == mems[1]
    assert two.stored_pages <= merged.stored_pages + 64
    # merging a full snapshot gives the same memory again
    again = merge_snapshots(tmp_path / "merged", tmp_path / "again")
    assert again.stored_pages == merged.stored_pages
    assert (tmp_path / "again" / "state").read_bytes() == (paths[-1] / "state").read_bytes()


# -- clones -------------------------------------------------------------------------------------


def test_clones_share_the_file_and_diverge(kvm: Kvm, ticker: Path, ticker_output: bytes,
                                           tmp_path: Path) -> None:
    with MultibootMachine(kvm, ticker, mem=MEM) as m:
        before = _run_until(m, 5)
        m.snapshot(tmp_path / "s", on_output=lambda d: None)
    mem_file = tmp_path / "s" / "memory"
    digest, mtime = _file_hash(mem_file), os.stat(mem_file).st_mtime_ns
    with MultibootMachine.from_snapshot(kvm, tmp_path / "s") as a, \
            MultibootMachine.from_snapshot(kvm, tmp_path / "s") as b:
        # nothing copied yet: both read the file's pages (the page cache, shared)
        assert len(a.ram.memory.populated_pages()) == 0
        assert len(b.ram.memory.populated_pages()) == 0
        # b diverges: its host changes the words the kernel reads next, then it runs
        b.vm.write_memory(0x200000, b"\x5a" * MIB)
        rest_a = _finish(a)
        rest_b = _finish(b)
        assert before + rest_a == ticker_output
        assert rest_b != rest_a
        # each has copies of only the pages it wrote (copy-on-write)
        written_a = len(a.ram.memory.populated_pages())
        assert 0 < written_a < MEM // PAGE_SIZE // 4
        assert a.vm.read_memory(0x200000, 4) != b.vm.read_memory(0x200000, 4)
        # a full snapshot of a lazily restored machine holds the file's pages and its own
        again = a.snapshot(tmp_path / "again")
        assert again.stored_pages >= inspect_snapshot(tmp_path / "s").stored_pages
        memory_a = a.vm.read_memory(0, MEM)
    with restore_snapshot(kvm, tmp_path / "again") as r:
        assert r.vm.read_memory(0, MEM) == memory_a
    assert _file_hash(mem_file) == digest and os.stat(mem_file).st_mtime_ns == mtime
    # and the file still restores what it held
    with MultibootMachine.from_snapshot(kvm, tmp_path / "s") as c:
        assert before + _finish(c) == ticker_output


# -- the built-in workload, copied while it runs ---------------------------------------------


@pytest.mark.parametrize("tracked", [False, True], ids=["rings", "tracker"])
def test_live_diffs_of_a_running_workload(kvm: Kvm, tmp_path: Path, tracked: bool) -> None:
    # Each write stores the vCPU's write count, so the final memory depends on every page
    # the diff holds: a restored copy run to the end must equal the original at its end.
    kw: dict[str, Any] = {"mem_size": 16 * MIB, "max_writes": 15_000, "value": Value.COUNT,
                          "ring_entries": 4096, "vcpus": 2, "shared": False}
    with Workload(kvm, **kw) as w:
        tracker = DirtyTracker(w.vm, interval=0.02).start() if tracked else None
        with (contextlib.closing(tracker) if tracker is not None else contextlib.nullcontext(),
              w.snapshotter(tracker=tracker) as chain):
            full = w.snapshot(tmp_path / "full", chain=chain)
            assert full.kind == "full"
            on_ring_full = tracker.on_ring_full if tracker is not None else None
            with w.runner(on_ring_full=on_ring_full) as runner:
                _wait(lambda: w.total_writes() > 5_000)
                diff = w.snapshot(tmp_path / "diff", chain=chain, runner=runner,
                                  live_passes=2)
                assert runner.running and not runner.paused
                runner.wait(60)
            assert w.total_writes() == 30_000
        final_low = w.vm.read_memory(0, 4 * MIB)
        final = w.vm.read_memory(w.mem_base, 16 * MIB)
    assert diff.kind == "diff" and diff.whole_slots == (0,)  # the low slot is not logged
    assert 0 < diff.stored_pages < 16 * MIB // PAGE_SIZE
    for lazy in (True, False):
        with Workload.from_snapshot(kvm, tmp_path / "diff", lazy=lazy) as r:
            assert 5_000 < r.total_writes() < 30_000
            r.run_all(timeout=60)
            assert r.total_writes() == 30_000
            assert r.vm.read_memory(w.mem_base, 16 * MIB) == final
            # the vCPUs' own parameter blocks agree too
            assert r.vm.read_memory(0x1000, 0x200) == final_low[0x1000:0x1200]


def _wait(cond: Callable[[], bool], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


# -- bad input ----------------------------------------------------------------------------------

FILES = ("manifest", "state", "index", "memory")


@pytest.fixture(scope="module")
def kvm_module() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory, ticker: Path) -> dict[str, Path]:
    """A full snapshot and a diff on it (writable files, to be damaged and mended)."""
    d = tmp_path_factory.mktemp("layers")
    with Kvm() as kvm, MultibootMachine(kvm, ticker, mem=MEM, log_dirty=True) as m, \
            m.snapshotter() as chain:
        _run_until(m, 5)
        m.snapshot(d / "full", chain=chain, on_output=lambda b: None)
        _run_until(m, 9)
        m.snapshot(d / "diff", chain=chain, on_output=lambda b: None)
    for p in d.glob("*/*"):
        p.chmod(0o644)
    return {"full": d / "full", "diff": d / "diff"}


def _stored_ranges(layer: Path) -> list[tuple[int, int]]:
    from kvmio.snapshot._layer import read_layer

    runs = read_layer(layer).runs
    return [(int(o), int(n) * PAGE_SIZE) for o, n in zip(runs["offset"], runs["pages"],
                                                         strict=True)]


@contextlib.contextmanager
def _patched(path: Path, pos: int, data: bytes) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, len(data), pos)
        os.pwrite(fd, data, pos)
        try:
            yield
        finally:
            os.pwrite(fd, old, pos)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _resized(path: Path, size: int, extra: bytes = b"") -> Iterator[None]:
    fd = os.open(path, os.O_RDWR)
    try:
        length = os.fstat(fd).st_size
        tail = os.pread(fd, max(0, length - size), size)
        if extra:
            os.pwrite(fd, extra, length)
        else:
            os.ftruncate(fd, size)
        try:
            yield
        finally:
            if extra:
                os.ftruncate(fd, length)
            else:
                os.pwrite(fd, tail, size)
    finally:
        os.close(fd)


def _refused(kvm: Kvm, top: Path, layer: Path, lazy: bool, match: str | None = None) -> None:
    with pytest.raises(SnapshotError, match=match):
        restore_snapshot(kvm, top, lazy=lazy).close()
    with pytest.raises(SnapshotError, match=match):
        inspect_snapshot(layer)


def test_the_layers_are_sound(kvm: Kvm, layers: dict[str, Path]) -> None:
    for name in ("full", "diff"):
        assert inspect_snapshot(layers[name]).checked == "all"
    for lazy in (True, False):
        restore_snapshot(kvm, layers["diff"], lazy=lazy).close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_flipped_byte_is_refused(kvm_module: Kvm, layers: dict[str, Path],
                                     data: st.DataObject) -> None:
    layer = layers[data.draw(st.sampled_from(["full", "diff"]), label="layer")]
    name = data.draw(st.sampled_from(FILES), label="file")
    path = layer / name
    size = path.stat().st_size
    if name == "memory" and data.draw(st.booleans(), label="in stored data"):
        off, length = data.draw(st.sampled_from(_stored_ranges(layer)), label="run")
        pos = off + data.draw(st.integers(0, length - 1), label="offset in run")
    else:
        pos = data.draw(st.integers(0, size - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    with open(path, "rb") as f:
        f.seek(pos)
        old = f.read(1)[0]
    with _patched(path, pos, bytes([old ^ flip])):
        _refused(kvm_module, layers["diff"], layer, data.draw(st.booleans(), label="lazy"))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_truncation_or_extension_is_refused(kvm_module: Kvm, layers: dict[str, Path],
                                                data: st.DataObject) -> None:
    layer = layers[data.draw(st.sampled_from(["full", "diff"]), label="layer")]
    path = layer / data.draw(st.sampled_from(FILES), label="file")
    size = path.stat().st_size
    if data.draw(st.booleans(), label="extend"):
        change = _resized(path, size, data.draw(st.binary(min_size=1, max_size=64)))
    else:
        change = _resized(path, data.draw(st.integers(0, size - 1), label="new size"))
    with change:
        _refused(kvm_module, layers["diff"], layer, data.draw(st.booleans(), label="lazy"))


def _reseal(layer: Path, change: Callable[[dict[str, Any]], None], *,
            version: int = 1) -> None:
    """Rewrite a layer's manifest with ``change`` made to its JSON, with a valid checksum."""
    path = layer / "manifest"
    raw = path.read_bytes()
    obj = json.loads(raw[raw.index(b"\n") + 1:])
    change(obj)
    body = (json.dumps(obj, indent=1) + "\n").encode()
    head = f"kvmio-snapshot {version} xxh3={xxhash.xxh3_64_intdigest(body):016x} " \
           f"bytes={len(body)}\n"
    path.chmod(0o644)
    path.write_bytes(head.encode() + body)


@contextlib.contextmanager
def _kept(layer: Path, *names: str) -> Iterator[None]:
    saved = {n: (layer / n).read_bytes() for n in names}
    try:
        yield
    finally:
        for n, b in saved.items():
            (layer / n).chmod(0o644)
            (layer / n).write_bytes(b)


def _json_values() -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                     st.text(max_size=12), st.sampled_from(["", "full", "diff", "image",
                                                            "packed", "x86_64", "0" * 32]))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.text(max_size=8), c, max_size=3), max_leaves=6)


def _mutate(obj: Any, data: st.DataObject) -> None:
    """Change one thing somewhere in ``obj`` (a dict or list): a value, a deletion, a new
    key, or a number nudged."""
    while True:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        if not keys:
            return
        k = data.draw(st.sampled_from(keys))
        child = obj[k]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            obj = child
            continue
        what = data.draw(st.sampled_from(["replace", "delete", "add", "nudge"]))
        if what == "delete" and isinstance(obj, dict):
            del obj[k]
        elif what == "add" and isinstance(obj, dict):
            obj[data.draw(st.text(min_size=1, max_size=8))] = data.draw(_json_values())
        elif what == "nudge" and isinstance(child, int) and not isinstance(child, bool):
            obj[k] = child + data.draw(st.sampled_from([-PAGE_SIZE, -1, 1, PAGE_SIZE,
                                                        1 << 32]))
        else:
            obj[k] = data.draw(_json_values())
        return


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_a_crafted_manifest_with_a_valid_checksum_raises_only_snapshot_errors(
        kvm_module: Kvm, layers: dict[str, Path], data: st.DataObject) -> None:
    layer = layers[data.draw(st.sampled_from(["full", "diff"]), label="layer")]
    with _kept(layer, "manifest"):
        _reseal(layer, lambda obj: _mutate(obj, data))
        with contextlib.suppress(SnapshotError):
            restore_snapshot(kvm_module, layers["diff"], lazy=data.draw(st.booleans())).close()


def test_another_format_version_is_refused(kvm: Kvm, layers: dict[str, Path]) -> None:
    full = layers["full"]
    with _kept(full, "manifest"):
        _reseal(full, lambda obj: obj.update(version=2), version=2)
        _refused(kvm, full, full, True, match="format version 2; this kvmio reads version 1")
    with _kept(full, "manifest"):
        _reseal(full, lambda obj: obj.update(version=2))
        _refused(kvm, full, full, True, match="version differs from the first line")
    with _kept(full, "index"):
        raw = bytearray((full / "index").read_bytes())
        raw[8:10] = struct.pack("<H", 2)
        (full / "index").write_bytes(bytes(raw))
        _refused(kvm, full, full, True, match="index")
    with _kept(full, "state"):  # the state's own version (and its CRC), re-hashed in the manifest
        st_raw = bytearray((full / "state").read_bytes())
        st_raw[8:10] = struct.pack("<H", 2)
        (full / "state").write_bytes(bytes(st_raw))
        with _kept(full, "manifest"):
            _reseal(full, lambda obj: obj["state"].update(
                xxh3=f"{xxhash.xxh3_64_intdigest(bytes(st_raw)):016x}"))
            _refused(kvm, full, full, True, match="state of .*version")


def test_a_diff_on_another_base_is_refused(kvm: Kvm, ticker: Path, layers: dict[str, Path],
                                           tmp_path: Path) -> None:
    with MultibootMachine(kvm, ticker, mem=MEM, log_dirty=True) as m, m.snapshotter() as c:
        _run_until(m, 3)
        m.snapshot(tmp_path / "other", chain=c, on_output=lambda b: None)
    full, diff = layers["full"], layers["diff"]
    with pytest.raises(SnapshotError, match=r"is a diff on snapshot .*, not on"):
        restore_snapshot(kvm, [tmp_path / "other", diff])
    with pytest.raises(SnapshotError, match=r"is a diff on snapshot .*, not on"):
        merge_snapshots([tmp_path / "other", diff], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    # the base found through the diff's hint is another snapshot
    moved = tmp_path / "moved"
    shutil.copytree(full.parent, moved)
    shutil.rmtree(moved / "full")
    shutil.copytree(tmp_path / "other", moved / "full")
    with pytest.raises(SnapshotError, match=r"is a diff on snapshot .*, not on"):
        restore_snapshot(kvm, moved / "diff")
    # the base has the right id but was changed since (here: its metadata)
    with _kept(full, "manifest"):
        _reseal(full, lambda obj: obj["guest"].update(cmdline="changed"))
        with pytest.raises(SnapshotError, match="has that id and another manifest"):
            restore_snapshot(kvm, diff)
    # a diff alone, or first
    with pytest.raises(SnapshotError, match="a chain starts with a full snapshot"):
        restore_snapshot(kvm, [diff])
    with pytest.raises(SnapshotError, match="only the first layer of a chain"):
        restore_snapshot(kvm, [full, full])
    # a missing base
    gone = tmp_path / "gone"
    shutil.copytree(diff, gone / "diff")
    with pytest.raises(SnapshotError, match=r"the base of .*no snapshot at"):
        restore_snapshot(kvm, gone / "diff")


def test_a_snapshot_that_does_not_fit_is_refused(kvm: Kvm, ticker: Path, layers: dict[str, Path],
                                                 tmp_path: Path) -> None:
    full = layers["full"]
    # memory of a machine with more RAM
    with MultibootMachine(kvm, ticker, mem=2 * MEM) as m:
        _run_until(m, 2)
        m.snapshot(tmp_path / "big", on_output=lambda b: None)
    with _kept(full, "memory"):
        (full / "memory").write_bytes((tmp_path / "big" / "memory").read_bytes())
        _refused(kvm, full, full, True, match="bytes, the manifest says")
    # a manifest whose slot no longer matches its index and memory
    with _kept(full, "manifest"):
        _reseal(full, lambda obj: obj["machine"]["slots"][0].update(size=2 * MEM))
        _refused(kvm, full, full, True, match="memory.bytes must be the slots' total size")
    with _kept(full, "manifest"):
        _reseal(full, lambda obj: (obj["machine"]["slots"][0].update(size=MEM // 2),
                                   obj["memory"].update(bytes=MEM // 2)))
        _refused(kvm, full, full, True, match="a run lies outside its slot|not at its place")
    with _kept(full, "manifest"):
        _reseal(full, lambda obj: obj["machine"].update(page_size=2 * PAGE_SIZE))
        _refused(kvm, full, full, True, match="this host's pages are")
    # a guest of another kind
    with Workload(kvm, mem_size=MIB, max_writes=10) as w:
        w.run_all(timeout=30)
        w.snapshot(tmp_path / "workload")
    with pytest.raises(SnapshotError, match="not a snapshot of a multiboot guest"):
        MultibootMachine.from_snapshot(kvm, tmp_path / "workload")
    with pytest.raises(SnapshotError, match="not a snapshot of a workload guest"):
        Workload.from_snapshot(kvm, full)
    # not a snapshot at all
    with pytest.raises(SnapshotError, match="no snapshot at"):
        restore_snapshot(kvm, tmp_path / "nothing")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "manifest").write_text("hello\n")
    with pytest.raises(SnapshotError, match="not a kvmio snapshot manifest"):
        inspect_snapshot(tmp_path / "text")


def _bad_cr0(layer: Path) -> None:
    """Give the layer's vCPU a state the kernel refuses (CR0.PG without CR0.PE), re-hashed."""
    state = MachineState.from_bytes((layer / "state").read_bytes())
    v = state.vcpus[0]
    sregs = bytearray(v.sregs)
    off = ffi.offsetof("struct kvm_sregs", "cr0")
    sregs[off:off + 8] = struct.pack("<Q", 1 << 31)
    bad = MachineState(state.vm, {0: dataclasses.replace(v, sregs=bytes(sregs))}, state.devices)
    raw = bad.to_bytes()
    (layer / "state").write_bytes(raw)
    _reseal(layer, lambda obj: obj["state"].update(
        bytes=len(raw), xxh3=f"{xxhash.xxh3_64_intdigest(raw):016x}"))


def test_a_failed_restore_closes_everything_it_made(kvm: Kvm, layers: dict[str, Path]) -> None:
    full, diff = layers["full"], layers["diff"]
    restore_snapshot(kvm, diff).close()  # warm up (imports, caches)
    fds, maps = _fds(), _maps()
    (off, _), *_ = _stored_ranges(full)
    for lazy in (True, False):
        # memory checked after mapping or reading it
        with (_patched(full / "memory", off + 100, b"\xff"),
              pytest.raises(SnapshotError, match="do not match their checksums")):
            restore_snapshot(kvm, diff, lazy=lazy)
        # the kernel refuses the state: after the VM was made
        with _kept(full, "state", "manifest"):
            _bad_cr0(full)
            with pytest.raises(SnapshotError, match="KVM_SET_SREGS") as e:
                restore_snapshot(kvm, full, lazy=lazy)
            assert e.value.errno == errno.EINVAL
    assert _fds() == fds
    assert _maps() <= maps + 2


def test_verify_false_skips_only_the_memory_checksums(kvm: Kvm, layers: dict[str, Path]) -> None:
    full = layers["full"]
    (off, _), *_ = _stored_ranges(full)
    with _patched(full / "memory", off + 100, b"\xff"):
        with restore_snapshot(kvm, full, verify=False) as r:  # trusted: it says so
            assert r.vm.read_memory(100, 1) == b"\xff" or off != 0
        with pytest.raises(SnapshotError):
            inspect_snapshot(full)
        assert inspect_snapshot(full, verify=False).checked == "metadata"
    with _patched(full / "index", 40, b"\xff"), pytest.raises(SnapshotError, match="index"):
        restore_snapshot(kvm, full, verify=False)


def test_saving_refuses_what_it_cannot_do(kvm: Kvm, ticker: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with MultibootMachine(kvm, ticker, mem=MEM) as m:
        _run_for(m, 0.01)
        with pytest.raises(SnapshotError, match="it exists"):
            m.snapshot(tmp_path / "full")
        with pytest.raises(SnapshotError, match="does not exist"):
            m.snapshot(tmp_path / "no" / "such")
        (tmp_path / "empty").mkdir()
        m.snapshot(tmp_path / "empty")  # an empty directory is taken
        assert inspect_snapshot(tmp_path / "empty").kind == "full"
        # nothing is left behind by a failed save
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]
        for p in (tmp_path / "empty").iterdir():
            assert p.stat().st_mode & 0o777 == 0o444
    with Workload(kvm, mem_size=MIB, max_writes=0) as w, w.runner() as runner:
        _wait(lambda: w.total_writes() > 10)
        with pytest.raises(KvmStateError, match="running"):
            save_snapshot(tmp_path / "running", w.vm)
        runner.stop()
    assert not (tmp_path / "running").exists()


# -- the command line -----------------------------------------------------------------------------


def _cli(args: list[str]) -> Any:
    from kvmio.cli import main

    from test_multiboot import _runner

    return _runner().invoke(main, [str(a) for a in args])


@pytest.mark.usefixtures("kvm")
def test_cli_take_inspect_restore_merge(ticker: Path, ticker_output: bytes,
                                        tmp_path: Path) -> None:
    s0, s1, s2 = tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"
    r = _cli(["snapshot", "take", s0, "--kernel", ticker, "--mem", "4M", "--after", "0.05",
              "--diff", s1, "--diff", s2, "--every", "0.03", "--json", tmp_path / "t.json"])
    assert r.exit_code == 0, r.stderr
    before = r.stdout_bytes
    assert ticker_output.startswith(before)
    assert r.stderr.count("kvmio: wrote ") == 3 and f"wrote {s2}: diff on ../s1" in r.stderr
    written = json.loads((tmp_path / "t.json").read_text())
    assert [w["kind"] for w in written] == ["full", "diff", "diff"]

    r = _cli(["snapshot", "inspect", s2, "--json", tmp_path / "i.json"])
    assert r.exit_code == 0, r.stderr
    for text in ("version 1", "diff on", "Multiboot kernel, 4 MiB RAM",
                 "memory ok", f"diff {s2} <- diff {s1} <- full {s0}"):
        assert text in r.stdout, text
    seen = json.loads((tmp_path / "i.json").read_text())
    assert seen["layer"]["checked"] == "all" and len(seen["chain"]) == 3
    assert "not checked (--quick)" in _cli(["snapshot", "inspect", s0 / "manifest",
                                            "--quick"]).stdout

    r = _cli(["restore", s2])
    assert r.exit_code == EXIT_CODE, r.stderr
    assert before + r.stdout_bytes == ticker_output
    assert "debug exit" in r.stderr

    r = _cli(["snapshot", "merge", s2, tmp_path / "m"])
    assert r.exit_code == 0 and "wrote" in r.stderr and ": full," in r.stderr, r.stderr
    r = _cli(["restore", tmp_path / "m", "--eager"])
    assert r.exit_code == EXIT_CODE and before + r.stdout_bytes == ticker_output

    # a restore that writes a diff on what it restored, then stops
    r = _cli(["restore", s2, "--no-verify", "--snapshot", tmp_path / "s3", "--after", "0.05"])
    assert r.exit_code in (0, EXIT_CODE), r.stderr
    middle = r.stdout_bytes
    assert f"wrote {tmp_path / 's3'}: diff on ../s2" in r.stderr
    r = _cli(["restore", tmp_path / "s3"])
    assert before + middle + r.stdout_bytes == ticker_output


@pytest.mark.usefixtures("kvm")
def test_cli_workload_take_and_restore(tmp_path: Path) -> None:
    r = _cli(["snapshot", "take", tmp_path / "w", "--mem", "16M", "--writes", "20000",
              "--after", "0.2", "--diff", tmp_path / "w1", "--every", "0.1"])
    assert r.exit_code == 0, r.stderr
    assert "writes so far" in r.stderr and f"wrote {tmp_path / 'w1'}: diff" in r.stderr
    r = _cli(["restore", tmp_path / "w1", "--timeout", "60"])
    assert r.exit_code == 0, r.stderr
    assert "20,000 in all" in r.stderr and "its vCPUs halted" in r.stderr


@pytest.mark.usefixtures("kvm")
def test_cli_snapshot_errors(ticker: Path, layers: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    r = _cli(["snapshot", "take", tmp_path / "full", "--kernel", ticker, "--mem", "4M"])
    assert r.exit_code == 2 and "exists" in r.stderr
    r = _cli(["restore", tmp_path / "none"])
    assert r.exit_code == 1 and "Error: cannot restore" in r.stderr and "no snapshot at" in r.stderr
    assert "Traceback" not in r.stderr
    (off, _), *_ = _stored_ranges(layers["full"])
    with _patched(layers["full"] / "memory", off + 8, b"\x01\x02"):
        r = _cli(["snapshot", "inspect", layers["diff"]])
        assert r.exit_code == 0  # the diff itself is sound; its base is checked by restores
        r = _cli(["snapshot", "inspect", layers["full"]])
        assert r.exit_code == 1 and "does not match its checksum" in r.stderr, r.stderr
        r = _cli(["restore", layers["diff"]])
        assert r.exit_code == 1 and "do not match their checksums" in r.stderr
    gone = tmp_path / "gone"
    shutil.copytree(layers["diff"], gone / "diff")
    r = _cli(["snapshot", "inspect", gone / "diff"])
    assert r.exit_code == 1 and "cannot follow the chain" in r.stdout


@pytest.mark.usefixtures("kvm")
def test_cli_ctrl_c_while_taking_writes_nothing(tmp_path: Path) -> None:
    import selectors
    import signal
    import subprocess
    import sys

    kvmio = str(Path(sys.executable).with_name("kvmio"))
    with subprocess.Popen([kvmio, "snapshot", "take", str(tmp_path / "s"), "--mem", "16M",
                           "--after", "600"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as p:
        assert p.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stderr, selectors.EVENT_READ)
        try:
            # Interrupted once the workload runs (it says so), not after a guessed delay that
            # a busy machine can turn into "still importing".
            early = b""
            end = time.monotonic() + 120
            while b"the workload runs" not in early:
                left = end - time.monotonic()
                assert left > 0 and p.poll() is None, early
                if sel.select(left):
                    chunk = os.read(p.stderr.fileno(), 65536)
                    assert chunk, early
                    early += chunk
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
            err = early + err
        finally:
            sel.close()
            if p.poll() is None:
                p.kill()
    assert p.returncode == 130, err
    assert b"Interrupted." in err and b"Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_ring_overrun_makes_the_diff_hold_the_slot_whole(kvm: Kvm, tmp_path: Path) -> None:
    # The dense 'burst' writer overruns the ring by construction: which pages it wrote is
    # unknown, so the diff must hold the slot whole, and still restore exactly.
    from kvmio import Hlt
    from kvmio.guests.workload import MEM_SLOT

    from guests import burst, wait_until

    with Workload(kvm, mem_size=64 * MIB, ring_entries=4096, max_writes=100,
                  order="sequential", value="count") as w:
        assert isinstance(w.run_vcpu(0), Hlt)
        with DirtyTracker(w.vm, "ring", interval=3600.0) as tracker, \
                w.snapshotter(tracker=tracker) as chain:
            w.snapshot(tmp_path / "full", chain=chain)
            burst(w)
            with w.runner(on_ring_full=tracker.on_ring_full) as r:
                wait_until(lambda: tracker.recoveries >= 1 or not r.running,
                           what="the ring to overrun and be recovered")
                r.pause()
                diff = w.snapshot(tmp_path / "diff", chain=chain, runner=r)
                low = w.vm.read_memory(0, 4 * MIB)
                mem = w.vm.read_memory(w.mem_base, 64 * MIB)
        assert diff.kind == "diff" and MEM_SLOT in diff.whole_slots
        with restore_snapshot(kvm, tmp_path / "diff") as rv:
            assert rv.vm.read_memory(0, 4 * MIB) == low
            assert rv.vm.read_memory(w.mem_base, 64 * MIB) == mem


def test_an_eager_restore_populates_exactly_the_stored_pages(kvm: Kvm, tmp_path: Path) -> None:
    """An eager restore reads long runs into memory it populated first (whole 2 MiB blocks
    on huge pages): the restored slot holds the same bytes, and no page more than stored."""
    from test_memory import THP, _huge_flagged

    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 32 << 20, log_dirty=True)
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        run = range(700, 700 + 1500)  # a long run: at least one whole block inside
        for p in [*run, 5000, 5002, 7000]:
            vm.write_memory(p * PAGE_SIZE + 16, (p + 1).to_bytes(8, "little"))
        want = vm.regions[0].memory.populated_pages().tolist()
        save_snapshot(tmp_path / "snap", vm)
    with restore_snapshot(kvm, tmp_path / "snap", lazy=False) as r:
        memory = r.vm.regions[0].memory
        assert memory.populated_pages().tolist() == want
        words = r.vm.regions[0].array(np.uint64).reshape(-1, PAGE_SIZE // 8)
        for p in want:
            assert int(words[p][2]) == p + 1 and int(words[p].sum()) == p + 1
        del words
        start, end = memory.huge_blocks(run.start, len(run))
        assert end > start
        flagged = _huge_flagged(memory.mapping.address, memory.size)
        if THP is not None:  # else no mark is made
            assert flagged == [(memory.mapping.address + start * PAGE_SIZE,
                                memory.mapping.address + end * PAGE_SIZE)]
