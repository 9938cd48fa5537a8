"""Argument checks shared by the public API: wrong types and ranges become
:class:`~kvmio.errors.KvmInvalidArgumentError` naming the argument, never a TypeError or
OverflowError from cffi or numpy, nor a silent truncation."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from kvmio.errors import KvmInvalidArgumentError

T = TypeVar("T")


def integer(name: str, value: object, *, lo: int | None = 0, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi)`` (bounds optional).  Accepts ints and numpy
    integers, refuses bools, floats, strings and anything else."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise KvmInvalidArgumentError(f"{name} must be an int, not {type(value).__name__} "
                                      f"{value!r}")
    v = operator.index(value)
    if lo is not None and v < lo:
        raise KvmInvalidArgumentError(f"{name} must be >= {lo:#x}, not {v:#x}"
                                      if lo > 9 else f"{name} must be >= {lo}, not {v}")
    if hi is not None and v >= hi:
        raise KvmInvalidArgumentError(f"{name} must be < {hi:#x}, not {v:#x}")
    return v


def u64(name: str, value: object) -> int:
    """An unsigned 64-bit value."""
    v = integer(name, value, lo=None)
    if not 0 <= v < 1 << 64:
        raise KvmInvalidArgumentError(f"{name} must be a u64 (0 <= value < 2**64), not {v}")
    return v


def u32(name: str, value: object) -> int:
    """An unsigned 32-bit value."""
    v = integer(name, value, lo=None)
    if not 0 <= v < 1 << 32:
        raise KvmInvalidArgumentError(f"{name} must be a u32 (0 <= value < 2**32), not {v}")
    return v


def positive_float(name: str, value: object, *, allow_zero: bool = False,
                   hi: float | None = None) -> float:
    """A finite float > 0 (or >= 0), at most ``hi``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise KvmInvalidArgumentError(f"{name} must be a number, not {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise KvmInvalidArgumentError(
            f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, not {value!r}")
    if hi is not None and v > hi:
        raise KvmInvalidArgumentError(f"{name} must be at most {hi:g}, not {v:g}")
    return v


def sequence(name: str, value: object) -> list[Any]:
    """``value`` (any iterable but a string or bytes) as a list."""
    if isinstance(value, str | bytes | bytearray) or not hasattr(value, "__iter__"):
        raise KvmInvalidArgumentError(f"{name} must be a sequence, not {type(value).__name__}")
    return list(value)


def named_parts(name: str, value: object, known: Iterable[str], what: str
                ) -> list[tuple[str, Any]]:
    """``value`` as a list of ``(part, value)`` pairs, each part one of ``known`` and given
    once (``what`` names the parts in messages, e.g. "vCPU state part")."""
    known = tuple(known)
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for item in sequence(name, value):
        if not isinstance(item, tuple) or len(item) != 2:
            raise KvmInvalidArgumentError(f"{name} must be (name, value) pairs")
        part, data = item
        if part not in known:
            raise KvmInvalidArgumentError(f"no {what} {part!r}; choose from {', '.join(known)}")
        if part in seen:
            raise KvmInvalidArgumentError(f"{what} {part!r} is given twice")
        seen.add(part)
        out.append((part, data))
    return out


def instance(name: str, value: object, kind: type[T]) -> T:
    """``value`` if it is a ``kind``."""
    if not isinstance(value, kind):
        raise KvmInvalidArgumentError(f"{name} must be a {kind.__name__}, not "
                                      f"{type(value).__name__}")
    return value


def index_array(name: str, value: Any) -> npt.NDArray[np.int64]:
    """A 1-D array of non-negative integers (no float truncation, no bools)."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged input and the like
        raise KvmInvalidArgumentError(f"{name} must be a sequence of ints: {e}") from e
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "ui":
        raise KvmInvalidArgumentError(f"{name} must hold integers, not {arr.dtype} values")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) >= 1 << 63:
        raise KvmInvalidArgumentError(f"{name} holds a value too large for a page index")
    out = arr.astype(np.int64).ravel()
    if out.min() < 0:
        raise KvmInvalidArgumentError(f"{name} must not hold negative values")
    return out


def buffer_bytes(name: str, data: object) -> memoryview:
    """A byte-level view of bytes-like ``data`` (its length counts bytes, whatever the item
    size of the object: a numpy array or an ``array('I')`` counts its bytes)."""
    try:
        mv = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise KvmInvalidArgumentError(f"{name} must be bytes-like, not "
                                      f"{type(data).__name__}") from None
    if not mv.contiguous:
        raise KvmInvalidArgumentError(f"{name} must be a contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
