"""Parameter types shared by the commands.

Every numeric option is range-checked here, before anything runs, and fails as a usage error
(exit status 2) that names the option:

- :class:`Size`: a size written as people do (``128M``, ``1G``, ``64MiB``, ``4096B``; a bare
  number means MiB), parsed by :func:`kvmio.units.parse_size`, within bounds and a multiple of
  a page;
- :class:`FiniteFloatRange`: click's :class:`click.FloatRange` without NaN and infinities (click's
  own lets ``nan`` through every range);
- :class:`RingEntries`: a dirty-ring size (a power of two), or 0 where 0 means "no ring";
- :class:`OutputFile`: a file to write (``--json``, ``--plot``), checked before a guest starts:
  its directory exists and is writable, the path is not a directory, and for plots matplotlib is
  installed.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import click

from kvmio._abi import PAGE_SIZE
from kvmio.errors import KvmError
from kvmio.units import format_size, parse_size

__all__ = ["PAGE_SIZE", "FiniteFloatRange", "OutputFile", "Rate", "RingEntries", "Size",
           "format_size", "plot_hint"]


if TYPE_CHECKING:  # click >= 8.2 types its parameter types; older clicks are not generic
    _IntType = click.ParamType[int, Any]
    _StrType = click.ParamType[str, Any]
else:
    _IntType = _StrType = click.ParamType


class Size(_IntType):
    """A size in bytes, written ``128M``, ``1G``, ``64MiB`` or ``4096B`` (a bare number is shifted
    by ``default_shift``: MiB by default), between ``min`` and ``max`` bytes and a multiple of
    ``multiple`` bytes.  ``what`` names it in messages (``"memory size"``)."""

    name = "size"

    def __init__(self, *, min: int = PAGE_SIZE, max: int, multiple: int = PAGE_SIZE,
                 default_shift: int = 20, what: str = "size"):
        if not 0 < min <= max or multiple < 1:
            raise ValueError(f"bad size bounds: {min}..{max}, multiple of {multiple}")
        self.min = min
        self.max = max
        self.multiple = multiple
        self.default_shift = default_shift
        self.what = what

    def describe(self) -> str:
        """The accepted range, in words."""
        return f"between {format_size(self.min)} and {format_size(self.max)}"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """``SIZE``."""
        return "SIZE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        """Parse and check ``value`` (an int is taken as bytes, as a default may be)."""
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
            text = format_size(n)
        else:
            text = str(value)
            try:
                n = parse_size(text, default_shift=self.default_shift, what=self.what)
            except KvmError as e:
                self.fail(e.message, param, ctx)
        if not self.min <= n <= self.max:
            self.fail(f"{self.what} {text} is out of range: it must be {self.describe()}",
                      param, ctx)
        if n % self.multiple:
            self.fail(f"{self.what} {text} is not a multiple of {format_size(self.multiple)}",
                      param, ctx)
        return n

    def __repr__(self) -> str:
        return f"Size({format_size(self.min)}..{format_size(self.max)})"


class Rate(Size):
    """A rate in bytes per second, written as a size with an optional ``/s``: ``16M``,
    ``16MiB/s``, ``512K/s`` (a bare number is MiB/s), between one page and 1 TiB per
    second."""

    name = "rate"

    def __init__(self) -> None:
        super().__init__(min=PAGE_SIZE, max=1 << 40, multiple=1, what="rate")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """``RATE``."""
        return "RATE"

    def describe(self) -> str:
        """The accepted range, in words."""
        return f"between {format_size(self.min)}/s and {format_size(self.max)}/s"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        """Parse and check ``value`` (``/s`` or ``ps`` at the end is optional)."""
        if isinstance(value, str):
            text = value.strip()
            for suffix in ("/s", "ps"):
                if text.lower().endswith(suffix):
                    text = text[:-len(suffix)].rstrip()
                    break
            value = text
        return super().convert(value, param, ctx)


class FiniteFloatRange(click.FloatRange):
    """:class:`click.FloatRange` that also refuses ``nan``, ``inf`` and ``-inf`` (click's accepts
    NaN whatever the bounds, since every comparison with NaN is false)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        """A finite float within the range, or a usage error."""
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            as_float = 0.0  # not a number at all: click's own message below says so
        if not math.isfinite(as_float):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(value, param, ctx)


class RingEntries(click.IntRange):
    """Dirty-ring entries per vCPU: a power of two from ``min`` (256: one page of entries) to
    ``max`` (65536, KVM's limit; a host may allow less, which KVM then reports), or 0 if
    ``allow_zero`` (no ring: the bitmap)."""

    name = "entries"

    def __init__(self, *, min: int = 256, max: int = 65536, allow_zero: bool = False):
        super().__init__(0 if allow_zero else min, max)
        self.ring_min = min
        self.ring_max = max
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        """An int in range that is a power of two (or 0 where allowed)."""
        n: int = click.INT.convert(value, param, ctx)
        if n == 0 and self.allow_zero:
            return n
        if not self.ring_min <= n <= self.ring_max or n & (n - 1):
            self.fail(f"{n} is not a power of two between {self.ring_min} and {self.ring_max}"
                      + (" (or 0 for no ring)" if self.allow_zero else ""), param, ctx)
        return n


def plot_hint() -> str | None:
    """Why plots cannot be made here (matplotlib is missing), or None if they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plots need matplotlib, which is not installed: pip install 'kvmio[plot]'"
    return None


class OutputFile(_StrType):
    """A file the command will write when it is done, checked now so that a long run does not
    end in an error: the path is not a directory, its directory exists and is writable, an
    existing file is writable; with ``plot``, matplotlib is installed."""

    name = "file"

    def __init__(self, *, plot: bool = False):
        self.plot = plot

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """``FILE`` (``FILE.png`` for plots)."""
        return "FILE.png" if self.plot else "FILE"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        """The path, checked (a usage error says what is wrong with it)."""
        path = os.fspath(value)
        if not isinstance(path, str) or not path:
            self.fail("an empty path", param, ctx)
        if os.path.isdir(path):
            self.fail(f"{path!r} is a directory", param, ctx)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            self.fail(f"cannot write {path!r}: directory {parent!r} does not exist", param, ctx)
        if not os.access(parent, os.W_OK | os.X_OK):
            self.fail(f"cannot write {path!r}: directory {parent!r} is not writable", param,
                      ctx)
        if os.path.exists(path) and not os.access(path, os.W_OK):
            self.fail(f"cannot write {path!r}: the file is not writable", param, ctx)
        if self.plot:
            hint = plot_hint()
            if hint is not None:
                self.fail(hint, param, ctx)
        return path
