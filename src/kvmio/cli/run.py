"""``kvmio run``: boot a Multiboot kernel, as QEMU's ``-kernel`` does."""

from __future__ import annotations

import click

from kvmio.cli.common import open_kvm
from kvmio.cli.errors import deferred_interrupt, error_context, kick_on_interrupt
from kvmio.cli.params import FiniteFloatRange, Size
from kvmio.guests.multiboot import DEFAULT_MEMORY, MultibootMachine
from kvmio.guests.multiboot.bootinfo import MAX_MEMORY, MIN_MEMORY

__all__ = ["MAX_TIMEOUT", "MULTIBOOT_MEMORY", "run_command"]

#: The longest ``--timeout`` (seconds): about 11.5 days.  Without one a kernel runs until it
#: stops.
MAX_TIMEOUT = 1e6

#: The guest RAM a Multiboot machine can have (the loader's limits).
MULTIBOOT_MEMORY = Size(min=MIN_MEMORY, max=MAX_MEMORY, what="memory size")


@click.command("run")
@click.argument("kernel", type=click.Path(exists=True, dir_okay=False))
@click.option("--mem", default=f"{DEFAULT_MEMORY >> 20}M", show_default=True, metavar="SIZE",
              type=MULTIBOOT_MEMORY,
              help=f"Guest RAM, e.g. 128M, 1G or 64MiB (a bare number means MiB), "
                   f"{MULTIBOOT_MEMORY.describe()}.")
@click.option("--append", "cmdline", default="", metavar="CMDLINE",
              help="Kernel command line (after the kernel's name, as QEMU passes it).")
@click.option("--timeout", type=FiniteFloatRange(min=0, max=MAX_TIMEOUT), default=None,
              metavar="S", help="Stop the kernel after S seconds (default: no limit).")
@click.option("--no-irqchip", is_flag=True,
              help="No in-kernel interrupt controllers (PIC, IOAPIC, local APIC) and PIT: "
                   "nothing interrupts the kernel, and its first HLT ends the run.")
@click.option("--vga", is_flag=True,
              help="Print the VGA text screen (down to its last non-empty line) at the end.")
@click.pass_context
def run_command(ctx: click.Context, kernel: str, mem: int, cmdline: str, timeout: float | None,
                no_irqchip: bool, vga: bool) -> None:
    """Boot a Multiboot kernel, as QEMU's -kernel does.

    Serial (COM1) and debug-port (0xE9) output goes to stdout as it arrives; why the kernel
    stopped goes to stderr.  The exit status is 0, or (v << 1) | 1 if the kernel wrote v to
    the isa-debug-exit port 0xF4, or 130 after Ctrl-C.
    """
    def stream(data: bytes) -> None:
        click.echo(data, nl=False)  # bytes go to the binary stream, flushed

    error_context(ctx, f"cannot run {kernel}")
    with (open_kvm(ctx) as kvm,
          MultibootMachine(kvm, kernel, mem=mem, cmdline=cmdline, irqchip=not no_irqchip) as m,
          kick_on_interrupt(m.vcpu.kick),  # the vCPU runs in this (the main) thread
          deferred_interrupt(stream) as interrupt):  # raised at safe points only
        result = m.run(timeout=timeout, on_output=stream, on_interrupted=interrupt.check)
    if vga:
        sep = b"\n" if result.output and not result.output.endswith(b"\n") else b""
        screen = result.vga_text.rstrip("\n")  # the screen without its empty bottom lines
        click.echo(sep + screen.encode() + b"\n", nl=False)
    for warning in result.warnings:
        click.echo(f"kvmio: warning: {warning}", err=True)
    click.echo(f"kvmio: {result.summary()}", err=True)
    if result.exit_code is not None:
        ctx.exit(result.exit_code)
