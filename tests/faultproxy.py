"""A fault-injecting proxy for migration tests: it forwards a connection between a source and
a destination (socket pairs: no ports), and can add latency, cap the bandwidth, stall, and
cut either direction after a given number of bytes."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

from kvmio.migration import socket_pair

_CHUNK = 1 << 16


class _Pipe:
    """One direction: a reader thread timestamps chunks, a writer thread forwards each one
    ``delay`` seconds after it arrived, at most ``rate`` bytes/s, pausing while stalled, and
    hangs up after ``cut`` bytes."""

    def __init__(self, proxy: FaultProxy, src: socket.socket, dst: socket.socket,
                 cut: int | None):
        self.proxy, self.src, self.dst, self.cut = proxy, src, dst, cut
        self.forwarded = 0
        # Bounded: what is in flight is what the link holds (delay x rate, or a few chunks),
        # so a slow or stalled link pushes back on the sender as a real one does.
        held = proxy.delay * proxy.rate if proxy.rate else 0.0
        self._q: queue.Queue[tuple[float, bytes] | None] = queue.Queue(
            maxsize=max(4, int(held / _CHUNK) + 2))
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]

    def _put(self, item: tuple[float, bytes] | None) -> bool:
        """Queue ``item`` unless the proxy closed (the writer may have stopped taking)."""
        while not self.proxy.closed.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                b = self.src.recv(_CHUNK)
                if not b or not self._put((time.monotonic() + self.proxy.delay, b)):
                    break
        self._put(None)

    def _take(self) -> tuple[float, bytes] | None:
        """The next chunk; None at the end of the stream or once the proxy closed."""
        while True:
            try:
                return self._q.get(timeout=0.05)
            except queue.Empty:
                if self.proxy.closed.is_set():
                    return None

    def _write(self) -> None:
        try:
            while (item := self._take()) is not None:
                due, b = item
                while len(b):
                    now = time.monotonic()
                    if now < due:
                        time.sleep(due - now)
                    if not self.proxy.wait_while_stalled():
                        return
                    part = b[:self.proxy.burst]
                    if self.cut is not None and self.forwarded + len(part) >= self.cut:
                        self.dst.sendall(part[:self.cut - self.forwarded])
                        self.forwarded = self.cut
                        break
                    self.dst.sendall(part)
                    self.forwarded += len(part)
                    b = b[len(part):]
                    if self.proxy.rate:
                        time.sleep(len(part) / self.proxy.rate)
                if self.cut is not None and self.forwarded >= self.cut:
                    break
        except OSError:
            pass
        finally:
            self.proxy.hang_up()
            self.proxy.closed.set()  # the reader stops queueing (nobody takes any more)


class FaultProxy:
    """``source`` and ``dest`` are the two ends to hand to the source and the destination.

    ``delay``: seconds added to every chunk's trip (both ways); ``rate``: bytes/s each way at
    most (0: no cap); ``cut_down``/``cut_up``: hang up (both ways) once that many bytes went
    from the source to the destination / back; :meth:`stall` holds every byte for a while."""

    def __init__(self, *, delay: float = 0.0, rate: float = 0.0, cut_down: int | None = None,
                 cut_up: int | None = None):
        self.delay, self.rate = delay, rate
        self.burst = max(1 << 12, int(rate / 100)) if rate else _CHUNK
        self.source, self._from_source = socket_pair()
        self._to_dest, self.dest = socket_pair()
        self._stalled_until = 0.0
        self.stalls = 0
        #: Set once the proxy stopped forwarding (a cut, a hang-up, close()).
        self.closed = threading.Event()
        self._down = _Pipe(self, self._from_source, self._to_dest, cut_down)
        self._up = _Pipe(self, self._to_dest, self._from_source, cut_up)
        for t in (*self._down.threads, *self._up.threads):
            t.start()

    @property
    def forwarded(self) -> int:
        """Bytes forwarded from the source to the destination."""
        return self._down.forwarded

    @property
    def answered(self) -> int:
        """Bytes forwarded from the destination back to the source."""
        return self._up.forwarded

    def stall(self, seconds: float) -> None:
        """Forward nothing, either way, for ``seconds`` from now."""
        self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)
        self.stalls += 1

    def wait_while_stalled(self) -> bool:
        """Wait out a stall; False if the proxy closed meanwhile."""
        while (left := self._stalled_until - time.monotonic()) > 0:
            if self.closed.wait(left):
                return False
        return not self.closed.is_set()

    def hang_up(self) -> None:
        for s in (self._from_source, self._to_dest):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.hang_up()
        for t in (*self._down.threads, *self._up.threads):
            t.join(10)
        for s in (self.source, self._from_source, self._to_dest, self.dest):
            s.close()
