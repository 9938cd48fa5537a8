"""``kvmio snapshot take|inspect|merge`` and ``kvmio restore``: snapshot files on disk
(:mod:`kvmio.snapshot.files`) of a Multiboot kernel or the built-in workload.

``take`` boots the guest, runs it for ``--after`` seconds and writes a full snapshot, then,
for each ``--diff DIR``, runs ``--every`` seconds more and writes a diff on the layer before;
the guest then stops.  ``restore`` builds a new VM from a snapshot (following a diff's bases)
and runs the guest on: a kernel's output continues where it stopped, and its exit status is
that of ``kvmio run``; with ``--snapshot DIR --after S`` it writes a diff on the snapshot
after ``S`` seconds and stops.  ``inspect`` prints what a layer's manifest says and checks
its checksums; ``merge`` writes a chain as one full snapshot.

Errors (a damaged or mismatched snapshot, a directory that exists) are one ``Error:`` line
and exit status 1; Ctrl-C stops the guest, writes no snapshot, and exits with 130.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import click

from kvmio.cli.common import console, open_kvm, write_json
from kvmio.cli.errors import deferred_interrupt, error_context, kick_on_interrupt
from kvmio.cli.params import FiniteFloatRange, OutputFile, RingEntries, Size, format_size
from kvmio.cli.run import MAX_TIMEOUT, MULTIBOOT_MEMORY
from kvmio.errors import SnapshotError
from kvmio.guests.multiboot import MultibootMachine, StopReason
from kvmio.guests.multiboot.machine import SNAPSHOT_KIND as MULTIBOOT_KIND
from kvmio.guests.workload import SNAPSHOT_KIND as WORKLOAD_KIND
from kvmio.guests.workload import Workload
from kvmio.snapshot.files import (
    SnapshotInfo,
    Snapshotter,
    inspect_snapshot,
    merge_snapshots,
    read_chain,
)
from kvmio.system import Kvm

__all__ = ["MAX_WRITES", "restore_command", "snapshot"]

#: The most writes asked of the built-in workload's vCPUs (each).
MAX_WRITES = 1_000_000_000
#: The most guest memory the built-in workload is offered.
WORKLOAD_MEMORY = Size(min=1 << 20, max=512 << 30, what="memory size")


def _stream(data: bytes) -> None:
    click.echo(data, nl=False)  # bytes go to the binary stream, flushed


def _say(text: str) -> None:
    click.echo(f"kvmio: {text}", err=True)


def _human(n: int) -> str:
    """``n`` bytes, roughly, in a unit that reads well (``"10.9 MiB"``)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _written(info: SnapshotInfo, elapsed: float | None = None) -> None:
    when = "" if elapsed is None else f" after {elapsed:.2f} s"
    base = "" if info.base is None else f" on {info.base.path}"
    _say(f"wrote {info.path}: {info.kind}{base}, {info.stored_pages:,} pages "
         f"({_human(info.stored_bytes)}){when}")


def _new_dir(ctx: click.Context, path: str, option: str) -> str:
    """Refuse, before a guest starts, a snapshot directory that cannot be written."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise click.BadParameter(f"directory {parent!r} does not exist", ctx,
                                 param_hint=option)
    if os.path.lexists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise click.BadParameter(f"{path!r} exists (a snapshot goes to a new or empty "
                                 "directory)", ctx, param_hint=option)
    return path


@click.group()
def snapshot() -> None:
    """Snapshot files: take, inspect and merge them (kvmio restore restores them)."""


@snapshot.command("take")
@click.argument("directory", type=click.Path())
@click.option("--after", type=FiniteFloatRange(min=0, max=MAX_TIMEOUT), default=1.0,
              show_default=True, metavar="S", help="Seconds the guest runs before the full "
                                                   "snapshot.")
@click.option("--diff", "diffs", multiple=True, type=click.Path(), metavar="DIR",
              help="Then write a diff snapshot here (repeatable: each one on the one before).")
@click.option("--every", type=FiniteFloatRange(min=0, max=MAX_TIMEOUT), default=None,
              metavar="S", help="Seconds between two snapshots (default: --after).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A Multiboot kernel to boot (default: the built-in workload).")
@click.option("--append", "cmdline", default="", metavar="CMDLINE",
              help="Kernel command line (with --kernel).")
@click.option("--no-irqchip", is_flag=True, help="No in-kernel irqchip and PIT (--kernel).")
@click.option("--mem", default=None, metavar="SIZE", type=WORKLOAD_MEMORY,
              help="Guest RAM (default: 128M for a kernel, 64M for the workload).")
@click.option("--ring", "ring_entries", default=4096, show_default=True,
              type=RingEntries(allow_zero=True),
              help="Dirty ring entries per vCPU, a power of two (0: the dirty bitmap).")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 16),
              help="vCPUs of the workload.")
@click.option("--writes", default=0, show_default=True, type=click.IntRange(0, MAX_WRITES),
              help="Writes each workload vCPU makes before it halts (0: no end).")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write what each snapshot's manifest says as JSON.")
@click.pass_context
def take(ctx: click.Context, directory: str, after: float, diffs: tuple[str, ...],
         every: float | None, kernel: str | None, cmdline: str, no_irqchip: bool,
         mem: int | None, ring_entries: int, vcpus: int, writes: int,
         json_path: str | None) -> None:
    """Run a guest and write a full snapshot of it to DIRECTORY after --after seconds (then
    a diff after every --every seconds for each --diff).  A kernel's output goes to stdout
    as it arrives."""
    points = [(_new_dir(ctx, directory, "'DIRECTORY'"), after)]
    points += [(_new_dir(ctx, d, "'--diff'"), after if every is None else every)
               for d in diffs]
    if len({os.path.abspath(p) for p, _ in points}) != len(points):
        raise click.BadParameter("every snapshot needs a directory of its own", ctx,
                                 param_hint="'--diff'")
    ring = ring_entries or None
    infos: list[SnapshotInfo] = []
    if kernel is not None:
        mem = MULTIBOOT_MEMORY.convert(128 << 20 if mem is None else mem, None, ctx)
        error_context(ctx, f"cannot snapshot {kernel}")
        with (open_kvm(ctx) as kvm,
              MultibootMachine(kvm, kernel, mem=mem, cmdline=cmdline, irqchip=not no_irqchip,
                               ring_entries=ring, log_dirty=True) as m,
              m.snapshotter() as chain,
              kick_on_interrupt(m.vcpu.kick),
              deferred_interrupt(_stream) as interrupt):
            for path, secs in points:
                result = m.run(timeout=secs, on_output=_stream, on_interrupted=interrupt.check)
                if result.reason not in (StopReason.TIMEOUT, StopReason.DEBUG_EXIT,
                                         StopReason.HALTED):
                    raise SnapshotError(f"the kernel stopped before the snapshot: "
                                        f"{result.summary()}")
                infos.append(m.snapshot(path, chain=chain, on_output=_stream))
                _written(infos[-1], result.elapsed)
    else:
        error_context(ctx, "cannot snapshot the workload")
        with (open_kvm(ctx) as kvm,
              Workload(kvm, mem_size=64 << 20 if mem is None else mem, vcpus=vcpus,
                       max_writes=writes, ring_entries=ring, shared=False) as w,
              w.snapshotter() as chain):
            w.generation = 1
            with w.runner() as runner:
                _say(f"the workload runs; the first snapshot comes after {points[0][1]:g} s")
                for path, secs in points:
                    t0 = time.monotonic()
                    runner.wait(secs)
                    infos.append(w.snapshot(path, chain=chain, runner=runner))
                    _written(infos[-1], time.monotonic() - t0)
                    _say(f"the workload made {w.total_writes():,} writes so far")
    if json_path:
        write_json(json_path, [i.to_json() for i in infos])


@snapshot.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--quick", is_flag=True,
              help="Check the manifest, index and state, not the memory's checksums.")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write what the manifest says, and the chain, as JSON.")
@click.pass_context
def inspect(ctx: click.Context, path: str, quick: bool, json_path: str | None) -> None:
    """Show what the snapshot layer at PATH (its directory or manifest) holds: version,
    machine layout, memory, the chain of layers below it, and its checksum status."""
    error_context(ctx, f"snapshot {path}")
    info = inspect_snapshot(path, verify=not quick)
    chain: list[SnapshotInfo] = []
    chain_error: str | None = None
    try:
        chain = read_chain(path)
    except SnapshotError as e:
        chain_error = str(e)
    rows: list[tuple[str, str]] = [
        ("format", f"kvmio snapshot, version {info.version}"),
        ("id", info.id),
        ("created", info.created),
        ("kind", info.kind if info.base is None else
         f"diff on {info.base.id} ({info.base.path})"),
        ("machine", info.machine.describe()),
        ("memory", f"{info.memory_layout}, {info.stored_pages:,} pages stored "
                   f"({_human(info.stored_bytes)}) in {info.runs:,} runs, "
                   f"{info.chunks:,} checksummed chunks of up to "
                   f"{format_size(info.chunk_bytes)}"
                   + (f"; whole slots {list(info.whole_slots)}"
                      if info.kind == "diff" and info.whole_slots else "")),
        ("guest", _guest_line(info.guest)),
        ("checksums", "manifest, index and state ok; memory "
                      + ("not checked (--quick)" if quick else f"ok ({info.chunks:,} chunks)")),
    ]
    if chain_error is None:
        rows.append(("layers", " <- ".join(
            f"{i.kind} {i.path}" for i in reversed(chain))))
    else:
        rows.append(("layers", f"[red]cannot follow the chain: {chain_error}[/]"))
    console.print(f"[bold]snapshot {info.path}[/]")
    for name, value in rows:
        console.print(f"  {name:<10} {value}", markup=name == "layers", soft_wrap=True)
    if json_path:
        write_json(json_path, {"layer": info.to_json(),
                               "chain": [i.to_json() for i in chain],
                               "chain_error": chain_error})
    if chain_error is not None:
        ctx.exit(1)


def _guest_line(guest: Any) -> str:
    kind = guest.get("kind")
    if kind == MULTIBOOT_KIND:
        return (f"Multiboot kernel, {format_size(int(guest.get('mem', 0)))} RAM, command line "
                f"{guest.get('cmdline')!r}")
    if kind == WORKLOAD_KIND:
        params = guest.get("params") or ()
        return f"the built-in workload, {len(params)} vCPU{'s' if len(params) != 1 else ''}"
    return "-" if not guest else str(kind)


@snapshot.command("merge")
@click.argument("path", type=click.Path())
@click.argument("out", type=click.Path())
@click.pass_context
def merge(ctx: click.Context, path: str, out: str) -> None:
    """Write the chain of layers ending at PATH as one full snapshot in OUT."""
    _new_dir(ctx, out, "'OUT'")
    error_context(ctx, f"cannot merge {path}")
    _written(merge_snapshots(path, out))


@click.command("restore")
@click.argument("path", type=click.Path())
@click.option("--timeout", type=FiniteFloatRange(min=0, max=MAX_TIMEOUT), default=None,
              metavar="S", help="Stop the guest after S seconds (default: no limit).")
@click.option("--eager", is_flag=True,
              help="Read all of guest memory now (default: map the memory file "
                   "copy-on-write and read pages as the guest touches them).")
@click.option("--no-verify", is_flag=True,
              help="Trust the memory file: do not check its checksums (faster for large "
                   "guests; every other check is made).")
@click.option("--vga", is_flag=True, help="Print the VGA text screen at the end (kernels).")
@click.option("--snapshot", "snapshot_dir", type=click.Path(), default=None, metavar="DIR",
              help="Write a diff snapshot on PATH to DIR after --after seconds, then stop.")
@click.option("--after", type=FiniteFloatRange(min=0, max=MAX_TIMEOUT), default=1.0,
              show_default=True, metavar="S", help="Seconds before the --snapshot.")
@click.pass_context
def restore_command(ctx: click.Context, path: str, timeout: float | None, eager: bool,
                    no_verify: bool, vga: bool, snapshot_dir: str | None,
                    after: float) -> None:
    """Restore the snapshot at PATH (a diff's bases are found through the paths it records)
    into a new VM and run the guest on.

    A kernel's serial and debug-port output goes on, to stdout; the exit status is that of
    kvmio run.  The workload runs until its vCPUs halt (or --timeout).
    """
    if snapshot_dir is not None:
        _new_dir(ctx, snapshot_dir, "'--snapshot'")
    error_context(ctx, f"cannot restore {path}")
    top = read_chain(path)[-1]
    kind = top.guest.get("kind")
    limit = after if snapshot_dir is not None else timeout
    with open_kvm(ctx) as kvm:
        if kind == MULTIBOOT_KIND:
            _restore_kernel(ctx, kvm, path, eager, no_verify, vga, snapshot_dir, limit)
        elif kind == WORKLOAD_KIND:
            _restore_workload(kvm, path, eager, no_verify, snapshot_dir, limit)
        else:
            raise SnapshotError(f"{top.path!r} holds a guest kvmio does not know how to run "
                                f"({kind!r}); restore it with the library")


def _restore_kernel(ctx: click.Context, kvm: Kvm, path: str, eager: bool, no_verify: bool,
                    vga: bool, snapshot_dir: str | None, limit: float | None) -> None:
    with (MultibootMachine.from_snapshot(kvm, path, lazy=not eager, verify=not no_verify,
                                         log_dirty=True if snapshot_dir else None) as m,
          m.snapshotter() if snapshot_dir else contextlib.nullcontext() as chain,
          kick_on_interrupt(m.vcpu.kick),
          deferred_interrupt(_stream) as interrupt):
        result = m.run(timeout=limit, on_output=_stream, on_interrupted=interrupt.check)
        if snapshot_dir is not None:
            assert isinstance(chain, Snapshotter)
            _written(m.snapshot(snapshot_dir, chain=chain, on_output=_stream),
                     result.elapsed)
    if vga:
        sep = b"\n" if result.output and not result.output.endswith(b"\n") else b""
        click.echo(sep + result.vga_text.rstrip("\n").encode() + b"\n", nl=False)
    _say(result.summary())
    if result.exit_code is not None:
        ctx.exit(result.exit_code)


def _restore_workload(kvm: Kvm, path: str, eager: bool, no_verify: bool,
                      snapshot_dir: str | None, limit: float | None) -> None:
    with Workload.from_snapshot(kvm, path, lazy=not eager, verify=not no_verify) as w, \
            w.snapshotter() if snapshot_dir else contextlib.nullcontext() as chain:
        start = w.total_writes()
        t0 = time.monotonic()
        with w.runner() as runner:
            done = runner.wait(limit)
            if snapshot_dir is not None:
                assert isinstance(chain, Snapshotter)
                _written(w.snapshot(snapshot_dir, chain=chain, runner=runner),
                         time.monotonic() - t0)
        _say(f"the workload made {w.total_writes() - start:,} more writes "
             f"({w.total_writes():,} in all) in {time.monotonic() - t0:.2f} s"
             + ("; its vCPUs halted" if done else ""))

