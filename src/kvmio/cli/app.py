"""The root command, ``kvmio``, and the group class that gives every command the one error
boundary (:mod:`kvmio.cli.errors`)."""

from __future__ import annotations

from typing import Any

import click

from kvmio.cli.bench import bench
from kvmio.cli.demo import demo
from kvmio.cli.dirtyrate import dirtyrate
from kvmio.cli.errors import check_utf8_args, error_boundary, sigint_once
from kvmio.cli.info import info
from kvmio.cli.migrate import migrate
from kvmio.cli.run import run_command
from kvmio.cli.snapshot import restore_command, snapshot

__all__ = ["KvmioGroup", "main"]


class KvmioGroup(click.Group):
    """A :class:`click.Group` whose commands run inside the error boundary, with Ctrl-C handled
    once, and whose arguments must be valid UTF-8."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run the command line (see :meth:`click.Command.main`) with Ctrl-C handled once."""
        with sigint_once():
            return super().main(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Refuse arguments that are not valid UTF-8, then parse as click does."""
        check_utf8_args(ctx, args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        """Invoke the subcommand inside the error boundary."""
        with error_boundary(ctx):
            return super().invoke(ctx)


@click.group(cls=KvmioGroup)
@click.version_option(package_name="kvmio")
@click.option("--device", default="/dev/kvm", show_default=True, help="KVM device node.")
@click.pass_context
def main(ctx: click.Context, device: str) -> None:
    """Drive Linux KVM through /dev/kvm, with dirty page tracking."""
    ctx.obj = {"device": device}


for _command in (info, demo, run_command, dirtyrate, bench, snapshot, restore_command, migrate):
    main.add_command(_command)
