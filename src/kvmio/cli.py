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


if __name__ == "__main__":
    main()
