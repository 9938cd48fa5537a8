"""Context-manager support shared by every kvmio object that owns resources."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with obj: ...`` calls ``obj.close()`` on the way out (subclasses define ``close``)."""

    def close(self) -> None:
        """Release what the object owns (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
