"""Benchmark: resetting guest memory to a checkpoint (``MemoryCheckpoint.reset``) against a
full-memory copy, by dirty pages and guest size, in ring and bitmap mode.

Each cycle lets a long-mode guest write one 8-byte value into each of ``N`` distinct pages
(chosen at random among the populated pages, the same ones every cycle; 57 guest
instructions per write, lossless for the ring even when a write also dirties a page-table
page), then resets.  The reference is the reset a checkpoint without dirty tracking must do:
copy every page the checkpoint holds back into guest memory (one ``memcpy`` for a dense
guest, a scatter of the stored pages for a sparse one), measured in the same run after the
same guest work.  Guests: 64 MiB and 1 GiB fully populated, and 64 GiB
sparse (``MAP_NORESERVE``) with 1 GiB populated, spread over all of it.

Reported per row: the p50 of the whole reset in wall time and in CPU time of the calling
thread (``time.thread_time_ns``: a busy host's other processes do not count), the p50 of its
collection (harvest and reset of the ring, or GET_DIRTY_LOG) and of the rest (restoring the
pages, bookkeeping), the reference's p50 (wall), and the ratio reset / reference.  The first
Python code after KVM_RUN runs cold on this host, and each reset follows a guest run, as in
real use.  The pages a reset restores include the pages of the guest's write list (a host
write) and the page-table pages whose entries the guest's CPU marks accessed and dirty (one
per GiB touched: up to 64 more in the 64 GiB guest).

Usage: python bench/reset.py [--repeat N] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import time
from typing import Any

import numpy as np

from kvmio import DirtyRingFull, IoOut, Kvm, Vcpu, Vm
from kvmio.guests.modes import setup_long_mode
from kvmio.snapshot.memory import MemoryCheckpoint

PAGE = 4096
#: The write-list guest (long mode; as tests/test_memory_checkpoint.py, which has its
#: source): stores each (gpa, value) pair of the list at rsi, 57 instructions per write,
#: then ``out 0xE9``.
WRITER = bytes.fromhex("488b0e4883c6084885c9741c488b06488b56084889104883c610bb18000000"
                       "ffcb75fc48ffc9ebdfe6e9f4")
CODE_AT = 0x10000
LIST_AT = 0x20000
LOW_SIZE = 2 << 20
HIGH_BASE = 4 << 30
GUESTS = [("64 MiB", 64 << 20, 64 << 20), ("1 GiB", 1 << 30, 1 << 30),
          ("64 GiB sparse", 64 << 30, 1 << 30)]
DIRTY = [1, 10, 100, 1_000, 10_000]


class Bench:
    """One VM: a low slot (code, write list, page tables) and the guest memory at 4 GiB."""

    def __init__(self, kvm: Kvm, mode: str, size: int, populated: int, seed: int = 1):
        self.vm: Vm = kvm.create_vm()
        if mode == "ring":
            self.vm.enable_dirty_ring(16384)
        self.vm.add_memory_region(0, LOW_SIZE, log_dirty=True)
        self.mem = self.vm.add_memory_region(HIGH_BASE, size, log_dirty=True, noreserve=True)
        self.vm.write_memory(CODE_AT, WRITER)
        self.vcpu: Vcpu = self.vm.create_vcpu()
        self.vcpu.set_cpuid2(kvm.get_supported_cpuid())  # memory above 64 GiB
        setup_long_mode(self.vcpu, self.vm, CODE_AT, identity_map=HIGH_BASE + size)
        rng = np.random.default_rng(seed)
        pages = size // PAGE
        if populated >= size:
            self.populated = np.arange(pages, dtype=np.uint64)
            self.mem.array()[:] = 0x5A
        else:
            self.populated = np.sort(rng.choice(pages, populated // PAGE, replace=False)
                                     ).astype(np.uint64)
            self.mem.array().reshape(-1, PAGE)[self.populated.astype(np.intp)] = 0x5A
        self.rng = rng
        self.pages: dict[int, np.ndarray[Any, np.dtype[np.uint64]]] = {}
        self.cp = MemoryCheckpoint.take(self.vm)
        _, self.stored = self.cp.stored(1)

    def close(self) -> None:
        self.cp.close()
        self.vm.close()

    def dirty(self, n: int) -> None:
        """Let the guest write one value into each of ``n`` distinct populated pages."""
        pages = self.pages[n]
        block = struct.pack("<Q", n) + np.stack(
            [np.uint64(HIGH_BASE) + pages * np.uint64(PAGE),
             np.arange(n, dtype=np.uint64) + np.uint64(1)], axis=1).astype("<u8").tobytes()
        self.vm.write_memory(LIST_AT, block)
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
            return

    def full_copy(self) -> None:
        """The reference: copy every stored page back."""
        view = self.mem.array().reshape(-1, PAGE)
        if len(self.stored) == len(view):
            view[:] = self.stored  # dense: one copy
        else:
            idx = self.cp.stored(1)[0].astype(np.intp)
            for a in range(0, len(idx), 4096):
                view[idx[a:a + 4096]] = self.stored[a:a + 4096]


def p50(xs: list[int]) -> float:
    return float(statistics.median(xs))


def run(repeat: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    guests = GUESTS[:1] + GUESTS[2:] if quick else GUESTS
    dirty = [1, 100, 1_000] if quick else DIRTY
    with Kvm() as kvm:
        for mode in ("ring", "bitmap"):
            for name, size, populated in guests:
                b = Bench(kvm, mode, size, populated)
                try:
                    for n in dirty:
                        b.pages = {n: np.sort(b.rng.choice(b.populated, n, replace=False))}
                        reps = max(3, repeat // 3) if n >= 10_000 else repeat
                        wall, cpu, coll, pages, ref = [], [], [], [], []
                        b.dirty(n)
                        b.cp.reset()  # warm-up
                        # Resets first, then the reference: a full copy of 1 GiB just before
                        # a reset would leave it every cache and TLB cold.
                        for _ in range(reps):
                            b.dirty(n)
                            c0 = time.thread_time_ns()
                            st = b.cp.reset()
                            cpu.append(time.thread_time_ns() - c0)
                            assert st.path == mode, st
                            wall.append(st.ns)
                            coll.append(st.collect_ns)
                            pages.append(st.pages)
                        for _ in range(reps):
                            b.dirty(n)
                            t0 = time.perf_counter_ns()
                            b.full_copy()
                            ref.append(time.perf_counter_ns() - t0)
                            b.cp.reset()  # consume the log (untimed)
                        row = {"mode": mode, "guest": name, "dirty": n,
                               "restored": int(statistics.median(pages)),
                               "reset_us": p50(wall) / 1e3, "reset_cpu_us": p50(cpu) / 1e3,
                               "collect_us": p50(coll) / 1e3,
                               "rest_us": p50([w - c for w, c in zip(wall, coll, strict=True)])
                               / 1e3,
                               "full_copy_us": p50(ref) / 1e3}
                        row["ratio"] = row["reset_us"] / row["full_copy_us"]
                        rows.append(row)
                        print(f"{mode:6} {name:14} {n:>6} dirty ({row['restored']:>6} restored): "
                              f"reset {row['reset_us']:9.1f} us (cpu {row['reset_cpu_us']:9.1f}; "
                              f"collect {row['collect_us']:8.1f} + rest {row['rest_us']:8.1f}),"
                              f" full copy {row['full_copy_us']:10.1f} us, ratio "
                              f"{row['ratio']:.4f}", flush=True)
                finally:
                    b.close()
    return rows


def flatness(rows: list[dict[str, Any]]) -> None:
    print("\nflatness: p50 reset by guest size, relative to the smallest guest")
    for mode in ("ring", "bitmap"):
        for n in DIRTY:
            sel = [r for r in rows if r["mode"] == mode and r["dirty"] == n]
            if len(sel) < 2:
                continue
            base = sel[0]["reset_us"]
            print(f"{mode:6} {n:>6} dirty: " + ", ".join(
                f"{r['guest']} {r['reset_us'] / base:.2f}x" for r in sel))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run(args.repeat, args.quick)
    flatness(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
