"""The command line's error boundary: the one place where failures become messages and exit
statuses.

- :class:`kvmio.KvmError` (a refused request, a kernel error) and :class:`OSError` (say, an
  output file that cannot be written) print one line, ``Error: ...``, and exit with 1.
- Ctrl-C (:class:`KeyboardInterrupt`) prints ``Interrupted.`` and exits with 130 (128 + SIGINT,
  as shells report a process that SIGINT ended).  By the time it gets here the library's
  ``with`` blocks have stopped the guest and joined every thread, and the command has written
  what it measured.  While that clean-up runs, a second Ctrl-C does not interrupt it (it says
  so; a third one ends the process at once).  A vCPU that runs in the main thread is also
  kicked at once (:func:`kick_on_interrupt`): Python raises KeyboardInterrupt only between
  bytecodes, and a SIGINT that lands just before the thread enters KVM_RUN would otherwise wait
  for the guest's next exit, which a spinning guest never makes.  And while that vCPU runs,
  Ctrl-C is only noted (:func:`deferred_interrupt`) and raised at the run loop's next safe
  point: raised between two bytecodes of ``Vcpu.run()`` it could leave the vCPU's fd held, and
  the clean-up would then wait for it for ever.
- Arguments that are not valid UTF-8 are a usage error (exit 2), named and shown with escapes,
  instead of a UnicodeEncodeError far inside.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import CodeType, FrameType

import click

from kvmio.errors import KvmError
from kvmio.vcpu import kick_running

__all__ = ["EXIT_INTERRUPTED", "DeferredInterrupt", "check_utf8_args", "deferred_interrupt",
           "error_boundary", "error_context", "kick_on_interrupt", "sigint_once"]

#: The exit status after Ctrl-C.
EXIT_INTERRUPTED = 128 + signal.SIGINT

_CONTEXT = "kvmio.error_context"


def error_context(ctx: click.Context, text: str) -> None:
    """Start the messages of later errors with ``text`` (e.g. ``"cannot run kernel.elf"``)."""
    ctx.meta[_CONTEXT] = text


def _message(ctx: click.Context | None, e: OSError) -> str:
    if isinstance(e, KvmError):
        text = str(e)
    elif e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = e.strerror or str(e)
    prefix = ctx.meta.get(_CONTEXT) if ctx is not None else None
    return f"{prefix}: {text}" if prefix else text


@contextlib.contextmanager
def error_boundary(ctx: click.Context | None = None) -> Iterator[None]:
    """Turn what escapes a command into its message and exit status (see the module)."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except OSError as e:  # KvmError included
        raise click.ClickException(_message(ctx, e)) from e


def check_utf8_args(ctx: click.Context, args: list[str]) -> None:
    """Refuse an argument that is not valid UTF-8 (Python decoded it with surrogate escapes),
    naming it by position and showing its bytes."""
    for i, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(arg)
            raise click.UsageError(
                f"argument {i} is not valid UTF-8: {raw!r} (kvmio takes UTF-8 text and file "
                "names)", ctx) from None


_kickers: list[Callable[[], None]] = []
_kickers_lock = threading.Lock()


@contextlib.contextmanager
def kick_on_interrupt(kick: Callable[[], None]) -> Iterator[None]:
    """While in the block, Ctrl-C also calls ``kick`` (e.g. :meth:`kvmio.Vcpu.kick`) at once,
    from a helper thread, so that a vCPU running in the main thread leaves KVM_RUN even if the
    signal came just before it entered it.  Errors of ``kick`` are ignored (the vCPU may be
    closing).  Effective inside :func:`sigint_once`."""
    with _kickers_lock:
        _kickers.append(kick)
    try:
        yield
    finally:
        with _kickers_lock:
            _kickers.remove(kick)


def _kick_on_sigint(fd: int) -> None:
    """The helper thread: Python's C-level signal handler writes the number of every signal it
    catches to ``fd`` (``signal.set_wakeup_fd``); each SIGINT kicks the registered vCPUs and
    every vCPU inside KVM_RUN in the main thread."""
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        if not data:
            return  # the write end was closed: the command is over
        if signal.SIGINT in data:
            with _kickers_lock:
                kickers = list(_kickers)
            for kick in kickers:
                with contextlib.suppress(Exception):
                    kick()
            # Any vCPU in KVM_RUN in the main thread, registered or not (the benchmark's
            # guests run there): the signal may have been delivered to another thread.
            kick_running(threading.main_thread().ident)


class DeferredInterrupt:
    """A Ctrl-C noted while :func:`deferred_interrupt` is active: :meth:`check` raises it
    (once) at a point where the code is ready for it."""

    def __init__(self, safe: frozenset[CodeType] = frozenset()):
        self.pending = False
        #: Functions inside which Ctrl-C may be raised at once (e.g. the output callback, which
        #: may block on a full pipe while no vCPU call is half done).
        self.safe = safe

    def raise_now(self, frame: FrameType | None) -> bool:
        """Whether the main thread, interrupted in ``frame``, is inside a safe function."""
        while frame is not None:
            if frame.f_code in self.safe:
                return True
            frame = frame.f_back
        return False

    def check(self) -> None:
        """Raise :class:`KeyboardInterrupt` if Ctrl-C came since the last check."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


_deferred: list[DeferredInterrupt] = []


@contextlib.contextmanager
def deferred_interrupt(*safe: Callable[..., object]) -> Iterator[DeferredInterrupt]:
    """While in the block (main thread, inside :func:`sigint_once`), the first Ctrl-C does not
    raise where the main thread happens to be: it is noted, the vCPUs are kicked as usual, and
    the block raises it by calling :meth:`DeferredInterrupt.check` at a safe point, or at once
    if the main thread is inside one of the ``safe`` functions (say, an output callback
    blocked on a full pipe).  On the way out of the block a Ctrl-C still pending is raised."""
    d = DeferredInterrupt(frozenset(c for f in safe
                                    if isinstance(c := getattr(f, "__code__", None), CodeType)))
    _deferred.append(d)
    try:
        yield d
    finally:
        _deferred.remove(d)
    d.check()


@contextlib.contextmanager
def sigint_once() -> Iterator[None]:
    """While the command runs, the first Ctrl-C raises :class:`KeyboardInterrupt` (and kicks
    the vCPUs registered with :func:`kick_on_interrupt`); the next one only says that kvmio is
    still stopping (so that the clean-up, which stops and joins the vCPU threads, is not cut
    short), and the one after ends the process at once.

    Does nothing outside the main thread, or if SIGINT already has a handler other than
    Python's default (e.g. ignored, as for a background job)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def later(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.write(2, b"kvmio: still stopping the guest; Ctrl-C again to quit at once\n")

    def first(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, later)
        if _deferred and not _deferred[-1].raise_now(frame):
            _deferred[-1].pending = True  # raised by the block at its next safe point
            return
        raise KeyboardInterrupt

    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)
    helper = threading.Thread(target=_kick_on_sigint, args=(r,), name="kvmio-sigint",
                              daemon=True)
    helper.start()
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(old_fd)
        os.close(w)
        helper.join()
        os.close(r)
