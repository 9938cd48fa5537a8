"""Benchmark: kvmio's live migration against QEMU's, on the same Multiboot guest, in the same
run, over loopback TCP with the same downtime limit (300 ms), in ring and bitmap mode.

The guest (``bench/migkernel``, built here with gcc) increments the first word of every page
of an area in ascending order, over and over, as QEMU's own migration test does: after a
migration the destination's area must be n + 1 up to some page and n after it, and every page
that breaks that shape is a page the migration lost.  Loads (guest memory 1 GiB):

- idle: the area (512 MiB) written once, then the guest spins without writing;
- 512 MiB working set: the pattern over 512 MiB at ~42,000 pages/s (paced by the TSC);
- paced 10 MiB/s: the pattern over 512 MiB at 2,560 pages/s;
- dense writer: the pattern over 32 MiB, unpaced, 8 pages per loop iteration (it overruns a
  4096-entry dirty ring on this host: the emulator pushes a whole batch past the soft limit).

QEMU (Debian's qemu-system-x86, ``-accel kvm[,dirty-ring-size=4096]``): two processes, the
destination started with ``-incoming``, driven over QMP (``qemu.qmp``), ``max-bandwidth``
raised so that its default 128 MiB/s cap does not decide; its guest area is read with
``pmemsave`` after the destination ran on.  kvmio: the source in this process
(``MultibootMachine.migrate`` while a ``KernelRunner`` runs the kernel), the destination in
a second process (``MultibootMachine.from_migration``) that runs the guest on and checks its
area.  A migration that has not completed after ``--timeout`` seconds is cancelled and
reported as such (neither side has auto-converge on here).  With ``--repeat N``, each load's
four cases (QEMU and kvmio, bitmap and ring) run in turn N times, interleaved, so that the
host's drift over minutes weighs on both engines alike; rows give the medians.

Reported per row: completed, total time, downtime (each engine's own figure: QEMU's ends when
the source sent its last bytes, kvmio's when the destination answered that it runs the
guest), blackout (the like-for-like: QEMU's from the source's STOP event to the destination's
RESUME event; kvmio's is its downtime, an upper bound), the estimate at switch-over (QEMU's last
``expected-downtime``), passes, bytes sent, pages that break the pattern (goal: 0 for kvmio);
and the ratios the goals are about: kvmio's total time, downtime and blackout against QEMU's bitmap
mode and QEMU's ring mode.

Needs root (``/dev/kvm``), gcc, ``qemu-system-x86_64`` and the ``bench`` extra
(``pip install -e .[bench]``); ``scripts/dev bench-qemu`` installs them.

Usage: python bench/qemu_migration.py [--loads idle,...] [--repeat N] [--timeout S] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

HERE = Path(__file__).resolve().parent
AREA = 0x1000000
PASSES_AT = 0x8000
MEM = 1 << 30
DOWNTIME = 0.3
MiB = 1 << 20
LOADS: dict[str, dict[str, int | str]] = {
    "idle": {"load": "idle", "pages": 131072},
    "512 MiB working set": {"load": "wset", "pages": 131072, "rate": 42000},
    "paced 10 MiB/s": {"load": "paced", "pages": 131072, "rate": 2560},
    "dense writer": {"load": "dense", "pages": 8192},
}
CFLAGS = ["-m32", "-march=i686", "-ffreestanding", "-nostdlib", "-mgeneral-regs-only",
          "-fno-pic", "-fno-pie", "-no-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-O2", "-static", "-Wl,--build-id=none",
          "-Wl,--no-warn-rwx-segments"]


def build_kernel(out: Path) -> Path:
    """Compile bench/migkernel into ``out``/migkernel.elf."""
    src = HERE / "migkernel"
    elf = out / "migkernel.elf"
    subprocess.run(["gcc", *CFLAGS, f"-Wl,-T,{src / 'link.ld'}", str(src / "entry.S"),
                    str(src / "migkernel.c"), "-o", str(elf)], check=True)
    return elf


def tsc_khz() -> int:
    """The host's TSC frequency (the guest paces itself by it)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise SystemExit("no 'cpu MHz' in /proc/cpuinfo")


def cmdline(load: str) -> str:
    args = dict(LOADS[load])
    args["tsc_khz"] = tsc_khz()
    return " ".join(f"{k}={v}" for k, v in args.items())


def broken_pages(v: npt.NDArray[np.uint32]) -> int:
    """Pages that do not fit the guest's shape: the fewest pages to change so that the area
    reads a, ..., a, a - 1, ..., a - 1 for some a (tried: the most common values, and one
    above each)."""
    if len(v) == 0:
        return 0
    values, counts = np.unique(v, return_counts=True)
    common = values[np.argsort(counts)[::-1][:4]].astype(np.int64)
    best = len(v)
    for a in {*common.tolist(), *(common + 1).tolist()}:
        hi, lo = v == a, v == (a - 1)
        other = int((~hi & ~lo).sum())
        # Split at j: a - 1 before j, and a at or after j, both break the shape.
        lo_before = np.concatenate([[0], np.cumsum(lo)])
        hi_after = np.concatenate([np.cumsum(hi[::-1])[::-1], [0]])
        best = min(best, other + int((lo_before + hi_after).min()))
    return best


def area_words(raw: bytes | memoryview, pages: int) -> npt.NDArray[np.uint32]:
    """The first word of each page of the area."""
    return np.frombuffer(raw, dtype=np.uint32, count=pages * 1024)[::1024].copy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- QEMU ------------------------------------------------------------------------------------


def _qmp(path: Path) -> Any:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    end = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > end:
            raise RuntimeError(f"QEMU did not open {path}")
        time.sleep(0.05)
    q = QEMUMonitorProtocol(str(path))
    q.connect()
    return q


def _hmp(q: Any, line: str) -> str:
    return str(q.cmd("human-monitor-command", **{"command-line": line}))


def _qemu_passes(q: Any) -> int:
    out = _hmp(q, f"xp /1wx {PASSES_AT:#x}")  # "0000000000008000: 0x00000023"
    return int(out.split(":")[1].split()[0], 16)


def _event_time(q: Any, name: str) -> float | None:
    """The host time (s) of the last ``name`` event ``q`` received, if any."""
    q.cmd("query-status")  # lets the events that arrived be read
    got = [e for e in q.get_events() if e.get("event") == name]
    if not got:
        return None
    ts = got[-1]["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def _qemu_blackout(qs: Any, qd: Any) -> float | None:
    """How long the guest really ran nowhere: from the source's STOP event to the
    destination's RESUME event (both stamped with the host's clock).  QEMU's own
    ``downtime`` ends when the source has sent the last bytes, before the destination has
    loaded them and resumed the guest; kvmio's ends when the destination said it runs the
    guest.  This is the like-for-like figure."""
    stop, resume = _event_time(qs, "STOP"), _event_time(qd, "RESUME")
    return None if stop is None or resume is None else resume - stop


def qemu_one(kernel: Path, mode: str, load: str, warmup: float, timeout: float,
             work: Path) -> dict[str, Any]:
    pages = int(LOADS[load]["pages"])
    accel = "kvm,dirty-ring-size=4096" if mode == "ring" else "kvm"
    port = free_port()
    common = ["qemu-system-x86_64", "-accel", accel, "-m", str(MEM >> 20), "-kernel",
              str(kernel), "-append", cmdline(load), "-display", "none", "-nodefaults",
              "-serial", "none", "-monitor", "none"]
    procs = []
    qmps: list[Any] = []
    try:
        dst = subprocess.Popen([*common, "-qmp", f"unix:{work / 'dst.qmp'},server=on,wait=off",
                                "-incoming", f"tcp:127.0.0.1:{port}"],
                               stderr=subprocess.DEVNULL)
        procs.append(dst)
        src = subprocess.Popen([*common, "-qmp", f"unix:{work / 'src.qmp'},server=on,wait=off"],
                               stderr=subprocess.DEVNULL)
        procs.append(src)
        qd, qs = _qmp(work / "dst.qmp"), _qmp(work / "src.qmp")
        qmps += [qd, qs]
        end = time.monotonic() + 120  # SeaBIOS boots in several seconds, emulated
        while _qemu_passes(qs) < 1:
            if time.monotonic() > end:
                raise RuntimeError("the guest did not start under QEMU")
            time.sleep(0.2)
        time.sleep(warmup)
        qs.cmd("migrate-set-parameters", **{"downtime-limit": int(DOWNTIME * 1000),
                                             "max-bandwidth": 64 << 30})
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        expected = 0.0
        t0 = time.monotonic()
        while True:
            info = qs.cmd("query-migrate")
            expected = info.get("expected-downtime", expected * 1000) / 1000
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > timeout:
                qs.cmd("migrate_cancel")
                return {"engine": "qemu", "mode": mode, "load": load, "completed": False,
                        "total": time.monotonic() - t0}
            time.sleep(0.02)
        if info["status"] != "completed":
            return {"engine": "qemu", "mode": mode, "load": load, "completed": False,
                    "total": info.get("total-time", 0) / 1000, "status": info["status"]}
        ram = info.get("ram", {})
        time.sleep(0.3)  # the destination runs on
        blackout = _qemu_blackout(qs, qd)
        qd.cmd("stop")
        dump = work / "area.bin"
        qd.cmd("pmemsave", val=AREA, size=pages * 4096, filename=str(dump))
        words = area_words(dump.read_bytes(), pages)
        dump.unlink()
        # QEMU's figures, when it gives them: once in 48 runs here its completed query
        # said 0 for both (the events still timed the blackout).
        total_ms, downtime_ms = info.get("total-time"), info.get("downtime")
        return {"engine": "qemu", "mode": mode, "load": load, "completed": True,
                "total": total_ms / 1000 if total_ms else None,
                "downtime": downtime_ms / 1000 if downtime_ms else None,
                "blackout": blackout,
                "estimated": expected, "passes": ram.get("dirty-sync-count"),
                "sent_mib": ram.get("transferred", 0) / MiB, "broken_pages": broken_pages(words),
                "guest_passes": int(words.max())}
    finally:
        for q in qmps:
            with contextlib.suppress(Exception):
                q.cmd("quit")
            with contextlib.suppress(Exception):
                q.close()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- kvmio ------------------------------------------------------------------------------------


def _kvmio_destination(port_out: Pipe, result_out: Pipe, pages: int) -> None:
    """In a second process: accept one migration, run the guest on, check its area."""
    from kvmio import Kvm
    from kvmio.guests.multiboot import KernelRunner, MultibootMachine
    from kvmio.tracker import DirtyTracker

    try:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            port_out.send(srv.getsockname()[1])
            conn, _ = srv.accept()
        with conn, Kvm() as kvm, MultibootMachine.from_migration(kvm, conn) as m:
            # It runs on with the source's dirty ring and logging, under a tracker (as a VMM
            # that may migrate it again would): a ring nobody harvests stops a dense writer
            # at its first overrun.
            mode = "ring" if m.vcpu.ring is not None else "bitmap"
            with DirtyTracker(m.vm, mode) as tracker, \
                    KernelRunner(m, on_ring_full=tracker.on_ring_full if mode == "ring"
                                 else None):
                time.sleep(0.3)  # the destination runs on
            words = area_words(m.vm.read_memory(AREA, pages * 4096), pages)
            result_out.send({"broken_pages": broken_pages(words),
                             "guest_passes": int(words.max())})
    except BaseException as e:
        result_out.send({"error": repr(e)})


def _kvmio_send(m: Any, runner: Any, tracker: Any, port: int, timeout: float) -> Any:
    """Migrate ``m`` to 127.0.0.1:``port``: its report, or why it failed."""
    from kvmio import MigrationError

    with socket.create_connection(("127.0.0.1", port)) as conn:
        try:
            return m.migrate(conn, runner=runner, tracker=tracker, downtime=DOWNTIME,
                             max_passes=1_000_000, timeout=timeout)
        except MigrationError as e:
            return e.message


def kvmio_one(kernel: Path, mode: str, load: str, warmup: float,
              timeout: float) -> dict[str, Any]:
    from kvmio import Kvm
    from kvmio.guests.multiboot import KernelRunner, MultibootMachine
    from kvmio.tracker import DirtyTracker

    pages = int(LOADS[load]["pages"])
    ctx = multiprocessing.get_context("spawn")  # a fresh process: nothing inherited
    port_r, port_w = ctx.Pipe(duplex=False)
    res_r, res_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_kvmio_destination, args=(port_w, res_w, pages), daemon=True)
    child.start()
    try:
        port = port_r.recv()
        ring = mode == "ring"
        # As with QEMU, dirty logging starts with the migration's tracking (the guest's first
        # pass over its area is not logged), and a tracker harvests the ring from then on.
        with Kvm() as kvm, MultibootMachine(kvm, str(kernel), mem=MEM, cmdline=cmdline(load),
                                            ring_entries=4096 if ring else None,
                                            log_dirty=False) as m:
            tracker = DirtyTracker(m.vm, mode, log_slots=[m.ram.slot])
            with KernelRunner(m, on_ring_full=tracker.on_ring_full if ring else None) as runner:
                end = time.monotonic() + 60
                while int.from_bytes(m.vm.read_memory(PASSES_AT, 4), "little") < 1:
                    if time.monotonic() > end:
                        raise RuntimeError("the guest did not start under kvmio")
                    time.sleep(0.05)
                with tracker:
                    time.sleep(warmup)
                    report = _kvmio_send(m, runner, tracker, port, timeout)
        if isinstance(report, str):
            return {"engine": "kvmio", "mode": mode, "load": load, "completed": False,
                    "error": report}
        got = res_r.recv() if res_r.poll(120) else {"error": "no answer"}
        if "error" in got:
            raise RuntimeError(f"the kvmio destination failed: {got['error']}")
        return {"engine": "kvmio", "mode": mode, "load": load, "completed": True,
                "total": report.total_seconds, "downtime": report.downtime,
                # Pause to the destination's RUNS, received: the guest ran nowhere for at
                # most this long (its like-for-like with QEMU's STOP-to-RESUME blackout).
                "blackout": report.downtime,
                "estimated": report.estimated_downtime, "passes": len(report.passes),
                "sent_mib": report.bytes_sent / MiB,
                "downtime_parts": {k: round(v * 1e3, 1) for k, v in report.downtime_parts.items()},
                **got}
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()


# -- the run ----------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for repeated runs: the medians of the times and sizes, the most pages lost,
    completed only if every run completed; the runs themselves under ``runs``."""
    row = dict(runs[0])
    row["completed"] = all(r["completed"] for r in runs)
    for key in ("total", "downtime", "blackout", "estimated", "passes", "sent_mib"):
        got = [r[key] for r in runs if r.get(key) is not None]
        if got:
            row[key] = statistics.median(got)
            if key == "passes":
                row[key] = round(row[key])
    lost = [r["broken_pages"] for r in runs if r.get("broken_pages") is not None]
    if lost:
        row["broken_pages"] = max(lost)
    row["runs"] = runs
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", default=",".join(LOADS),
                    help="comma-separated loads (default: all)")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds the guest runs before the migration starts")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds before a migration that has not completed is cancelled")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per row: the table gives the medians (pages lost: the most)")
    ap.add_argument("--json", help="write the rows as JSON")
    a = ap.parse_args()
    loads = [s.strip() for s in a.loads.split(",")]
    for load in loads:
        if load not in LOADS:
            raise SystemExit(f"unknown load {load!r}: choose from {', '.join(LOADS)}")
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("qemu-system-x86_64 is not installed (scripts/dev bench-qemu does)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kernel = build_kernel(work)
        print("| engine | mode | load | completed | total (s) | downtime (ms) | blackout (ms) "
              "| estimated (ms) | passes | sent (MiB) | pages lost |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        cases = [(mode, engine) for mode in ("bitmap", "ring") for engine in ("qemu", "kvmio")]
        for load in loads:
            # Interleaved: each repeat runs all four cases in turn, so that the host's drift
            # over minutes weighs on QEMU and kvmio alike.
            by_case: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cases}
            for _ in range(a.repeat):
                for mode, engine in cases:
                    if engine == "qemu":
                        got = qemu_one(kernel, mode, load, a.warmup, a.timeout, work)
                    else:
                        got = kvmio_one(kernel, mode, load, a.warmup, a.timeout)
                    by_case[(mode, engine)].append(got)
            for mode, engine in cases:
                row = _median_row(by_case[(mode, engine)])
                rows.append(row)
                print(f"| {engine} | {mode} | {load} | {'yes' if row['completed'] else 'no'}"
                      f" | {_fmt(row.get('total'), '.2f')}"
                      f" | {_fmt(row.get('downtime') and row['downtime'] * 1e3, '.0f')}"
                      f" | {_fmt(row.get('blackout') and row['blackout'] * 1e3, '.0f')}"
                      f" | {_fmt(row.get('estimated') and row['estimated'] * 1e3, '.0f')}"
                      f" | {_fmt(row.get('passes'), 'd')}"
                      f" | {_fmt(row.get('sent_mib'), '.0f')}"
                      f" | {_fmt(row.get('broken_pages'), 'd')} |", flush=True)
    print()
    print("| load | mode | kvmio / QEMU bitmap: total | downtime | blackout "
          "| kvmio / QEMU ring: total | downtime | blackout |")
    print("|---|---|---|---|---|---|---|---|")
    for load in loads:
        by = {(r["engine"], r["mode"]): r for r in rows if r["load"] == load}
        for mode in ("bitmap", "ring"):
            k = by[("kvmio", mode)]
            cells = []
            for ref in (by[("qemu", "bitmap")], by[("qemu", "ring")]):
                for key in ("total", "downtime", "blackout"):
                    ok = k.get("completed") and ref.get("completed") and ref.get(key)
                    cells.append(f"{k[key] / ref[key]:.2f}" if ok else "-")
            print(f"| {load} | {mode} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: /dev/kvm usually needs root", file=sys.stderr)
    main()
