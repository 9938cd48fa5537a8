"""Built-in guest programs: machine code kept beside its assembly source (``asm/*.S``).

No assembler is needed at run time: :data:`kvmio.guests._blobs.BLOBS` holds the bytes, produced
by ``tools/assemble_guests.py``, and a test checks them against the sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from kvmio.errors import KvmInvalidArgumentError
from kvmio.guests._blobs import BLOBS

if TYPE_CHECKING:
    from kvmio.vm import Vm


@dataclass(frozen=True)
class Program:
    """A built-in guest: ``code`` linked to run at guest physical ``base`` in CPU ``mode``
    (``"real"``, ``"protected"`` or ``"long"``)."""

    name: str
    base: int
    mode: str
    code: bytes
    symbols: dict[str, int] = field(default_factory=dict)

    def address(self, symbol: str) -> int:
        """Guest physical address of a global label of the program (when loaded at ``base``)."""
        try:
            return self.base + self.symbols[symbol]
        except KeyError:
            raise KvmInvalidArgumentError(f"{self.name} has no symbol {symbol!r}") from None

    @property
    def source(self) -> str:
        """The assembly source the code was built from."""
        return resources.files("kvmio.guests").joinpath("asm", f"{self.name}.S").read_text()

    def load(self, vm: Vm, at: int | None = None) -> int:
        """Copy the code into guest memory at ``at`` (default: its link address); return it.

        Only the position-independent real-mode programs may be loaded elsewhere.
        """
        at = self.base if at is None else at
        if at != self.base and self.mode != "real":
            raise KvmInvalidArgumentError(f"{self.name} is linked at {self.base:#x}")
        vm.write_memory(at, self.code)
        return at


def program(name: str) -> Program:
    """The built-in program called ``name`` (see :func:`names`)."""
    try:
        base, mode, code, symbols = BLOBS[name]
    except KeyError:
        raise KvmInvalidArgumentError(
            f"no built-in guest {name!r}; choose from {', '.join(names())}") from None
    return Program(name, base, mode, code, dict(symbols))


def names() -> list[str]:
    """Names of the built-in programs."""
    return sorted(BLOBS)
