"""``kvmio bench``: benchmarks of dirty tracking on this machine.

Ctrl-C stops the benchmark guest; the cells measured until then are shown and written
(``--json``, with ``"interrupted": true``; ``--plot``), and the command exits with 130.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from kvmio.cli.common import console, open_kvm, write_json
from kvmio.cli.params import PAGE_SIZE, OutputFile, Size, format_size
from kvmio.dirtyrate import CollectionCost, ring_vs_bitmap

__all__ = ["DEFAULT_DIRTY", "DEFAULT_MEMS", "MAX_DIRTY", "MAX_MEMORY", "bench",
           "ring_vs_bitmap_command"]

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
