"""What the commands share: the console, opening ``/dev/kvm``, writing output files."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console

from kvmio.system import Kvm

__all__ = ["console", "open_kvm", "write_json"]

#: Where the commands print (stdout; flushed after every print).
console = Console(highlight=False)


def open_kvm(ctx: click.Context) -> Kvm:
    """Open the KVM device given by the root ``--device`` option."""
    return Kvm(ctx.find_root().obj["device"])


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (an :class:`OSError` reaches the error
    boundary)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
