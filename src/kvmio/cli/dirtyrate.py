"""``kvmio dirtyrate``: how fast, and where, a guest dirties memory, live, as JSON and as a plot.

Ctrl-C ends the measurement early: the guest is stopped, every thread joined, and the samples
taken until then are summarised and written (``--json``, ``--plot``) with ``"interrupted":
true``; the command then exits with 130.
"""

from __future__ import annotations

from typing import Literal

import click
from rich.live import Live
from rich.table import Table

from kvmio.cli.common import console, open_kvm, write_json
from kvmio.cli.params import (
    PAGE_SIZE,
    FiniteFloatRange,
    OutputFile,
    Rate,
    RingEntries,
    Size,
    format_size,
)
from kvmio.cli.run import MULTIBOOT_MEMORY
from kvmio.dirtyrate import (
    DirtyRateReport,
    MeasurementInterrupted,
    measure_kernel,
    measure_workload,
)
from kvmio.limit import DirtyLimit
from kvmio.tracker import DirtyTracker

__all__ = ["MAX_DURATION", "MAX_INTERVAL", "MAX_MEMORY", "MAX_PACE", "dirtyrate"]

#: The longest ``--duration`` (seconds): every interval keeps a sample and a heatmap row.
MAX_DURATION = 3600.0
#: The longest ``--interval`` and ``--window`` (seconds).
MAX_INTERVAL = 60.0
#: The most guest memory the workload is offered (its page tables map up to 512 GiB).
MAX_MEMORY = 512 << 30
#: The longest ``--pace`` (delay loops between two writes).
MAX_PACE = 1_000_000_000


def _mib(b: float | None) -> str:
    return "" if b is None else f"{b / (1 << 20):,.1f}"


def _rate_table(tracker: DirtyTracker, elapsed: float, duration: float,
                limit: DirtyLimit | None = None) -> Table:
    t = Table(title=f"dirty rate ({tracker.mode} mode, window {tracker.window:g} s) "
                    f"{elapsed:4.1f}/{duration:g} s")
    t.add_column("")
    t.add_column("pages/s", justify="right")
    t.add_column("MiB/s", justify="right")
    limits = limit.limits if limit is not None else {}
    if limit is not None:
        t.add_column("limit MiB/s", justify="right")
        t.add_column("throttled s", justify="right")
    r = tracker.rate()
    vids = sorted(set(r.vcpu_pages_per_second) | set(limits))
    for vid in vids:
        pps = r.vcpu_pages_per_second.get(vid)
        row = [f"vCPU {vid}", "" if pps is None else f"{pps:,.0f}",
               "" if pps is None else _mib(pps * PAGE_SIZE)]
        if limit is not None:
            row += [_mib(limits.get(vid)), f"{limit.status(vid).throttled:,.1f}"]
        t.add_row(*row)
    row = ["[bold]VM[/]", f"{r.pages_per_second:,.0f}", _mib(r.bytes_per_second)]
    if limit is not None:
        all_limited = bool(limits) and set(limits) >= set(tracker.vm.vcpus)
        row += [_mib(sum(limits.values())) if all_limited else "", ""]
    t.add_row(*row)
    return t


def _check_times(ctx: click.Context, interval: float, window: float | None,
                 duration: float) -> float:
    """The window (default: 1 s, or the duration if shorter), after checking that
    interval <= window <= duration."""
    if interval > duration:
        raise click.BadParameter(f"{interval:g} s is longer than --duration ({duration:g} s)",
                                 ctx, param_hint="'--interval'")
    if window is None:
        window = max(min(1.0, duration), interval)
    elif window > duration:
        raise click.BadParameter(f"{window:g} s is longer than --duration ({duration:g} s)",
                                 ctx, param_hint="'--window'")
    if interval > window:
        raise click.BadParameter(f"{interval:g} s is longer than --window ({window:g} s)",
                                 ctx, param_hint="'--interval'")
    return window


def _summarise(report: DirtyRateReport) -> None:
    summary = report.to_json()["summary"]
    console.print(
        f"mean dirty rate {summary['mean_pages_per_second']:,.0f} pages/s "
        f"({summary['mean_bytes_per_second'] / (1 << 20):,.1f} MiB/s) over "
        f"{len(report.samples)} samples; tracker CPU "
        f"{100 * summary['tracker_cpu_fraction']:.1f}% of one core")
    if report.guest_writes is not None:
        console.print(f"guest's own count: {report.guest_writes:,} writes in "
                      f"{report.duration:.2f} s")
    held = report.extra.get("limit")
    if held:
        for vid, st in held["vcpus"].items():
            if st["limit"] is None and not st["throttled_seconds"]:
                continue
            rates = [s["vcpu_pages_per_second"].get(vid) for s in report.samples
                     if s["time"] >= report.duration / 2]
            measured = [r for r in rates if r is not None]
            mean = (f"{sum(measured) / len(measured) * PAGE_SIZE / (1 << 20):,.1f} MiB/s "
                    "in the second half, ") if measured else ""
            console.print(f"vCPU {vid}: limit {_mib(st['limit']) or 'none'} MiB/s, {mean}"
                          f"throttled {st['throttled_seconds']:.2f} s")


@click.command()
@click.option("--mem", default="1G", show_default=True, metavar="SIZE",
              type=Size(min=1 << 20, max=MAX_MEMORY, what="memory size"),
              help="Guest memory (tracked) for the workload, between 1 MiB and 512 GiB, or "
                   f"the kernel's RAM ({MULTIBOOT_MEMORY.describe()}).")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 16))
@click.option("--working-set", default=None, metavar="SIZE",
              type=Size(max=MAX_MEMORY, multiple=1, what="working set"),
              help="Bytes the workload writes into, at most --mem (default: all of it).")
@click.option("--order", type=click.Choice(["random", "sequential"]), default="random",
              show_default=True)
@click.option("--pace", default=0, show_default=True, type=click.IntRange(0, MAX_PACE),
              help="Delay loops between writes (2 instructions each).")
@click.option("--mode", type=click.Choice(["ring", "bitmap"]), default="ring",
              show_default=True)
@click.option("--ring", "ring_entries", default=4096, show_default=True, type=RingEntries(),
              help="Ring entries per vCPU (ring mode), a power of two.")
@click.option("--interval", default=0.05, show_default=True,
              type=FiniteFloatRange(0.001, MAX_INTERVAL),
              help="Seconds between harvests (at most --window).")
@click.option("--window", default=None, type=FiniteFloatRange(0.01, MAX_INTERVAL),
              help="Sliding window of the rate, in seconds (at most --duration; default: 1, "
                   "or --duration if shorter).")
@click.option("--duration", default=3.0, show_default=True,
              type=FiniteFloatRange(0.1, MAX_DURATION),
              help="Seconds to run (Ctrl-C stops early and keeps what was measured).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Measure a multiboot kernel instead of the built-in workload.")
@click.option("--append", "cmdline", default="", help="Kernel command line (with --kernel).")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write the time series and summary as JSON.")
@click.option("--plot", "plot_path", type=OutputFile(plot=True), default=None,
              help="Write a PNG: rate over time and a memory x time heatmap (needs "
                   "matplotlib).")
@click.option("--limit", "limit", default=None, type=Rate(),
              help="Hold the dirty rate of each vCPU (or of --limit-vcpu) at or under RATE "
                   "bytes per second, e.g. 16M or 16MiB/s (a bare number is MiB/s).  In "
                   "bitmap mode the VM's pages are shared out among the vCPUs by their time "
                   "in the guest.")
@click.option("--limit-vcpu", "limit_vcpu", default=None, type=click.IntRange(0, 15),
              help="Limit only this vCPU (with --limit).")
@click.option("--quiet", is_flag=True, help="No live display.")
@click.pass_context
def dirtyrate(ctx: click.Context, mem: int, vcpus: int, working_set: int | None, order: str,
              pace: int, mode: Literal["ring", "bitmap"], ring_entries: int, interval: float,
              window: float | None, duration: float, kernel: str | None, cmdline: str,
              json_path: str | None, plot_path: str | None, limit: int | None,
              limit_vcpu: int | None, quiet: bool) -> None:
    """Measure how fast, and where, a guest dirties memory (distinct pages per second),
    optionally under a dirty-rate limit."""
    window = _check_times(ctx, interval, window, duration)
    if limit_vcpu is not None:
        if limit is None:
            raise click.BadParameter("needs --limit", ctx, param_hint="'--limit-vcpu'")
        count = 1 if kernel is not None else vcpus
        if limit_vcpu >= count:
            raise click.BadParameter(
                f"vCPU {limit_vcpu} does not exist: the guest has {count} vCPU"
                f"{'s' if count > 1 else ''}", ctx, param_hint="'--limit-vcpu'")
    if kernel is not None:
        if not MULTIBOOT_MEMORY.min <= mem <= MULTIBOOT_MEMORY.max:
            raise click.BadParameter(f"{format_size(mem)} is out of range for a kernel: it "
                                     f"must be {MULTIBOOT_MEMORY.describe()}", ctx,
                                     param_hint="'--mem'")
    elif working_set is not None and working_set > mem:
        raise click.BadParameter(f"{format_size(working_set)} is larger than --mem "
                                 f"({format_size(mem)})", ctx, param_hint="'--working-set'")
    guest = (f"kernel {kernel}" if kernel is not None else
             f"the dirtier workload ({vcpus} vCPU{'s' if vcpus > 1 else ''})")
    interrupted: MeasurementInterrupted | None = None
    with open_kvm(ctx) as kvm:
        live = Live(console=console, refresh_per_second=4, transient=False) if not quiet \
            else None
        started = False
        limiter: DirtyLimit | None = None

        def on_limit(lim: DirtyLimit) -> None:
            nonlocal limiter
            limiter = lim

        def progress(tracker: DirtyTracker, elapsed: float) -> None:
            nonlocal started
            if not started and tracker.samples:  # the guest runs; Ctrl-C now keeps samples
                started = True
                held = "" if limit is None else (
                    f", limit {format_size(limit)}/s for "
                    f"{'every vCPU' if limit_vcpu is None else f'vCPU {limit_vcpu}'}")
                console.print(f"measuring {guest}, {format_size(mem)}, {mode} mode, for "
                              f"{duration:g} s{held} (Ctrl-C stops early and keeps the "
                              "samples)")
            if live is not None:
                live.update(_rate_table(tracker, elapsed, duration, limiter))

        try:
            if live is not None:
                live.start()
            if kernel is not None:
                report = measure_kernel(kvm, kernel, mem=mem, cmdline=cmdline, mode=mode,
                                        ring_entries=ring_entries, interval=interval,
                                        window=window, duration=duration, limit=limit,
                                        progress=progress, on_limit=on_limit)
            else:
                report = measure_workload(kvm, mem=mem, vcpus=vcpus, working_set=working_set,
                                          order=order, pace=pace, mode=mode,
                                          ring_entries=ring_entries, interval=interval,
                                          window=window, duration=duration, limit=limit,
                                          limit_vcpu=limit_vcpu, progress=progress,
                                          on_limit=on_limit)
        except MeasurementInterrupted as e:  # the guest was stopped, every thread joined
            interrupted = e
            report = e.report
        finally:
            if live is not None:
                live.stop()
    _summarise(report)
    if json_path:
        write_json(json_path, report.to_json())
        console.print(f"wrote {json_path}")
    if plot_path and report.samples:
        from kvmio.plots import plot_dirty_rate

        plot_dirty_rate(report, plot_path)
        console.print(f"wrote {plot_path}")
    if interrupted is not None:
        raise interrupted  # the error boundary: "Interrupted.", exit status 130
