"""Benchmark: snapshot files (``kvmio.snapshot.files``), against plain file I/O of the same
bytes measured in the same run.

1. The memory checksum: ``zlib.crc32`` against XXH3-64 (``xxhash``) on a diff's data in the
   caches (1,000 pages, as one buffer and page by page) and on 256 MiB out of them.
2. A diff snapshot of a 1 GiB guest (fully populated) after its vCPU wrote 1,000 random
   pages (57 guest instructions per write; dirty ring): ``Snapshotter.save`` from the dirty
   log to a published layer, against writing the same 4 MiB to a new file.  Goal: <= 5 ms.
3. Restoring that guest's full snapshot (1 GiB of data) into a new VM: lazily without
   verification (goal <= 5 ms), lazily verified, eagerly verified and not; against building
   the same VM with the same state and nothing to read (the floor), and reading the 1 GiB
   file with ``read`` (the reference of a restore that reads).
4. The full snapshot itself, against writing 1 GiB to a new file.

Times are p50 of ``--repeat`` runs, wall clock and CPU time of the calling thread.  The page
cache is warm for every read (the files were just written); restores that read go through
it.

Usage: python bench/snapshot.py [--repeat N] [--json FILE] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from kvmio import DirtyRingFull, IoOut, Kvm, Vcpu, Vm
from kvmio.guests.modes import setup_long_mode
from kvmio.resetbench import CODE_AT, LIST_AT, WRITER
from kvmio.snapshot import MachineState
from kvmio.snapshot.files import Snapshotter, restore_snapshot

PAGE = 4096
GIB = 1 << 30
# The write-list guest of the reset benchmark (kvmio.resetbench has its source): stores each
# (gpa, value) pair of the list at rsi, 57 instructions per write, then ``out 0xE9``.
LOW_SIZE = 2 << 20
HIGH_BASE = 4 << 30
DIRTY = 1_000


def timed(f: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, thread CPU seconds, result)."""
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    out = f()
    return (time.perf_counter_ns() - w0) / 1e9, (time.thread_time_ns() - c0) / 1e9, out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def checksums(repeat: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    diff = rng.integers(0, 256, size=DIRTY * PAGE, dtype=np.uint8).tobytes()
    big = rng.integers(0, 256, size=256 << 20, dtype=np.uint8).tobytes()
    pages = [memoryview(diff)[i * PAGE:(i + 1) * PAGE] for i in range(DIRTY)]
    rows = []
    for name, f in (("zlib.crc32", zlib.crc32), ("xxh3-64", xxhash.xxh3_64_intdigest)):
        one = p50([timed(lambda f=f: f(diff))[0] for _ in range(repeat * 5)])
        per = p50([timed(lambda f=f: [f(p) for p in pages])[0] for _ in range(repeat * 5)])
        out = p50([timed(lambda f=f: f(big))[0] for _ in range(repeat)])
        rows.append({"hash": name, "diff_4MiB_ms": one * 1e3, "pages_1000_ms": per * 1e3,
                     "gb_per_s_out_of_cache": len(big) / out / 1e9})
    return rows


class Guest:
    """A long-mode writer with 1 GiB of dirty-logged memory at 4 GiB, fully populated."""

    def __init__(self, kvm: Kvm):
        self.vm: Vm = kvm.create_vm()
        self.vm.enable_dirty_ring(16384)
        self.vm.add_memory_region(0, LOW_SIZE, log_dirty=True)
        self.mem = self.vm.add_memory_region(HIGH_BASE, GIB, log_dirty=True)
        self.mem.array()[:] = 0x5A
        self.vm.write_memory(CODE_AT, WRITER)
        self.vcpu: Vcpu = self.vm.create_vcpu()
        self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
        setup_long_mode(self.vcpu, self.vm, CODE_AT, identity_map=HIGH_BASE + GIB)
        self.rng = np.random.default_rng(7)
        self.value = 1

    def write_pages(self, n: int) -> None:
        """Let the guest write one value into each of ``n`` distinct random pages."""
        pages = np.sort(self.rng.choice(GIB // PAGE, n, replace=False)).astype(np.uint64)
        pairs = np.stack([np.uint64(HIGH_BASE) + pages * np.uint64(PAGE),
                          np.full(n, self.value, dtype=np.uint64)], axis=1)
        self.value += 1
        self.vm.write_memory(LIST_AT, struct.pack("<Q", n) + pairs.astype("<u8").tobytes())
        r = self.vcpu.get_regs()
        r.rip, r.rsi, r.rflags = CODE_AT, LIST_AT, 2
        self.vcpu.set_regs(r)
        while True:
            ex = self.vcpu.run()
            if isinstance(ex, DirtyRingFull):
                assert self.vcpu.ring is not None
                self.vcpu.ring.drain()
                continue
            assert isinstance(ex, IoOut), ex
            self.vcpu.complete_pending_exit()
            return


def plain_write(path: str, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def plain_read(path: str, buf: memoryview) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buf):
            n = os.readv(fd, [buf[done:]])
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="kvmio-bench-", dir=args.dir)
    results: dict[str, Any] = {}
    try:
        results["checksums"] = checksums(args.repeat)
        print("## memory checksum\n")
        print("| hash | 1,000 pages as one 4 MiB buffer, ms | page by page, ms | "
              "GB/s out of cache |")
        print("|---|---|---|---|")
        for r in results["checksums"]:
            print(f"| {r['hash']} | {r['diff_4MiB_ms']:.2f} | {r['pages_1000_ms']:.2f} | "
                  f"{r['gb_per_s_out_of_cache']:.1f} |")

        with Kvm() as kvm:
            g = Guest(kvm)
            g.write_pages(DIRTY)
            with Snapshotter(g.vm) as snap:
                full_w, full_c, full = timed(lambda: snap.save(os.path.join(root, "full")))
                ref_full = timed(lambda: plain_write(os.path.join(root, "plain-1g"),
                                                     memoryview(g.mem.memory.mapping.mm)))
                diff_w, diff_c, refs_w, refs_c, stored = [], [], [], [], []
                for i in range(args.repeat + 1):
                    g.write_pages(DIRTY)
                    w, c, info = timed(lambda i=i: snap.save(os.path.join(root, f"d{i}")))
                    data = memoryview(bytes(info.stored_pages * PAGE))
                    rw, rc, _ = timed(lambda i=i, data=data: plain_write(
                        os.path.join(root, f"plain-{i}"), data))
                    if i:  # the first diff after the full snapshot runs cold
                        diff_w.append(w)
                        diff_c.append(c)
                        refs_w.append(rw)
                        refs_c.append(rc)
                        stored.append(info.stored_pages)
            g.vm.close()
            results["diff"] = {"pages": p50(stored), "wall_ms": p50(diff_w) * 1e3,
                               "cpu_ms": p50(diff_c) * 1e3, "ref_wall_ms": p50(refs_w) * 1e3,
                               "ref_cpu_ms": p50(refs_c) * 1e3}
            results["full"] = {"pages": full.stored_pages, "wall_ms": full_w * 1e3,
                               "cpu_ms": full_c * 1e3, "ref_wall_ms": ref_full[0] * 1e3,
                               "ref_cpu_ms": ref_full[1] * 1e3}

            full_dir = os.path.join(root, "full")
            with open(os.path.join(full_dir, "state"), "rb") as fh:
                state = MachineState.from_bytes(fh.read())
            buf = memoryview(bytearray(GIB))
            rows: dict[str, list[tuple[float, float]]] = {}

            def floor() -> Vm:  # the same VM and state, nothing to read
                vm = kvm.create_vm()
                vm.enable_dirty_ring(16384)
                vm.add_memory_region(0, LOW_SIZE, log_dirty=True)
                vm.add_memory_region(HIGH_BASE, GIB, log_dirty=True, noreserve=True)
                v = vm.create_vcpu(0)
                state.restore(vm, [v])
                return vm  # closed untimed, as the restored VMs are

            cases: list[tuple[str, Callable[[], Any]]] = [
                ("reference: the same VM and state, no memory", floor),
                ("reference: read the 1 GiB memory file", lambda: plain_read(
                    os.path.join(full_dir, "memory"), buf)),
                ("lazy, unverified", lambda: restore_snapshot(kvm, full_dir, verify=False)),
                ("lazy, verified", lambda: restore_snapshot(kvm, full_dir)),
                ("eager, unverified", lambda: restore_snapshot(kvm, full_dir, lazy=False,
                                                                verify=False)),
                ("eager, verified", lambda: restore_snapshot(kvm, full_dir, lazy=False)),
            ]
            for _ in range(args.repeat):
                for name, f in cases:
                    w, c, out = timed(f)
                    if out is not None:
                        out.close()  # not timed: closing a 1 GiB VM takes its own time
                    rows.setdefault(name, []).append((w, c))
            results["restore"] = {name: {"wall_ms": p50([w for w, _ in v]) * 1e3,
                                         "cpu_ms": p50([c for _, c in v]) * 1e3}
                                  for name, v in rows.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    d, f = results["diff"], results["full"]
    print(f"\n## snapshots of a 1 GiB guest (fully populated; {DIRTY:,} pages written per "
          "diff)\n")
    print("| case | pages | wall ms | CPU ms | plain write of the same bytes, wall ms | "
          "ratio (wall) | goal |")
    print("|---|---|---|---|---|---|---|")
    print(f"| diff snapshot | {d['pages']:,.0f} | {d['wall_ms']:.2f} | {d['cpu_ms']:.2f} | "
          f"{d['ref_wall_ms']:.2f} | {d['wall_ms'] / d['ref_wall_ms']:.2f}x | <= 5 ms |")
    print(f"| full snapshot (once) | {f['pages']:,} | {f['wall_ms']:.1f} | {f['cpu_ms']:.1f} | "
          f"{f['ref_wall_ms']:.1f} | {f['wall_ms'] / f['ref_wall_ms']:.2f}x | - |")
    r = results["restore"]
    base = r["reference: the same VM and state, no memory"]["wall_ms"]
    read = r["reference: read the 1 GiB memory file"]["wall_ms"]
    print("\n## restoring the 1 GiB guest's full snapshot into a new VM\n")
    print("| case | wall ms | CPU ms | x VM floor | x reading the file | goal |")
    print("|---|---|---|---|---|---|")
    for name, v in r.items():
        goal = "<= 5 ms" if name == "lazy, unverified" else "-"
        print(f"| {name} | {v['wall_ms']:.2f} | {v['cpu_ms']:.2f} | {v['wall_ms'] / base:.2f}x "
              f"| {v['wall_ms'] / read:.3f}x | {goal} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
