"""Sizes written by people: ``"128M"``, ``"1G"``, ``"64MiB"``, ``"4096B"``, parsed
(:func:`parse_size`) and written back (:func:`format_size`).

A values-layer module (it imports only :mod:`kvmio.errors`), so that every layer above, the
command line included, parses and names sizes one way.
"""

from __future__ import annotations

import re

from kvmio.errors import KvmInvalidArgumentError

__all__ = ["format_size", "parse_size"]

_BARE = {0: "bytes", 10: "KiB", 20: "MiB", 30: "GiB", 40: "TiB"}

_UNITS = ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtKMGT])(?:i?[bB])?|([bB]))?\s*")


def parse_size(text: str, *, default_shift: int = 20, what: str = "size") -> int:
    """Parse a size such as ``"128M"``, ``"1G"``, ``"64MiB"``, ``"4096B"`` or ``"512"`` into
    bytes.

    Suffixes ``K``, ``M``, ``G``, ``T`` (optionally followed by ``iB`` or ``B``) are binary
    (powers of 1024); a ``B`` alone means bytes; a bare number is shifted left by
    ``default_shift`` (20: MiB, as for QEMU's ``-m``).  A fraction is allowed when the result
    is a whole number of bytes (``"1.5G"``).  Raises :class:`KvmInvalidArgumentError`, naming
    ``what``, for anything else.
    """
    if default_shift not in _BARE:
        raise KvmInvalidArgumentError(f"default_shift must be one of {sorted(_BARE)}")
    if not isinstance(text, str):
        raise KvmInvalidArgumentError(f"a {what} must be a string, not {type(text).__name__}")
    m = _SIZE.fullmatch(text)
    if m is None:
        raise KvmInvalidArgumentError(
            f"bad {what} {text!r}: use a number with an optional K, M, G or T suffix "
            f"(e.g. 128M, 1G, 64MiB; a bare number means {_BARE.get(default_shift, 'bytes')})")
    number, unit, byte = m.groups()
    if byte:
        shift = 0
    elif unit:
        shift = 10 * ("kmgt".index(unit.lower()) + 1)
    else:
        shift = default_shift
    if "." in number:
        whole, frac = number.split(".")
        scale: int = 10 ** len(frac)
        value, rest = divmod(int(whole + frac) << shift, scale)
        if rest:
            raise KvmInvalidArgumentError(f"{what} {text!r} is not a whole number of bytes")
        return value
    return int(number) << shift


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it (``"3 GiB"``, ``"1536 KiB"``,
    ``"100 bytes"``)."""
    for shift, unit in _UNITS:
        if n and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
