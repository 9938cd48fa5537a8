"""``kvmio info``: the API version and the capabilities that matter for dirty tracking."""

from __future__ import annotations

import click
from rich.table import Table

from kvmio.caps import Cap
from kvmio.cli.common import console, open_kvm

__all__ = ["info"]


@click.command()
@click.pass_context
def info(ctx: click.Context) -> None:
    """API version and the capabilities that matter for dirty tracking."""
    with open_kvm(ctx) as kvm:
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
