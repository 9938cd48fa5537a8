"""The ``kvmio`` command line: ``info``, ``demo``, ``run``, ``dirtyrate``, ``bench``,
``snapshot`` (``take``, ``inspect``, ``merge``) and ``restore``.

One module per command; :mod:`kvmio.cli.params` holds the parameter types (sizes, finite ranged
numbers, output files checked up front) and :mod:`kvmio.cli.errors` the one error boundary
(``Error: ...`` with exit status 1, ``Interrupted.`` with 130 after Ctrl-C, usage errors with 2).
The console script ``kvmio`` is :func:`main`; ``python -m kvmio.cli`` runs it too.
"""

from __future__ import annotations

from kvmio.cli.app import main

__all__ = ["main"]
