"""The migration stream: a versioned sequence of checksummed records.

Layout (all integers little-endian)::

    preamble   b"KVMIO-MIGRATE\\n" (14 bytes), version u16
    record     tag (4 ASCII bytes), payload length u32, payload, XXH3-64 u64 of tag, length
               and payload

Records, in order: ``CONF`` (JSON: the machine layout, the guest's metadata), then for each
pass any number of ``ZERO`` and ``DATA`` records and one ``PASS``, then ``STAT`` (the machine
state's own serialized form) and ``DONE``.  After a ``PASS`` the source may send ``SYNC``,
which the destination answers with ``SYNC`` once it has stored everything before it: the
source does so before it pauses the guest, so that the stream is empty when the downtime
begins (what the link and the destination still held would otherwise be sent in it), and
then once more, into the empty stream, to time the link's round trip (the downtime holds
two). A ``SYNC`` may follow a ``PASS`` or an answered ``SYNC``. The answer's payload: the
bytes of the last whole pass received, u64, and the CPU time the destination took to store
them, u64 nanoseconds (the source's estimate of the final pass counts the destination's time
per byte beside its own). After ``DONE`` the destination answers ``OKAY`` (it built and
restored the VM, and waits) or ``FAIL`` (UTF-8 reason).
After ``OKAY`` the source sends ``LIVE`` (the destination may run the VM now; the source
will not) and the destination answers ``RUNS``.  Until ``LIVE`` arrives the destination
never runs the VM; once the source sent it, the source never resumes its own copy.

- ``ZERO``: slot u32, count u32, then ``count`` page indices u64 (strictly increasing): pages
  that hold zeros;
- ``DATA``: slot u32, count u32, the page indices, then ``count`` pages of data;
- ``ZDAT``: a DATA record whose pages are one zstd frame (written instead of DATA only by a
  writer with ``compress=True``, and only when it is at least an eighth smaller); the reader
  decompresses it into exactly ``count`` pages, never more;
- ``PASS``: pass number u32, pages u64, bytes u64 (what the pass sent).

:class:`StreamReader` checks every record before anything reaches guest memory: its tag, its
length against the most its tag allows and against what its counts imply, its checksum, the
order of records, and (through :meth:`StreamReader.pages`) that the slot exists and every page
index lies within it.  Anything else is a :class:`~kvmio.errors.MigrationError`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import xxhash

from kvmio._abi import PAGE_SIZE
from kvmio.errors import MigrationError, SnapshotError
from kvmio.snapshot.files import MachineLayout

__all__ = ["MAGIC", "MAX_PAGES_PER_RECORD", "VERSION", "Connection", "PageRecord", "Record",
           "StreamReader", "StreamWriter", "socket_pair"]

MAGIC = b"KVMIO-MIGRATE\n"
VERSION = 4
#: Pages in one ZERO or DATA record at most.
MAX_PAGES_PER_RECORD = 256
_HEADER = struct.Struct("<4sI")
_HASH = struct.Struct("<Q")
_PAGES = struct.Struct("<II")
_PASS = struct.Struct("<IQQ")
#: The most payload each tag may carry.
_LIMITS = {
    b"CONF": 1 << 20,
    b"ZERO": _PAGES.size + 8 * MAX_PAGES_PER_RECORD,
    b"DATA": _PAGES.size + (8 + PAGE_SIZE) * MAX_PAGES_PER_RECORD,
    b"ZDAT": _PAGES.size + (8 + PAGE_SIZE) * MAX_PAGES_PER_RECORD,
    b"PASS": _PASS.size,
    b"STAT": 64 << 20,
    b"DONE": 0,
    b"OKAY": 0,
    b"FAIL": 4096,
    b"LIVE": 0,
    b"RUNS": 0,
    b"SYNC": 16,
}


class Connection(Protocol):
    """What the stream reads from and writes to: a socket (or an SSL socket)."""

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None:
        """Send all of ``data`` (raise ``OSError`` if it cannot)."""
        ...

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        """Receive up to ``nbytes`` into ``buffer``; 0 at the end of the stream."""
        ...


@dataclass(frozen=True)
class Record:
    """One record as read: its tag and checked payload.  ``stored``: a DATA record whose pages
    went straight into the memory given to :meth:`StreamReader.record` (its payload then
    holds the slot, the count and the indices only)."""

    tag: bytes
    payload: bytes
    stored: bool = False


@dataclass(frozen=True)
class PageRecord:
    """A checked ZERO or DATA record: the slot, its page indices (strictly increasing, within
    the slot), and for DATA the pages (``count`` x 4096 bytes, read-only)."""

    slot: int
    pages: npt.NDArray[np.uint64]
    data: npt.NDArray[np.uint8] | None


def _hash(header: bytes, payload: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(header)
    h.update(payload)
    return h.intdigest()


#: Records smaller than this go to the connection in one piece (one segment, not three).
_COALESCE = 64 << 10


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise MigrationError("compressed page records need the zstandard package (pip "
                             "install 'kvmio[compress]')") from None
    return zstandard


class StreamWriter:
    """Writes records to ``conn`` (counting the bytes sent).  On a TCP connection it turns
    Nagle's algorithm off (TCP_NODELAY): the hand-over's small records would otherwise each
    wait for the peer's delayed acknowledgement (up to 40 ms), in the guest's downtime; small
    records are written in one piece, so that costs no tiny segments.

    ``compress``: page data goes as zstd frames (level 1) where that makes a record at least
    an eighth smaller (``ZDAT`` records; needs the ``zstandard`` package)."""

    def __init__(self, conn: Connection, *, compress: bool = False):
        self._conn = conn
        #: Bytes written so far.
        self.sent = 0
        #: Page bytes that went compressed, and what they took on the wire.
        self.compressed_in = self.compressed_out = 0
        self._zc = _zstd().ZstdCompressor(level=1) if compress else None
        self._skip = self._backoff = 0
        if getattr(conn, "family", None) in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, AttributeError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        if len(parts) > 1 and sum(len(p) for p in parts) < _COALESCE:
            parts = (b"".join(parts),)
        try:
            for p in parts:
                self._conn.sendall(p)
                self.sent += len(p)
        except OSError as e:
            raise MigrationError(f"the connection failed while sending: {e}",
                                 errno=e.errno) from e

    def preamble(self) -> None:
        """The stream's first bytes."""
        self._send(MAGIC + struct.pack("<H", VERSION))

    def record(self, tag: bytes, *payload: bytes | bytearray | memoryview) -> None:
        """One record whose payload is the concatenation of ``payload``."""
        payload = tuple(memoryview(p).cast("B") for p in payload)  # lengths in bytes
        n = sum(len(p) for p in payload)
        if tag not in _LIMITS or n > _LIMITS[tag]:
            raise MigrationError(f"record {tag!r} of {n} bytes cannot be sent")
        header = _HEADER.pack(tag, n)
        h = xxhash.xxh3_64()
        h.update(header)
        for p in payload:
            h.update(p)
        self._send(header, *payload, _HASH.pack(h.intdigest()))

    def config(self, layout: MachineLayout, guest: dict[str, Any]) -> None:
        """The ``CONF`` record."""
        body = json.dumps({"layout": layout.to_json(), "guest": guest},
                          sort_keys=True).encode()
        self.record(b"CONF", body)

    def pages(self, slot: int, pages: npt.NDArray[np.uint64],
              data: npt.NDArray[np.uint8] | None) -> None:
        """One ZERO (``data is None``) or DATA record (``data``: ``len(pages)`` pages)."""
        n = len(pages)
        if not 1 <= n <= MAX_PAGES_PER_RECORD:
            raise MigrationError(f"a page record holds 1 to {MAX_PAGES_PER_RECORD} pages")
        idx = np.ascontiguousarray(pages, dtype="<u8")
        if data is None:
            self.record(b"ZERO", _PAGES.pack(slot, n), idx.data)
        else:
            if data.nbytes != n * PAGE_SIZE:
                raise MigrationError("page data does not match its page count")
            raw = np.ascontiguousarray(data).data
            if self._zc is not None and self._skip == 0:
                z = self._zc.compress(raw)
                if len(z) <= data.nbytes - data.nbytes // 8:
                    self.record(b"ZDAT", _PAGES.pack(slot, n), idx.data, z)
                    self.compressed_in += data.nbytes
                    self.compressed_out += len(z)
                    self._backoff = 0
                    return
                # Incompressible (random or encrypted pages, say): skip the next 1, 2, 4, ...
                # up to 32 records before trying again, so that such memory costs little.
                self._backoff = min(max(1, 2 * self._backoff), 32)
                self._skip = self._backoff
            elif self._skip:
                self._skip -= 1
            self.record(b"DATA", _PAGES.pack(slot, n), idx.data, raw)

    def end_pass(self, number: int, pages: int, nbytes: int) -> None:
        """The ``PASS`` record closing pass ``number``."""
        self.record(b"PASS", _PASS.pack(number, pages, nbytes))


class StreamReader:
    """Reads and checks records from ``conn`` (see the module).  ``on_bytes(n)`` is told of
    every ``n`` bytes received (progress)."""

    def __init__(self, conn: Connection, *, on_bytes: Callable[[int], None] | None = None):
        self._conn = conn
        self._on_bytes = on_bytes
        #: Bytes read so far.
        self.received = 0
        self.layout: MachineLayout | None = None
        self._slot_pages: dict[int, int] = {}
        self._zd: Any = None

    def _read(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        self._read_into(memoryview(buf), what)
        return buf

    def _read_into(self, view: memoryview, what: str) -> None:
        n = len(view)
        got = 0
        while got < n:
            try:
                k = self._conn.recv_into(view[got:], n - got)
            except TimeoutError as e:
                raise MigrationError(f"the connection stalled while reading {what}") from e
            except OSError as e:
                raise MigrationError(f"the connection failed while reading {what}: {e}",
                                     errno=e.errno) from e
            if k == 0:
                raise MigrationError(f"the stream ended in the middle of {what} (the "
                                     "connection was closed: truncated)")
            got += k
            self.received += k
            if self._on_bytes is not None:
                self._on_bytes(k)

    def preamble(self) -> None:
        """Check the stream's first bytes."""
        raw = self._read(len(MAGIC) + 2, "the preamble")
        if bytes(raw[:len(MAGIC)]) != MAGIC:
            raise MigrationError("not a kvmio migration stream (bad preamble)")
        (version,) = struct.unpack_from("<H", raw, len(MAGIC))
        if version != VERSION:
            raise MigrationError(f"migration stream version {version}; this kvmio speaks "
                                 f"version {VERSION}")

    def record(self, expect: tuple[bytes, ...] | None = None, *,
               into: Mapping[int, memoryview] | None = None) -> Record:
        """The next record, checked; ``expect``: the tags allowed here.

        ``into``: writable memory per slot (bytes, page 0 first).  A DATA record's pages are
        then received straight into it, at their pages' offsets (no bounce buffer: on a
        host where a first touch costs a page fault, a copy through one costs both), and the
        record comes back ``stored``.  Its slot, count and indices are checked before a byte
        of page data is read; its checksum only after, so on a mismatch (an error) the pages
        named hold the corrupted data: memory given here belongs to a VM that does not run
        until the whole stream has been checked."""
        header = bytes(self._read(_HEADER.size, "a record header"))
        tag, n = _HEADER.unpack(header)
        if tag not in _LIMITS:
            raise MigrationError(f"unknown record {tag!r} (corrupted stream)")
        if n > _LIMITS[tag]:
            raise MigrationError(f"record {tag!r} claims {n} bytes, more than it may hold "
                                 f"({_LIMITS[tag]}): corrupted stream")
        if into is not None and tag == b"DATA":
            self._check_expected(tag, expect)
            return self._stored(header, n, into)
        payload = bytes(self._read(n, f"a {tag.decode()} record"))
        (h,) = _HASH.unpack(self._read(_HASH.size, "a record checksum"))
        if h != _hash(header, payload):
            raise MigrationError(f"record {tag!r}: checksum mismatch (corrupted stream)")
        self._check_expected(tag, expect)
        return Record(tag, payload)

    @staticmethod
    def _check_expected(tag: bytes, expect: tuple[bytes, ...] | None) -> None:
        if expect is not None and tag not in expect:
            due = "/".join(t.decode() for t in expect)
            raise MigrationError(f"record {tag.decode()} where {due} was due (a stream out "
                                 "of order)")

    def _stored(self, header: bytes, length: int, into: Mapping[int, memoryview]) -> Record:
        """The rest of a DATA record of ``length`` bytes, its pages into ``into``."""
        if length < _PAGES.size:
            raise MigrationError("a DATA record is too short")
        head = self._read(_PAGES.size, "a DATA record")
        slot, n = _PAGES.unpack(head)
        if not (1 <= n <= MAX_PAGES_PER_RECORD and length == _PAGES.size + (8 + PAGE_SIZE) * n):
            raise MigrationError(f"a DATA record's count ({n}) does not match its length "
                                 f"({length})")
        raw = self._read(8 * n, "a DATA record")
        idx = self._indices(b"DATA", slot, np.frombuffer(raw, dtype="<u8").astype(np.uint64))
        memory = into.get(slot)
        if memory is not None:
            memory = memory.cast("B")
        if memory is None or memory.readonly or \
                len(memory) < self._slot_pages[slot] * PAGE_SIZE:
            raise MigrationError(f"no writable memory of slot {slot}'s size was given")
        h = xxhash.xxh3_64()
        h.update(header)
        h.update(head)
        h.update(raw)
        # Contiguous runs of pages: one receive each, checked above to lie within the slot.
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, cuts):
            first, count = int(run[0]), len(run)
            view = memory[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            self._read_into(view, "a DATA record")
            h.update(view)
        (got,) = _HASH.unpack(self._read(_HASH.size, "a record checksum"))
        if got != h.intdigest():
            raise MigrationError("record b'DATA': checksum mismatch (corrupted stream)")
        return Record(b"DATA", bytes(head) + bytes(raw), stored=True)

    def _indices(self, tag: bytes, slot: int, idx: npt.NDArray[np.uint64]
                 ) -> npt.NDArray[np.uint64]:
        """``idx``, checked: ``slot`` exists, and the indices increase strictly within it."""
        size = self._slot_pages.get(slot)
        if size is None:
            raise MigrationError(f"a {tag.decode()} record names slot {slot}, which the "
                                 "stream's machine does not have")
        n = len(idx)
        if int(idx[-1]) >= size or (n > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise MigrationError(f"a {tag.decode()} record names pages outside slot {slot} "
                                 f"({size} pages) or out of order")
        return idx

    def config(self, rec: Record) -> dict[str, Any]:
        """The ``CONF`` record's guest metadata, after checking its layout (kept in
        :attr:`layout`)."""
        try:
            obj = json.loads(rec.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise MigrationError(f"the CONF record is not valid JSON ({e})") from None
        if not isinstance(obj, dict) or set(obj) != {"layout", "guest"} or \
                not isinstance(obj["guest"], dict):
            raise MigrationError("the CONF record has the wrong fields")
        try:
            self.layout = MachineLayout.from_json(obj["layout"], "the stream's CONF record")
        except SnapshotError as e:
            raise MigrationError(e.message) from None
        self._slot_pages = {s.slot: s.num_pages for s in self.layout.slots}
        guest: dict[str, Any] = obj["guest"]
        return guest

    def pages(self, rec: Record) -> PageRecord:
        """A ZERO, DATA or ZDAT record, checked against the layout: the slot exists, the count
        matches the length (for ZDAT: the frame decompresses to exactly that many pages), the
        indices increase strictly and lie within the slot."""
        p = rec.payload
        if len(p) < _PAGES.size:
            raise MigrationError(f"a {rec.tag.decode()} record is too short")
        slot, n = _PAGES.unpack_from(p)
        per = 8 + (PAGE_SIZE if rec.tag == b"DATA" and not rec.stored else 0)
        if rec.tag == b"ZDAT":
            ok = 1 <= n <= MAX_PAGES_PER_RECORD and len(p) > _PAGES.size + 8 * n
        else:
            ok = 1 <= n <= MAX_PAGES_PER_RECORD and len(p) == _PAGES.size + per * n
        if not ok:
            raise MigrationError(f"a {rec.tag.decode()} record's count ({n}) does not match "
                                 f"its length ({len(p)})")
        idx = self._indices(rec.tag, slot, np.frombuffer(p, dtype="<u8", count=n,
                                                         offset=_PAGES.size).astype(np.uint64))
        data = None
        if rec.tag == b"DATA" and not rec.stored:
            data = np.frombuffer(p, dtype=np.uint8, offset=_PAGES.size + 8 * n)
        elif rec.tag == b"ZDAT":
            data = self._decompress(memoryview(p)[_PAGES.size + 8 * n:], n * PAGE_SIZE)
        return PageRecord(slot, idx, data)

    def _decompress(self, frame: memoryview, size: int) -> npt.NDArray[np.uint8]:
        """Exactly ``size`` bytes from one zstd frame (never more: the output is bounded)."""
        zstandard = _zstd()
        if self._zd is None:
            self._zd = zstandard.ZstdDecompressor()
        try:
            # The frame must say its size, and say the record's: the decoder then stops at
            # that (a frame that decodes past its stated size is corrupt to it), so a small
            # frame cannot blow up into gigabytes.  One frame, and nothing after it.
            data = bytes(frame)
            if zstandard.get_frame_parameters(data).content_size != size:
                raise MigrationError(f"a ZDAT record's frame does not hold its "
                                     f"{size // PAGE_SIZE} pages")
            obj = self._zd.decompressobj()
            out = obj.decompress(data)
            ok = obj.eof and not obj.unused_data and len(out) == size
        except zstandard.ZstdError as e:
            raise MigrationError(f"a ZDAT record does not decompress ({e})") from None
        if not ok:
            raise MigrationError(f"a ZDAT record does not decompress to its {size // PAGE_SIZE} "
                                 "pages")
        return np.frombuffer(out, dtype=np.uint8)

    @staticmethod
    def end_pass(rec: Record) -> tuple[int, int, int]:
        """A ``PASS`` record: (number, pages, bytes)."""
        if len(rec.payload) != _PASS.size:
            raise MigrationError("a PASS record has the wrong length")
        number, pages, nbytes = _PASS.unpack(rec.payload)
        return int(number), int(pages), int(nbytes)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected stream sockets (for a migration between two threads)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
