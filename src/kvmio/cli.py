"""The ``kvmio`` command line: ``info``, ``demo``, ``run`` and the dirty-tracking tools."""

from __future__ import annotations

import sys
import time

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from kvmio import Cap, Kvm, KvmError
from kvmio.exits import IoOut
from kvmio.guests.modes import setup_real_mode
from kvmio.guests.multiboot import DEFAULT_MEMORY, parse_memory_size, run_multiboot
from kvmio.guests.programs import program
from kvmio.guests.workload import Workload
from kvmio.tracker import DirtyTracker

console = Console(highlight=False)


@click.group()
@click.version_option(package_name="kvmio")
@click.option("--device", default="/dev/kvm", show_default=True, help="KVM device node.")
@click.pass_context
def main(ctx: click.Context, device: str) -> None:
    """Drive Linux KVM through /dev/kvm, with dirty page tracking."""
    ctx.obj = {"device": device}


def _open(ctx: click.Context) -> Kvm:
    try:
        return Kvm(ctx.obj["device"])
    except KvmError as e:
        raise click.ClickException(str(e)) from e


@main.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """API version and the capabilities that matter for dirty tracking."""
    with _open(ctx) as kvm:
        t = Table(title=f"KVM at {kvm.path}: API version {kvm.api_version}")
        t.add_column("capability")
        t.add_column("value", justify="right")
        t.add_column("meaning")
        ring = kvm.check_extension(Cap.DIRTY_LOG_RING)
        acq = kvm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL)
        rows = [
            ("DIRTY_LOG_RING", ring, f"max {ring // 16} entries ({ring} bytes)" if ring
             else "unsupported"),
            ("DIRTY_LOG_RING_ACQ_REL", acq, f"max {acq // 16} entries" if acq else "unsupported"),
            ("DIRTY_LOG_RING_WITH_BITMAP", kvm.check_extension(Cap.DIRTY_LOG_RING_WITH_BITMAP),
             "backup bitmap (arm64)"),
            ("MANUAL_DIRTY_LOG_PROTECT2", kvm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2),
             "manual clear (1 = enable, 2 = initially set)"),
            ("NR_VCPUS", kvm.get_nr_vcpus(), "recommended vCPUs per VM"),
            ("MAX_VCPUS", kvm.get_max_vcpus(), "maximum vCPUs per VM"),
            ("NR_MEMSLOTS", kvm.get_nr_memslots(), "memory slots per address space"),
            ("READONLY_MEM", kvm.check_extension(Cap.READONLY_MEM), "read-only slots"),
            ("IMMEDIATE_EXIT", kvm.check_extension(Cap.IMMEDIATE_EXIT), "vCPU kick"),
        ]
        for name, val, meaning in rows:
            t.add_row(name, str(val), meaning)
        console.print(t)


@main.command()
@click.option("--writes", default=50_000, show_default=True, help="Guest page writes.")
@click.option("--mem", "mem_mib", default=1024, show_default=True, help="Tracked MiB.")
@click.option("--ring", "ring_entries", default=4096, show_default=True,
              help="Dirty ring entries per vCPU (0: use the bitmap).")
@click.pass_context
def demo(ctx: click.Context, writes: int, mem_mib: int, ring_entries: int) -> None:
    """Run the built-in guests: a hello in real mode, then a page-dirtying workload whose
    dirty pages are collected and checked against guest memory."""
    with _open(ctx) as kvm:
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
            console.print(f"[bold]hello guest[/] (real mode) said: {text.decode().strip()!r}, "
                          f"then {type(ex).__name__}")
        # 2. The dirtier in long mode, tracked by the ring or the bitmap.
        mode = f"ring ({ring_entries} entries)" if ring_entries else "bitmap"
        try:
            w = Workload(kvm, mem_size=mem_mib << 20, max_writes=writes,
                         ring_entries=ring_entries or None)
        except KvmError as e:
            raise click.ClickException(str(e)) from e
        with w:
            w.generation = 1
            t0 = time.perf_counter()
            w.run_all(timeout=120)
            elapsed = time.perf_counter() - t0
            dirty = w.vm.collect_dirty_pages(final=True)
            words = w.mem.page_words()
            written = np.flatnonzero(words)
            reported = dirty.pages.get(w.mem.slot, np.zeros(0, dtype=np.uint64))
            ok = np.array_equal(np.sort(written).astype(np.uint64), reported)
            t = Table(title=f"dirtier: long mode, {mem_mib} MiB tracked, {mode}")
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
                sys.exit(1)


def _memory_size(ctx: click.Context, param: click.Parameter, value: str | int) -> int:
    """Option callback: a memory size such as 128M, 1G or 64MiB (a bare number means MiB)."""
    if isinstance(value, int):
        return value
    try:
        return parse_memory_size(value)
    except KvmError as e:
        raise click.BadParameter(e.message, ctx, param) from e


@main.command("run")
@click.argument("kernel", type=click.Path(exists=True, dir_okay=False))
@click.option("--mem", default=f"{DEFAULT_MEMORY >> 20}M", show_default=True, metavar="SIZE",
              callback=_memory_size,
              help="Guest RAM, e.g. 128M, 1G or 64MiB (a bare number means MiB).")
@click.option("--append", "cmdline", default="", metavar="CMDLINE",
              help="Kernel command line (after the kernel's name, as QEMU passes it).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="S",
              help="Stop the kernel after S seconds (default: no limit).")
@click.option("--vga", is_flag=True,
              help="Print the VGA text screen (down to its last non-empty line) at the end.")
@click.pass_context
def run_command(ctx: click.Context, kernel: str, mem: int, cmdline: str, timeout: float | None,
                vga: bool) -> None:
    """Boot a Multiboot kernel, as QEMU's -kernel does.

    Serial (COM1) and debug-port (0xE9) output goes to stdout as it arrives; why the kernel
    stopped goes to stderr.  The exit status is 0, or (v << 1) | 1 if the kernel wrote v to
    the isa-debug-exit port 0xF4.
    """
    def stream(data: bytes) -> None:
        click.echo(data, nl=False)  # bytes go to the binary stream, flushed

    with _open(ctx) as kvm:
        try:
            result = run_multiboot(kvm, kernel, mem=mem, cmdline=cmdline, timeout=timeout,
                                   on_output=stream)
        except KvmError as e:
            raise click.ClickException(f"cannot run {kernel}: {e}") from e
    if vga:
        sep = b"\n" if result.output and not result.output.endswith(b"\n") else b""
        screen = result.vga_text.rstrip("\n")  # the screen without its empty bottom lines
        click.echo(sep + screen.encode() + b"\n", nl=False)
    for warning in result.warnings:
        click.echo(f"kvmio: warning: {warning}", err=True)
    click.echo(f"kvmio: {result.summary()}", err=True)
    if result.exit_code is not None:
        ctx.exit(result.exit_code)




def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_memory_size(value)
    except KvmError as e:
        raise click.BadParameter(str(e)) from e


def _rate_table(tracker: DirtyTracker, elapsed: float, duration: float) -> Table:
    t = Table(title=f"dirty rate ({tracker.mode} mode, window {tracker.window:g} s) "
                    f"{elapsed:4.1f}/{duration:g} s")
    t.add_column("")
    t.add_column("pages/s", justify="right")
    t.add_column("MiB/s", justify="right")
    r = tracker.rate()
    for vid, pps in sorted(r.vcpu_pages_per_second.items()):
        t.add_row(f"vCPU {vid}", f"{pps:,.0f}", f"{pps * 4096 / (1 << 20):,.1f}")
    t.add_row("[bold]VM[/]", f"{r.pages_per_second:,.0f}",
              f"{r.bytes_per_second / (1 << 20):,.1f}")
    return t


@main.command()
@click.option("--mem", default="1G", show_default=True, callback=_size, metavar="SIZE",
              help="Guest memory (tracked) for the workload, or the kernel's RAM.")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 16))
@click.option("--working-set", default=None, callback=_size, metavar="SIZE",
              help="Bytes the workload writes into (default: all of --mem).")
@click.option("--order", type=click.Choice(["random", "sequential"]), default="random",
              show_default=True)
@click.option("--pace", default=0, show_default=True, type=click.IntRange(0),
              help="Delay loops between writes (2 instructions each).")
@click.option("--mode", type=click.Choice(["ring", "bitmap"]), default="ring",
              show_default=True)
@click.option("--ring", "ring_entries", default=4096, show_default=True,
              help="Ring entries per vCPU (ring mode).")
@click.option("--interval", default=0.05, show_default=True, type=click.FloatRange(0.001),
              help="Seconds between harvests.")
@click.option("--window", default=1.0, show_default=True, type=click.FloatRange(0.01),
              help="Sliding window of the rate (seconds).")
@click.option("--duration", default=3.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds to run.")
@click.option("--kernel", type=click.Path(dir_okay=False), default=None,
              help="Measure a multiboot kernel instead of the built-in workload.")
@click.option("--append", "cmdline", default="", help="Kernel command line (with --kernel).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              default=None, help="Write the time series and summary as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              default=None, help="Write a PNG: rate over time and a memory x time heatmap.")
@click.option("--quiet", is_flag=True, help="No live display.")
@click.pass_context
def dirtyrate(ctx: click.Context, mem: int, vcpus: int, working_set: int | None, order: str,
              pace: int, mode: str, ring_entries: int, interval: float, window: float,
              duration: float, kernel: str | None, cmdline: str, json_path: str | None,
              plot_path: str | None, quiet: bool) -> None:
    """Measure how fast, and where, a guest dirties memory (distinct pages per second)."""
    import json

    from rich.live import Live

    from kvmio.dirtyrate import measure_kernel, measure_workload

    with _open(ctx) as kvm:
        live = Live(console=console, refresh_per_second=4, transient=False) if not quiet \
            else None

        def progress(tracker: DirtyTracker, elapsed: float) -> None:
            if live is not None:
                live.update(_rate_table(tracker, elapsed, duration))

        try:
            if live is not None:
                live.start()
            if kernel is not None:
                report = measure_kernel(kvm, kernel, mem=mem, cmdline=cmdline,
                                        mode=mode,  # type: ignore[arg-type]
                                        ring_entries=ring_entries, interval=interval,
                                        window=window, duration=duration, progress=progress)
            else:
                report = measure_workload(kvm, mem=mem, vcpus=vcpus, working_set=working_set,
                                          order=order, pace=pace,
                                          mode=mode,  # type: ignore[arg-type]
                                          ring_entries=ring_entries, interval=interval,
                                          window=window, duration=duration, progress=progress)
        except KvmError as e:
            raise click.ClickException(str(e)) from e
        finally:
            if live is not None:
                live.stop()
        summary = report.to_json()["summary"]
        console.print(
            f"mean dirty rate {summary['mean_pages_per_second']:,.0f} pages/s "
            f"({summary['mean_bytes_per_second'] / (1 << 20):,.1f} MiB/s) over "
            f"{len(report.samples)} samples; tracker CPU "
            f"{100 * summary['tracker_cpu_fraction']:.1f}% of one core")
        if report.guest_writes is not None:
            console.print(f"guest's own count: {report.guest_writes:,} writes in "
                          f"{report.duration:.2f} s")
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report.to_json(), f, indent=1)
            console.print(f"wrote {json_path}")
        if plot_path:
            from kvmio.plots import plot_dirty_rate

            plot_dirty_rate(report, plot_path)
            console.print(f"wrote {plot_path}")


@main.group()
def bench() -> None:
    """Benchmarks of dirty tracking on this machine."""


@bench.command("ring-vs-bitmap")
@click.option("--mem", "mems", multiple=True, callback=lambda c, p, v: [
    parse_memory_size(x) for x in (v or ("1G", "4G", "16G", "64G", "256G"))],
              metavar="SIZE", help="Guest memory sizes (repeatable; default 1G..256G).")
@click.option("--dirty", "dirty", multiple=True, type=click.IntRange(1, 60000),
              help="Dirty-set sizes in pages (repeatable; default 1024, 16384, 60000).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None)
@click.pass_context
def ring_vs_bitmap_command(ctx: click.Context, mems: list[int], dirty: tuple[int, ...],
                           repeat: int, json_path: str | None, plot_path: str | None) -> None:
    """Collection cost of ring and bitmap against guest memory size and dirty-set size."""
    import json

    from kvmio.dirtyrate import CollectionCost, ring_vs_bitmap

    sizes = list(dirty) or [1024, 16384, 60000]
    with _open(ctx) as kvm:

        def progress(c: CollectionCost) -> None:
            console.print(f"  {c.mode:6} {c.mem >> 30:4} GiB {c.dirty:6} pages: "
                          f"{c.seconds * 1e3:8.3f} ms", highlight=False)

        try:
            cells = ring_vs_bitmap(kvm, mems, sizes, repeat=repeat, progress=progress)
        except KvmError as e:
            raise click.ClickException(str(e)) from e
    t = Table(title="one collection (ms): ring (harvest + reset) vs bitmap (GET_DIRTY_LOG)")
    t.add_column("guest memory", justify="right")
    t.add_column("dirty pages", justify="right")
    t.add_column("ring ms", justify="right")
    t.add_column("bitmap ms", justify="right")
    t.add_column("faster", justify="center")
    for mem in mems:
        for n in sizes:
            r = next(c for c in cells if c.mode == "ring" and c.mem == mem and c.dirty == n)
            b = next(c for c in cells if c.mode == "bitmap" and c.mem == mem and c.dirty == n)
            t.add_row(f"{mem >> 30} GiB", f"{n:,}", f"{r.seconds * 1e3:.3f}",
                      f"{b.seconds * 1e3:.3f}", "ring" if r.seconds < b.seconds else "bitmap")
    console.print(t)
    if json_path:
        with open(json_path, "w") as f:
            json.dump([{"mode": c.mode, "mem": c.mem, "dirty": c.dirty, "seconds": c.seconds,
                        "pages_found": c.pages_found} for c in cells], f, indent=1)
    if plot_path:
        from kvmio.plots import plot_ring_vs_bitmap

        plot_ring_vs_bitmap(cells, plot_path)
        console.print(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
