"""Benchmark: kvmio's live migration (``kvmio.migration``) of the built-in workload between two
threads over a socket pair, in ring and bitmap mode, under four loads:

- idle: the guest halted (only pass 0 and the final pass have anything to send);
- 512 MiB working set: two vCPUs writing random pages of 512 MiB as fast as they can
  (tens of thousands of pages a second here);
- paced 10 MiB/s: one vCPU writing new pages in order, held to 10 MiB/s by a DirtyLimit;
- dense writer: the burst guest (~745 ring entries per emulation batch: it overruns the ring
  by construction in ring mode), over 32 MiB.

Reported per row: total time, passes, bytes sent, the downtime (pause to the destination's
answer), the downtime the switch-over estimated and their ratio (goal: within +-25%), and the
pages that differ between the paused source and the destination (goal: 0).  The guest's
memory is 1 GiB (sparse) in every row.

Usage: python bench/migration.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import numpy as np

from kvmio import Kvm
from kvmio.guests.programs import program
from kvmio.guests.workload import MEM_BASE, Workload
from kvmio.limit import DirtyLimit
from kvmio.migration import socket_pair
from kvmio.tracker import DirtyTracker

MiB = 1 << 20
LOADS = ["idle", "512 MiB working set", "paced 10 MiB/s", "dense writer"]


def differing(a: Workload, b: Workload) -> int:
    n = 0
    for slot in a.vm.regions:
        x = a.vm.regions[slot].array(np.uint64).reshape(-1, 512)
        y = b.vm.regions[slot].array(np.uint64).reshape(-1, 512)
        for at in range(0, len(x), 1 << 15):  # in chunks: the guest is 1 GiB
            n += int((x[at:at + (1 << 15)] != y[at:at + (1 << 15)]).any(axis=1).sum())
    return n


def one(kvm: Kvm, mode: str, load: str) -> dict[str, Any]:
    ring = mode == "ring"
    entries = 256 if load == "dense writer" else 4096
    kw: dict[str, Any] = {"mem_size": 1 << 30, "ring_entries": entries if ring else None}
    if load == "idle":
        kw.update(max_writes=1000)
    elif load == "512 MiB working set":
        kw.update(vcpus=2, working_set=512 * MiB, order="random", value="count", shared=False)
    else:
        kw.update(order="sequential", value="count")
    src_conn, dst_conn = socket_pair()
    got: dict[str, Any] = {}

    def receive() -> None:
        try:
            got["w"] = Workload.from_migration(kvm, dst_conn)
        except BaseException as e:
            got["e"] = e

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    with src_conn, dst_conn, Workload(kvm, **kw) as w, DirtyTracker(w.vm, mode) as t:
        if load == "dense writer":
            code = program("burst")
            w.vm.write_memory(0x30000, code.code)
            r0 = w.vcpus[0].get_regs()
            r0.rip, r0.rdi, r0.rsi, r0.rax = 0x30000, MEM_BASE, 8192, 0xAA
            w.vcpus[0].set_regs(r0)
        with w.runner(on_ring_full=t.on_ring_full if ring else None) as r:
            limit = None
            if load == "paced 10 MiB/s":
                limit = DirtyLimit(t, r)
                limit.set(10 * MiB)
            time.sleep(1.0)
            report = w.migrate(src_conn, runner=r, tracker=t, max_passes=30)
            if limit is not None:
                limit.close()
        th.join(120)
        if "e" in got:
            raise got["e"]
        with got["w"] as d:
            lost = differing(w, d)
    return {"mode": mode, "load": load, "total_s": report.total_seconds,
            "passes": len(report.passes), "bytes": report.bytes_sent,
            "downtime_ms": report.downtime * 1e3,
            "estimated_ms": report.estimated_downtime * 1e3,
            "ratio": report.estimated_downtime / report.downtime if report.downtime else 0.0,
            "differing_pages": lost, "whole_slot_passes": sum(1 in p.whole_slots
                                                             for p in report.passes[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kvm = Kvm()
    rows = []
    print("| mode | load | total (s) | passes | sent (MiB) | downtime (ms) | estimated (ms) "
          "| estimated / measured | pages differing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("ring", "bitmap"):
        for load in LOADS:
            row = one(kvm, mode, load)
            rows.append(row)
            print(f"| {mode} | {load} | {row['total_s']:.2f} | {row['passes']} | "
                  f"{row['bytes'] / MiB:,.0f} | {row['downtime_ms']:.0f} | "
                  f"{row['estimated_ms']:.0f} | {row['ratio']:.2f} | {row['differing_pages']} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
