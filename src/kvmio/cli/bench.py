"""``kvmio bench``: benchmarks of dirty tracking and checkpoint reset on this machine
(``ring-vs-bitmap``: :func:`kvmio.dirtyrate.ring_vs_bitmap`; ``reset``:
:func:`kvmio.resetbench.measure_resets`).

Ctrl-C stops the benchmark guest; the cells measured until then are shown and written
(``--json``, with ``"interrupted": true``; ``--plot``), and the command exits with 130.
"""

from __future__ import annotations

from typing import Any

import click
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kvmio import resetbench
from kvmio.cli.common import console, open_kvm, write_json
from kvmio.cli.errors import deferred_interrupt
from kvmio.cli.params import PAGE_SIZE, OutputFile, Size, format_size
from kvmio.dirtyrate import CollectionCost, ring_vs_bitmap
from kvmio.resetbench import ResetCell, ResetGuest, ResetMode

__all__ = ["DEFAULT_DIRTY", "DEFAULT_MEMS", "MAX_DIRTY", "MAX_MEMORY", "bench",
           "reset_command", "ring_vs_bitmap_command"]

#: Guest memory sizes measured without ``--mem``.
DEFAULT_MEMS = (1 << 30, 4 << 30, 16 << 30, 64 << 30, 256 << 30)
#: Dirty-set sizes (pages) measured without ``--dirty``.
DEFAULT_DIRTY = (1024, 16384, 60000)
#: The largest dirty set: it must fit one 65536-entry ring, less the kernel's reserve.
MAX_DIRTY = 60000
#: The most guest memory the benchmark guest is offered (its page tables map up to 512 GiB).
MAX_MEMORY = 512 << 30


@click.group()
def bench() -> None:
    """Benchmarks of dirty tracking on this machine."""


def _table(cells: list[CollectionCost]) -> Table:
    t = Table(title="one collection (ms): ring (harvest + reset) vs bitmap (GET_DIRTY_LOG)")
    t.add_column("guest memory", justify="right")
    t.add_column("dirty pages", justify="right")
    t.add_column("ring ms", justify="right")
    t.add_column("bitmap ms", justify="right")
    t.add_column("faster", justify="center")
    for r in cells:
        if r.mode != "ring":
            continue
        b = next((c for c in cells
                  if c.mode == "bitmap" and c.mem == r.mem and c.dirty == r.dirty), None)
        t.add_row(format_size(r.mem), f"{r.dirty:,}", f"{r.seconds * 1e3:.3f}",
                  "" if b is None else f"{b.seconds * 1e3:.3f}",
                  "" if b is None else "ring" if r.seconds < b.seconds else "bitmap")
    return t


@bench.command("ring-vs-bitmap")
@click.option("--mem", "mems", multiple=True, metavar="SIZE",
              type=Size(max=MAX_MEMORY, what="memory size"),
              help="Guest memory sizes, up to 512 GiB (repeatable; default 1G, 4G, 16G, 64G, "
                   "256G).")
@click.option("--dirty", "dirty", multiple=True, type=click.IntRange(1, MAX_DIRTY),
              help="Dirty-set sizes in pages (repeatable; default 1024, 16384, 60000).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 100),
              help="Collections per cell (the median is kept).")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write the configuration and every cell as JSON.")
@click.option("--plot", "plot_path", type=OutputFile(plot=True), default=None,
              help="Write a PNG: collection time against guest memory (needs matplotlib).")
@click.pass_context
def ring_vs_bitmap_command(ctx: click.Context, mems: tuple[int, ...], dirty: tuple[int, ...],
                           repeat: int, json_path: str | None, plot_path: str | None) -> None:
    """Collection cost of ring and bitmap against guest memory size and dirty-set size."""
    sizes = list(dirty) or list(DEFAULT_DIRTY)
    mem_list = list(mems) or list(DEFAULT_MEMS)
    for mem in mem_list:
        if max(sizes) > mem // PAGE_SIZE:
            raise click.BadParameter(f"{max(sizes)} dirty pages do not fit {format_size(mem)}",
                                     ctx, param_hint="'--mem'")
    cells: list[CollectionCost] = []
    interrupted: KeyboardInterrupt | None = None
    with open_kvm(ctx) as kvm:

        def progress(c: CollectionCost) -> None:
            cells.append(c)
            console.print(f"  {c.mode:6} {format_size(c.mem):>8} {c.dirty:6} pages: "
                          f"{c.seconds * 1e3:8.3f} ms")

        try:
            ring_vs_bitmap(kvm, mem_list, sizes, repeat=repeat, progress=progress)
        except KeyboardInterrupt as e:  # the guest was stopped; keep the cells measured
            interrupted = e
    console.print(_table(cells))
    if json_path:
        data: dict[str, Any] = {
            "config": {"mems": mem_list, "dirty": sizes, "repeat": repeat},
            "interrupted": interrupted is not None,
            "cells": [{"mode": c.mode, "mem": c.mem, "dirty": c.dirty, "seconds": c.seconds,
                       "pages_found": c.pages_found} for c in cells]}
        write_json(json_path, data)
        console.print(f"wrote {json_path}")
    if plot_path and cells:
        from kvmio.plots import plot_ring_vs_bitmap

        plot_ring_vs_bitmap(cells, plot_path)
        console.print(f"wrote {plot_path}")
    if interrupted is not None:
        raise interrupted  # the error boundary: "Interrupted.", exit status 130


# -- bench reset ------------------------------------------------------------------------------


def _reset_line(c: ResetCell) -> str:
    return (f"  {c.mode:6} {c.guest:>13} {c.dirty:>6,} dirty: reset {c.reset_us / 1e3:8.3f} ms, "
            f"full copy {c.full_copy_us / 1e3:8.2f} ms")


def _reset_table(cells: list[ResetCell]) -> Table:
    t = Table(title="checkpoint reset, p50 (ms); copy: the reference, every stored page "
                    "copied back",
              box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    t.add_column("mode", no_wrap=True)
    for name in ("guest", "dirty", "restored", "reset", "CPU", "collect", "copy", "ratio"):
        t.add_column(name, justify="right", no_wrap=True)
    for c in cells:
        t.add_row(c.mode, c.guest, f"{c.dirty:,}", f"{c.restored:,}", f"{c.reset_us / 1e3:.3f}",
                  f"{c.reset_cpu_us / 1e3:.3f}", f"{c.collect_us / 1e3:.3f}",
                  f"{c.full_copy_us / 1e3:.2f}", f"{c.ratio:.4f}")
    return t


@bench.command("reset")
@click.option("--mem", "mems", multiple=True, metavar="SIZE",
              type=Size(min=1 << 20, max=resetbench.MAX_MEMORY, what="memory size"),
              help="Guest memory sizes, up to 256 GiB (repeatable; default 64M, 1G and 64G). A "
                   "guest larger than --populated is sparse.")
@click.option("--populated", default=resetbench.DEFAULT_POPULATED, metavar="SIZE",
              type=Size(min=1 << 20, max=resetbench.MAX_MEMORY, what="populated size"),
              help="Bytes of each guest that hold data, spread at random over a larger guest "
                   "(default: all of it, up to 1G).")
@click.option("--dirty", "dirty", multiple=True,
              type=click.IntRange(1, resetbench.MAX_DIRTY),
              help="Pages the guest writes before each reset (repeatable; default 1, 10, 100, "
                   f"1000, 10000; at most {resetbench.MAX_DIRTY} and each guest's populated "
                   "pages).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(resetbench.MODES),
              help="Dirty-log modes (repeatable; default both).")
@click.option("--repeat", default=resetbench.DEFAULT_REPEAT, show_default=True,
              type=click.IntRange(1, 1000),
              help="Resets, and full copies, per cell (the median is kept; 10,000 dirty pages "
                   "or more: a third of them, at least 3).")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write the configuration and every cell as JSON.")
@click.option("--plot", "plot_path", type=OutputFile(plot=True), default=None,
              help="Write a PNG: reset time against dirty pages, log-log, with the full copy "
                   "dashed (needs matplotlib).")
@click.option("--quiet", is_flag=True, help="No progress bar and no line per cell (the table "
                                            "stays).")
@click.pass_context
def reset_command(ctx: click.Context, mems: tuple[int, ...], populated: int,
                  dirty: tuple[int, ...], modes: tuple[ResetMode, ...], repeat: int,
                  json_path: str | None, plot_path: str | None, quiet: bool) -> None:
    """Checkpoint reset against dirty pages and guest size.

    Times MemoryCheckpoint.reset after a guest wrote N pages, in ring and bitmap mode, beside
    a full copy of every stored page (the reset without dirty tracking)."""
    guests = ([ResetGuest.of(m, populated) for m in dict.fromkeys(mems)] if mems
              else list(resetbench.DEFAULT_GUESTS))
    sizes = list(dict.fromkeys(dirty)) or list(resetbench.DEFAULT_DIRTY)
    mode_list: list[ResetMode] = list(dict.fromkeys(modes)) or list(resetbench.MODES)
    for guest in guests:
        if max(sizes) > guest.populated_pages:
            raise click.BadParameter(
                f"{max(sizes):,} dirty pages do not fit the {guest.describe()} guest "
                f"({guest.populated_pages:,} populated pages)", ctx, param_hint="'--dirty'")
    cells: list[ResetCell] = []
    interrupted: KeyboardInterrupt | None = None
    total = resetbench.planned_cycles(guests, sizes, mode_list, repeat)
    bar = None if quiet else Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("guest runs"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True)
    task = bar.add_task("starting", total=total) if bar is not None else None
    with open_kvm(ctx) as kvm:

        def progress(c: ResetCell) -> None:
            cells.append(c)
            if not quiet:
                console.print(_reset_line(c))

        try:
            with deferred_interrupt(progress) as interrupt:  # raised between guest runs

                def on_cycle(mode: ResetMode, guest: ResetGuest, n: int, done: int) -> None:
                    if bar is not None and task is not None:
                        bar.update(task, advance=done,
                                   description=f"{mode} {guest.label}, {n:,} dirty")
                    interrupt.check()

                if not quiet:
                    console.print(
                        f"measuring checkpoint resets: {', '.join(mode_list)}; guests "
                        f"{', '.join(g.describe() for g in guests)}; dirty pages "
                        f"{', '.join(f'{n:,}' for n in sizes)}; {repeat} repeats (Ctrl-C "
                        "stops and keeps the cells measured)")
                if bar is not None:
                    bar.start()
                try:
                    resetbench.measure_resets(kvm, guests, sizes, modes=mode_list,
                                              repeat=repeat, progress=progress,
                                              on_cycle=on_cycle, on_interrupted=interrupt.check)
                finally:
                    if bar is not None:
                        bar.stop()
        except KeyboardInterrupt as e:  # the guest was stopped; keep the cells measured
            interrupted = e
    if cells:
        console.print(_reset_table(cells))
    else:
        console.print("no cell was measured")
    if json_path:
        data: dict[str, Any] = {
            "config": {"guests": [{"label": g.label, "size": g.size, "populated": g.populated}
                                  for g in guests],
                       "dirty": sizes, "modes": mode_list, "repeat": repeat},
            "interrupted": interrupted is not None,
            "cells": [c.to_json() for c in cells]}
        write_json(json_path, data)
        console.print(f"wrote {json_path}")
    if plot_path and cells:
        from kvmio.plots import plot_reset

        plot_reset(cells, plot_path)
        console.print(f"wrote {plot_path}")
    if interrupted is not None:
        raise interrupted  # the error boundary: "Interrupted.", exit status 130
