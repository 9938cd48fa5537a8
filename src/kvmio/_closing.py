"""Context-manager support shared by every kvmio object that owns resources."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with obj: ...`` calls ``obj.close()`` on the way out (subclasses define ``close``).

    When the body raised, that exception is the one that propagates: an error from ``close()``
    is attached to it as a note (and as ``__context__``-free detail), never put in its place,
    so a Ctrl-C or the user's own error is never masked by the clean-up.
    """

    def close(self) -> None:
        """Release what the object owns (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if v is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # the body's exception is the one to report
            v.add_note(f"while closing {type(self).__name__}: {type(e).__name__}: {e}")
