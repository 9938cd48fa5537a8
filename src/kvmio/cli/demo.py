"""``kvmio demo``: the built-in guests, with their dirty pages checked against guest memory."""

from __future__ import annotations

import time

import click
import numpy as np
from rich.table import Table

from kvmio.cli.common import console, open_kvm
from kvmio.cli.params import RingEntries, Size, format_size
from kvmio.exits import IoOut
from kvmio.guests.modes import setup_real_mode
from kvmio.guests.programs import program
from kvmio.guests.workload import Workload

__all__ = ["MAX_MEMORY", "MAX_WRITES", "demo"]

#: The most guest memory the demo's workload is offered (its page tables map up to 512 GiB).
MAX_MEMORY = 512 << 30
#: The most writes the demo asks of its guest.
MAX_WRITES = 1_000_000_000


@click.command()
@click.option("--writes", default=50_000, show_default=True,
              type=click.IntRange(1, MAX_WRITES), help="Guest page writes.")
@click.option("--mem", default="1G", show_default=True, metavar="SIZE",
              type=Size(min=1 << 20, max=MAX_MEMORY, what="memory size"),
              help="Tracked memory, e.g. 64M or 1G (a bare number means MiB), between 1 MiB "
                   "and 512 GiB.")
@click.option("--ring", "ring_entries", default=4096, show_default=True,
              type=RingEntries(allow_zero=True),
              help="Dirty ring entries per vCPU, a power of two (0: use the bitmap).")
@click.pass_context
def demo(ctx: click.Context, writes: int, mem: int, ring_entries: int) -> None:
    """Run the built-in guests: a hello in real mode, then a page-dirtying workload whose
    dirty pages are collected and checked against guest memory."""
    with open_kvm(ctx) as kvm:
        # 1. Hello over port I/O, in real mode.
        with kvm.create_vm() as vm:
            vm.add_memory_region(0, 1 << 20)
            hello = program("hello")
            at = hello.load(vm, 0x10000)
            vcpu = vm.create_vcpu()
            setup_real_mode(vcpu, at)
            text = bytearray()
            while True:
                ex = vcpu.run()
                if isinstance(ex, IoOut) and ex.port == 0xE9:
                    text += ex.data
                elif isinstance(ex, IoOut):
                    continue
                else:
                    break
            console.print(f"[bold]hello guest[/] (real mode) said: "
                          f"{text.decode('utf-8', 'replace').strip()!r}, "
                          f"then {type(ex).__name__}")
        # 2. The dirtier in long mode, tracked by the ring or the bitmap.
        mode = f"ring ({ring_entries} entries)" if ring_entries else "bitmap"
        with Workload(kvm, mem_size=mem, max_writes=writes,
                      ring_entries=ring_entries or None) as w:
            w.generation = 1
            t0 = time.perf_counter()
            w.run_all(timeout=120)  # Ctrl-C here: the runner stops and joins the vCPU threads
            elapsed = time.perf_counter() - t0
            dirty = w.vm.collect_dirty_pages(final=True)
            words = w.mem.page_words()
            written = np.flatnonzero(words)
            reported = dirty.pages.get(w.mem.slot, np.zeros(0, dtype=np.uint64))
            ok = np.array_equal(np.sort(written).astype(np.uint64), reported)
            t = Table(title=f"dirtier: long mode, {format_size(mem)} tracked, {mode}")
            t.add_column("measure")
            t.add_column("value", justify="right")
            t.add_row("guest writes (its own counter)", f"{w.total_writes():,}")
            t.add_row("guest run time", f"{elapsed:.2f} s")
            t.add_row("ring entries harvested", f"{dirty.entries:,}")
            t.add_row("distinct dirty pages reported", f"{dirty.count:,}")
            t.add_row("pages holding the guest's value", f"{len(written):,}")
            t.add_row("reported == written", "[green]yes[/]" if ok else "[red]NO[/]")
            console.print(t)
            if not ok:
                ctx.exit(1)
