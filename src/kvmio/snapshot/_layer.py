"""One snapshot layer on disk: its manifest, index and state read, every field checked.

The format is described in :mod:`kvmio.snapshot.files`; this module is its codec.  Nothing
read here reaches guest memory before it has passed the checks of :func:`read_layer`: the
manifest's own checksum and schema, the index's checksum (kept in the manifest) and every
run's bounds, order and file offset, the state's checksum and decoding, and the memory
file's size.  Memory checksums (one per chunk) are checked by whoever reads the memory
(:mod:`kvmio.snapshot.files`), through :func:`chunk_hashes`.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import xxhash

from kvmio._abi import ARCH, PAGE_SIZE
from kvmio.errors import SnapshotError
from kvmio.snapshot.state import MachineState

__all__ = [
    "CHUNK_BYTES", "FORMAT_VERSION", "HASH_NAME", "INDEX", "MANIFEST", "MEMORY", "STATE",
    "BaseRef", "FileRef", "Layer", "MachineLayout", "SlotLayout", "SnapshotInfo",
    "encode_index", "encode_manifest", "read_layer", "slot_chunk_hashes",
]

#: The format version this kvmio writes and reads (the manifest's first line).
FORMAT_VERSION = 1
#: File names inside a snapshot directory.
MANIFEST, STATE, MEMORY, INDEX = "manifest", "state", "memory", "index"
#: The memory checksum: XXH3, 64 bits (see the format description for the measurement).
HASH_NAME = "xxh3-64"
#: Bytes of memory data per checksum (a chunk never spans a hole of an image).
CHUNK_BYTES = 1 << 20
#: The chunk sizes a reader accepts (powers of two).
_CHUNK_RANGE = (PAGE_SIZE, 1 << 26)
#: Limits on what a reader takes into memory before checking it.
MAX_MANIFEST = 16 << 20
MAX_STATE = 256 << 20
MAX_INDEX = 1 << 32

_MAGIC_LINE = re.compile(rb"kvmio-snapshot (\d{1,9}) xxh3=([0-9a-f]{16}) bytes=(\d{1,12})\n")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX32 = re.compile(r"[0-9a-f]{32}")

_INDEX_MAGIC = b"KVMIOIX\x00"
_INDEX_HEADER = struct.Struct("<8sHBBIIIQ")  # magic, version, layout, 0, runs, chunks, chunk, 0
#: A run of stored pages: slot, flags (0), first page in the slot, pages, offset in the file.
RUN = np.dtype([("slot", "<u4"), ("flags", "<u4"), ("first", "<u8"), ("pages", "<u8"),
                ("offset", "<u8")])
#: A checksummed chunk of the memory file: offset, length, XXH3-64 of those bytes.
CHUNK = np.dtype([("offset", "<u8"), ("length", "<u8"), ("hash", "<u8")])
_LAYOUTS = {"image": 0, "packed": 1}

Kind = Literal["full", "diff"]
MemoryLayout = Literal["image", "packed"]


def xxh3(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 of ``data``."""
    return xxhash.xxh3_64_intdigest(data)


# -- what a manifest says ----------------------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """One memory slot of the machine: id, guest physical address, size in bytes, flags."""

    slot: int
    guest_phys_addr: int
    size: int
    log_dirty: bool
    readonly: bool

    @property
    def num_pages(self) -> int:
        """Pages in the slot."""
        return self.size // PAGE_SIZE

    def to_json(self) -> dict[str, Any]:
        """The slot as the manifest writes it."""
        return {"slot": self.slot, "gpa": self.guest_phys_addr, "size": self.size,
                "log_dirty": self.log_dirty, "readonly": self.readonly}


@dataclass(frozen=True)
class MachineLayout:
    """What a VM restored from the snapshot is built with: its memory slots (in slot order),
    vCPU ids, in-kernel irqchip and PIT, dirty ring (entries per vCPU, or ``None``), and the
    TSS and identity-map addresses it was given (``None`` if none was)."""

    arch: str
    page_size: int
    slots: tuple[SlotLayout, ...]
    vcpus: tuple[int, ...]
    irqchip: bool
    pit: bool
    dirty_ring: int | None
    tss_address: int | None
    identity_map_address: int | None

    def slot(self, slot: int) -> SlotLayout:
        """The layout of slot ``slot`` (``KeyError`` if it has none)."""
        for s in self.slots:
            if s.slot == slot:
                return s
        raise KeyError(slot)

    def image_offsets(self) -> dict[int, int]:
        """Where each slot starts in an image memory file: the slots one after the other, in
        slot order."""
        out, at = {}, 0
        for s in self.slots:
            out[s.slot] = at
            at += s.size
        return out

    @property
    def image_bytes(self) -> int:
        """The size of an image memory file: every slot's size."""
        return sum(s.size for s in self.slots)

    @property
    def memory_bytes(self) -> int:
        """Guest memory in bytes (every slot)."""
        return self.image_bytes

    def describe(self) -> str:
        """One line: slots, vCPUs, irqchip, PIT, ring."""
        slots = ", ".join(f"slot {s.slot} {s.guest_phys_addr:#x}+{s.size >> 20} MiB"
                          + (" logged" if s.log_dirty else "") + (" ro" if s.readonly else "")
                          for s in self.slots)
        extra = [f"vCPUs {list(self.vcpus)}"]
        if self.irqchip:
            extra.append("irqchip")
        if self.pit:
            extra.append("PIT")
        if self.dirty_ring:
            extra.append(f"dirty ring {self.dirty_ring}")
        return f"{slots}; {', '.join(extra)}"

    @classmethod
    def from_json(cls, value: object, where: str = "machine layout") -> MachineLayout:
        """A layout from what :meth:`to_json` wrote, every field checked (slots page aligned,
        in order and not overlapping, this host's architecture and page size); anything
        else raises :class:`SnapshotError` naming the field and ``where``."""
        return _machine(_Schema(where), value)

    def to_json(self) -> dict[str, Any]:
        """The layout as the manifest writes it."""
        return {"arch": self.arch, "page_size": self.page_size,
                "slots": [s.to_json() for s in self.slots], "vcpus": list(self.vcpus),
                "irqchip": self.irqchip, "pit": self.pit, "dirty_ring": self.dirty_ring,
                "tss_address": self.tss_address,
                "identity_map_address": self.identity_map_address}


@dataclass(frozen=True)
class BaseRef:
    """The layer a diff applies to: its id, the checksum of its manifest (which covers every
    checksum below it), and where it was when the diff was written (relative to the diff's
    directory, or absolute), as a hint for finding it."""

    id: str
    manifest_hash: str
    path: str | None

    def to_json(self) -> dict[str, Any]:
        """The reference as the manifest writes it."""
        return {"id": self.id, "manifest_xxh3": self.manifest_hash, "path": self.path}


@dataclass(frozen=True)
class FileRef:
    """A file of the snapshot: its size and (except for memory, checked chunk by chunk) its
    XXH3-64 as 16 hex digits."""

    bytes: int
    hash: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The reference as the manifest writes it."""
        return {"bytes": self.bytes} if self.hash is None else {"bytes": self.bytes,
                                                                 "xxh3": self.hash}


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot layer's manifest says (from :func:`kvmio.snapshot.files.inspect_snapshot`
    and every save).

    ``kind`` is ``"full"`` (every page of every slot) or ``"diff"`` (the pages changed since
    ``base``, plus any slot in ``whole_slots`` entire); ``memory_layout`` is ``"image"``
    (pages at their place in a sparse file, mappable) or ``"packed"`` (pages one after the
    other).  ``stored_pages`` are the pages the memory file holds; ``checked`` says how far
    the checksums were checked: ``"metadata"`` (manifest, index and state) or ``"all"``
    (the memory chunks too).
    """

    path: str
    version: int
    id: str
    kind: Kind
    created: str
    base: BaseRef | None
    machine: MachineLayout
    memory_layout: MemoryLayout
    whole_slots: tuple[int, ...]
    stored_pages: int
    chunk_bytes: int
    memory: FileRef
    index: FileRef
    state: FileRef
    runs: int
    chunks: int
    guest: Mapping[str, Any]
    manifest_hash: str
    checked: Literal["metadata", "all"] = "metadata"

    @property
    def stored_bytes(self) -> int:
        """Bytes of memory data the layer holds."""
        return self.stored_pages * PAGE_SIZE

    def ref(self, relative_to: str | None = None) -> BaseRef:
        """A reference to this layer for a diff on it (its path relative to the diff's
        directory ``relative_to`` where given)."""
        path = os.path.abspath(self.path)
        if relative_to is not None:
            path = os.path.relpath(path, os.path.abspath(relative_to))
        return BaseRef(self.id, self.manifest_hash, path)

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-ready values (``kvmio snapshot inspect --json``)."""
        return {"path": self.path, "version": self.version, "id": self.id, "kind": self.kind,
                "created": self.created,
                "base": None if self.base is None else self.base.to_json(),
                "machine": self.machine.to_json(), "memory_layout": self.memory_layout,
                "whole_slots": list(self.whole_slots), "stored_pages": self.stored_pages,
                "chunk_bytes": self.chunk_bytes, "memory": self.memory.to_json(),
                "index": self.index.to_json(), "state": self.state.to_json(),
                "runs": self.runs, "chunks": self.chunks, "guest": _thaw(self.guest),
                "manifest_xxh3": self.manifest_hash, "checked": self.checked}


def _thaw(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_thaw(x) for x in v]
    return v


def _freeze(v: Any) -> Any:
    if isinstance(v, Mapping):
        return MappingProxyType({k: _freeze(x) for k, x in v.items()})
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


def guest_json(guest: Mapping[str, Any] | None) -> dict[str, Any]:
    """``guest`` checked to be JSON (str keys; str, int, float, bool, None, lists, dicts) and
    returned as a plain dict; raises :class:`SnapshotError` otherwise."""
    if guest is None:
        return {}
    if not isinstance(guest, Mapping):
        raise SnapshotError(f"guest metadata must be a mapping, not {type(guest).__name__}")
    try:
        text = json.dumps(_thaw(guest), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"guest metadata must be JSON: {e}") from None
    if len(text) > MAX_MANIFEST // 2:
        raise SnapshotError("guest metadata is too large")
    out: dict[str, Any] = json.loads(text)
    return out


# -- writing -------------------------------------------------------------------------------------


def new_id() -> str:
    """A random 128-bit layer id, as 32 hex digits."""
    return os.urandom(16).hex()


def now_utc() -> str:
    """The time now, as ISO 8601 UTC to the second."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest_body(*, id: str, created: str, kind: Kind, base: BaseRef | None,
                  machine: MachineLayout, memory_layout: MemoryLayout,
                  whole_slots: Iterable[int], stored_pages: int, memory: FileRef,
                  index: FileRef, state: FileRef, runs: int, chunks: int,
                  guest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's JSON object (see the format description)."""
    return {
        "format": "kvmio-snapshot", "version": FORMAT_VERSION, "id": id, "created": created,
        "kind": kind, "base": None if base is None else base.to_json(),
        "machine": machine.to_json(),
        "memory": {"layout": memory_layout, "whole_slots": sorted(whole_slots),
                   "stored_pages": stored_pages, "checksum": HASH_NAME,
                   "chunk_bytes": CHUNK_BYTES, "runs": runs, "chunks": chunks,
                   **memory.to_json()},
        "index": index.to_json(), "state": state.to_json(), "guest": dict(guest),
    }


def encode_manifest(body: Mapping[str, Any]) -> tuple[bytes, str]:
    """The manifest file's bytes (its first line, then the JSON) and its checksum."""
    text = (json.dumps(body, indent=1, allow_nan=False) + "\n").encode()
    h = f"{xxh3(text):016x}"
    return f"kvmio-snapshot {FORMAT_VERSION} xxh3={h} bytes={len(text)}\n".encode() + text, h


def encode_index(layout: MemoryLayout, runs: npt.NDArray[np.void],
                 chunks: npt.NDArray[np.void]) -> bytes:
    """The index file's bytes: a header, the runs, the chunks."""
    head = _INDEX_HEADER.pack(_INDEX_MAGIC, FORMAT_VERSION, _LAYOUTS[layout], 0, len(runs),
                              len(chunks), CHUNK_BYTES, 0)
    return head + runs.astype(RUN, copy=False).tobytes() + chunks.astype(CHUNK,
                                                                          copy=False).tobytes()


def canonical_chunks(offsets: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint64],
                     slots: npt.NDArray[np.uint32], chunk_bytes: int = CHUNK_BYTES
                     ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The chunks of the runs' file ranges ``(offsets, lengths)`` of slots ``slots`` (sorted
    by offset, not overlapping): ranges of one slot that touch are joined into extents, and
    each extent is cut every ``chunk_bytes`` from its start, so that a chunk belongs to one
    slot.  Returns the chunks' offsets and lengths."""
    if len(offsets) == 0:
        z = np.zeros(0, dtype=np.uint64)
        return z, z.copy()
    ends = offsets + lengths
    joined = np.flatnonzero((offsets[1:] != ends[:-1]) | (slots[1:] != slots[:-1])) + 1
    starts = np.concatenate(([0], joined))
    stops = np.concatenate((joined, [len(offsets)]))
    ext_off = offsets[starts]
    ext_len = ends[stops - 1] - ext_off
    cb = np.uint64(chunk_bytes)
    n = ((ext_len + cb - np.uint64(1)) // cb).astype(np.int64)
    first = np.cumsum(n) - n
    k = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n)
    offs = np.repeat(ext_off, n) + k.astype(np.uint64) * cb
    lens = np.minimum(np.repeat(ext_off + ext_len, n) - offs, cb)
    return offs, lens


#: One page as one numpy item (gathers copy whole pages per index).
PAGE_ITEM = np.dtype((np.void, PAGE_SIZE))


def slot_chunk_hashes(view: memoryview, runs: npt.NDArray[np.void],
                      chunk_offsets: npt.NDArray[np.uint64],
                      chunk_lengths: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The XXH3-64 of the chunks of one slot, whose pages are in ``view`` (the slot's memory)
    where ``runs`` (the slot's runs) say: a chunk whose pages lie one after the other in
    memory (an image's, a run's) is hashed in place; a chunk of scattered pages (a diff's) is
    gathered into a buffer first (one copy, in compiled code) and hashed there."""
    out = np.zeros(len(chunk_offsets), dtype=np.uint64)
    if not len(chunk_offsets):
        return out
    page = np.uint64(PAGE_SIZE)
    order = np.argsort(runs["offset"], kind="stable")
    r_off, r_first, r_n = runs["offset"][order], runs["first"][order], runs["pages"][order]
    n = r_n.astype(np.int64)
    starts = np.cumsum(n) - n
    step = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts, n)
    # every stored page, in file order: its file page and its page in the slot
    file_pages = np.repeat(r_off // page, n) + step.astype(np.uint64)
    slot_pages = (np.repeat(r_first, n) + step.astype(np.uint64)).astype(np.intp)
    at = np.searchsorted(file_pages, chunk_offsets // page).tolist()
    counts = (chunk_lengths // page).tolist()
    pages = np.frombuffer(view, dtype=PAGE_ITEM)
    scratch: npt.NDArray[np.void] | None = None
    for i, (k, c) in enumerate(zip(at, counts, strict=True)):
        first, last = int(slot_pages[k]), int(slot_pages[k + c - 1])
        if last - first == c - 1:  # one stretch of memory
            out[i] = xxh3(view[first * PAGE_SIZE:(last + 1) * PAGE_SIZE])
            continue
        if scratch is None or len(scratch) < c:
            scratch = np.empty(max(c, 256), dtype=PAGE_ITEM)
        np.take(pages, slot_pages[k:k + c], out=scratch[:c])
        out[i] = xxh3(scratch[:c].data)
    del pages
    return out


# -- reading -------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One layer read and checked by :func:`read_layer`: what its manifest says, its runs
    and chunks (numpy arrays of :data:`RUN` and :data:`CHUNK`), the slot of each chunk, and
    its machine state."""

    info: SnapshotInfo
    runs: npt.NDArray[np.void]
    chunks: npt.NDArray[np.void]
    chunk_slots: npt.NDArray[np.uint32]
    state: MachineState

    @property
    def directory(self) -> str:
        """The layer's directory."""
        return self.info.path

    @property
    def memory_path(self) -> str:
        """Its memory file."""
        return os.path.join(self.info.path, MEMORY)

    def slot_runs(self, slot: int) -> npt.NDArray[np.void]:
        """The runs of one slot (a view, in page order)."""
        lo, hi = np.searchsorted(self.runs["slot"], [slot, slot + 1])
        out: npt.NDArray[np.void] = self.runs[lo:hi]
        return out

    def slot_chunks(self, slot: int) -> npt.NDArray[np.void]:
        """The chunks of one slot (in file order)."""
        out: npt.NDArray[np.void] = self.chunks[self.chunk_slots == slot]
        return out


def snapshot_dir(path: str | os.PathLike[str]) -> str:
    """The directory of a snapshot given as its directory or its manifest file."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise SnapshotError(f"a snapshot path must be a path, not {path!r}") from None
    if not isinstance(p, str):
        p = os.fsdecode(p)
    if os.path.basename(p) == MANIFEST and not os.path.isdir(p):
        p = os.path.dirname(p) or "."
    return p


def _read_file(directory: str, name: str, limit: int, what: str) -> bytes:
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if name == MANIFEST and not os.path.isdir(directory):
            raise SnapshotError(f"no snapshot at {directory!r}: no such directory") from None
        raise SnapshotError(f"{directory!r} has no {what} file ({name})") from None
    except OSError as e:
        raise SnapshotError(f"cannot open {path!r}: {e.strerror}", errno=e.errno) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{path!r} is not a regular file")
        if st.st_size > limit:
            raise SnapshotError(f"{path!r} is {st.st_size} bytes, more than a {what} can be "
                                f"({limit})")
        chunks = []
        left = st.st_size + 1  # one more: a file that grew is seen
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    except OSError as e:
        raise SnapshotError(f"cannot read {path!r}: {e.strerror}", errno=e.errno) from None
    finally:
        os.close(fd)


class _Schema:
    """Checks of decoded JSON: each failure is a :class:`SnapshotError` naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, why: str) -> SnapshotError:
        return SnapshotError(f"{self.where}: {field} {why}")

    def obj(self, v: object, field: str, keys: Iterable[str]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(field, f"must be an object, not {type(v).__name__}")
        want = set(keys)
        if set(v) != want:
            extra, missing = sorted(set(v) - want), sorted(want - set(v))
            raise self.fail(field, f"has the wrong fields (unknown {extra}, missing {missing})")
        return v

    def integer(self, v: object, field: str, lo: int = 0, hi: int = 1 << 64) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
            raise self.fail(field, f"must be an integer in [{lo}, {hi}), not {v!r}")
        return v

    def opt_integer(self, v: object, field: str, lo: int = 0, hi: int = 1 << 64) -> int | None:
        return None if v is None else self.integer(v, field, lo, hi)

    def boolean(self, v: object, field: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(field, f"must be true or false, not {v!r}")
        return v

    def string(self, v: object, field: str, pattern: re.Pattern[str] | None = None,
            choices: Iterable[str] | None = None) -> str:
        if not isinstance(v, str) or len(v) > 4096:
            raise self.fail(field, f"must be a string, not {type(v).__name__}")
        if pattern is not None and not pattern.fullmatch(v):
            raise self.fail(field, f"is malformed: {v!r}")
        if choices is not None and v not in choices:
            raise self.fail(field, f"must be one of {sorted(choices)}, not {v!r}")
        return v

    def items(self, v: object, field: str, limit: int = 1 << 16) -> list[Any]:
        if not isinstance(v, list) or len(v) > limit:
            raise self.fail(field, "must be a list" + (f" of at most {limit}"
                                                       if isinstance(v, list) else ""))
        return v


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SnapshotError(f"the manifest names {k!r} twice")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise SnapshotError(f"the manifest holds {name}, which is not JSON")


def decode_manifest(raw: bytes, directory: str) -> tuple[dict[str, Any], str, int]:
    """The manifest's JSON object, checksum and version, after checking its first line and
    checksum.  Raises :class:`SnapshotError` for anything else."""
    where = f"manifest of {directory!r}"
    nl = raw.find(b"\n", 0, 128)
    if not raw.startswith(b"kvmio-snapshot ") or nl < 0:
        raise SnapshotError(f"{where}: not a kvmio snapshot manifest (bad first line)")
    m = _MAGIC_LINE.fullmatch(raw[:nl + 1])
    if m is None:
        raise SnapshotError(f"{where}: its first line is malformed: {raw[:nl]!r}")
    version = int(m.group(1))
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{where}: format version {version}; this kvmio reads version "
                            f"{FORMAT_VERSION}")
    body = raw[nl + 1:]
    if len(body) != int(m.group(3)):
        raise SnapshotError(f"{where}: {len(body)} bytes of JSON, the first line says "
                            f"{int(m.group(3))} (truncated or extended)")
    h = f"{xxh3(body):016x}"
    if h != m.group(2).decode():
        raise SnapshotError(f"{where}: checksum mismatch (corrupted)")
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SnapshotError(f"{where}: not valid JSON ({e})") from None
    return obj, h, version


def _machine(s: _Schema, v: object) -> MachineLayout:
    m = s.obj(v, "machine", ("arch", "page_size", "slots", "vcpus", "irqchip", "pit",
                             "dirty_ring", "tss_address", "identity_map_address"))
    arch = s.string(m["arch"], "machine.arch")
    if arch != ARCH:
        raise s.fail("machine.arch", f"is {arch!r}; this host is {ARCH!r}")
    page = s.integer(m["page_size"], "machine.page_size")
    if page != PAGE_SIZE:
        raise s.fail("machine.page_size", f"is {page}; this host's pages are {PAGE_SIZE}")
    slots = []
    for i, raw in enumerate(s.items(m["slots"], "machine.slots", 1 << 15)):
        f = f"machine.slots[{i}]"
        d = s.obj(raw, f, ("slot", "gpa", "size", "log_dirty", "readonly"))
        slot = s.integer(d["slot"], f + ".slot", 0, 1 << 16)
        gpa = s.integer(d["gpa"], f + ".gpa", 0, 1 << 52)
        size = s.integer(d["size"], f + ".size", PAGE_SIZE, (1 << 52) + 1)
        if gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size > 1 << 52:
            raise s.fail(f, "is not page aligned or leaves the 52-bit physical space")
        slots.append(SlotLayout(slot, gpa, size, s.boolean(d["log_dirty"], f + ".log_dirty"),
                                s.boolean(d["readonly"], f + ".readonly")))
    if not slots:
        raise s.fail("machine.slots", "is empty")
    if [x.slot for x in slots] != sorted({x.slot for x in slots}):
        raise s.fail("machine.slots", "are not in increasing slot order, or repeat one")
    by_gpa = sorted(slots, key=lambda x: x.guest_phys_addr)
    for a, b in itertools.pairwise(by_gpa):
        if a.guest_phys_addr + a.size > b.guest_phys_addr:
            raise s.fail("machine.slots", f"overlap (slots {a.slot} and {b.slot})")
    vcpus = [s.integer(x, "machine.vcpus[]", 0, 1 << 32)
             for x in s.items(m["vcpus"], "machine.vcpus", 4096)]
    if not vcpus or vcpus != sorted(set(vcpus)):
        raise s.fail("machine.vcpus", "must be distinct ids in increasing order")
    ring = s.opt_integer(m["dirty_ring"], "machine.dirty_ring", 1, 1 << 32)
    return MachineLayout(arch, page, tuple(slots), tuple(vcpus),
                         s.boolean(m["irqchip"], "machine.irqchip"),
                         s.boolean(m["pit"], "machine.pit"),
                         ring, s.opt_integer(m["tss_address"], "machine.tss_address", 0, 1 << 32),
                         s.opt_integer(m["identity_map_address"], "machine.identity_map_address"))


def _info(obj: dict[str, Any], manifest_hash: str, version: int, directory: str
          ) -> SnapshotInfo:
    s = _Schema(f"manifest of {directory!r}")
    top = s.obj(obj, "the manifest", ("format", "version", "id", "created", "kind", "base",
                                      "machine", "memory", "index", "state", "guest"))
    if s.string(top["format"], "format") != "kvmio-snapshot":
        raise s.fail("format", "must be 'kvmio-snapshot'")
    if s.integer(top["version"], "version") != version:
        raise s.fail("version", "differs from the first line's")
    kind = s.string(top["kind"], "kind", choices=("full", "diff"))
    base: BaseRef | None = None
    if top["base"] is not None:
        b = s.obj(top["base"], "base", ("id", "manifest_xxh3", "path"))
        path = None if b["path"] is None else s.string(b["path"], "base.path")
        base = BaseRef(s.string(b["id"], "base.id", _HEX32),
                       s.string(b["manifest_xxh3"], "base.manifest_xxh3", _HEX16), path)
    if (kind == "diff") != (base is not None):
        raise s.fail("base", "must be given for a diff, and only for one")
    machine = _machine(s, top["machine"])
    mem = s.obj(top["memory"], "memory", ("layout", "whole_slots", "stored_pages",
                                          "checksum", "chunk_bytes", "runs", "chunks",
                                          "bytes"))
    layout = s.string(mem["layout"], "memory.layout", choices=_LAYOUTS)
    if (layout == "image") != (kind == "full"):
        raise s.fail("memory.layout", "must be 'image' for a full snapshot and 'packed' "
                     "for a diff")
    s.string(mem["checksum"], "memory.checksum", choices=(HASH_NAME,))
    chunk = s.integer(mem["chunk_bytes"], "memory.chunk_bytes", _CHUNK_RANGE[0],
                  _CHUNK_RANGE[1] + 1)
    if chunk & (chunk - 1):
        raise s.fail("memory.chunk_bytes", "must be a power of two")
    slot_ids = [x.slot for x in machine.slots]
    whole = [s.integer(x, "memory.whole_slots[]", 0, 1 << 16)
             for x in s.items(mem["whole_slots"], "memory.whole_slots", 1 << 15)]
    if whole != sorted(set(whole)) or not set(whole) <= set(slot_ids):
        raise s.fail("memory.whole_slots", "must be distinct slots of the machine, in order")
    if kind == "full" and whole != slot_ids:
        raise s.fail("memory.whole_slots", "must be every slot for a full snapshot")
    total_pages = sum(x.num_pages for x in machine.slots)
    stored = s.integer(mem["stored_pages"], "memory.stored_pages", 0, total_pages + 1)
    mem_bytes = s.integer(mem["bytes"], "memory.bytes")
    if layout == "image" and mem_bytes != machine.image_bytes:
        raise s.fail("memory.bytes", f"must be the slots' total size ({machine.image_bytes})")
    if layout == "packed" and mem_bytes != stored * PAGE_SIZE:
        raise s.fail("memory.bytes", "must be the stored pages' size")
    runs = s.integer(mem["runs"], "memory.runs", 0, stored + 1)
    chunks = s.integer(mem["chunks"], "memory.chunks", 0, (mem_bytes // chunk) + runs + 1)

    def file_ref(v: object, field: str) -> FileRef:
        d = s.obj(v, field, ("bytes", "xxh3"))
        return FileRef(s.integer(d["bytes"], field + ".bytes"),
                       s.string(d["xxh3"], field + ".xxh3", _HEX16))

    index = file_ref(top["index"], "index")
    if index.bytes != _INDEX_HEADER.size + runs * RUN.itemsize + chunks * CHUNK.itemsize:
        raise s.fail("index.bytes", "does not match the counts of runs and chunks")
    state = file_ref(top["state"], "state")
    guest = top["guest"]
    if not isinstance(guest, dict):
        raise s.fail("guest", "must be an object")
    created = s.string(top["created"], "created")
    return SnapshotInfo(directory, version, s.string(top["id"], "id", _HEX32), kind,  # type: ignore[arg-type]
                        created, base, machine, layout, tuple(whole), stored, chunk,  # type: ignore[arg-type]
                        FileRef(mem_bytes), index, state, runs, chunks, _freeze(guest),
                        manifest_hash)


def info_of(body: dict[str, Any], manifest_hash: str, directory: str) -> SnapshotInfo:
    """What a manifest just written says (``body`` as :func:`encode_manifest` was given it),
    checked as a read one is."""
    return _info(json.loads(json.dumps(body)), manifest_hash, FORMAT_VERSION, directory)


def read_info(path: str | os.PathLike[str]) -> SnapshotInfo:
    """The checked manifest of the layer at ``path`` (its directory or manifest file)."""
    directory = snapshot_dir(path)
    raw = _read_file(directory, MANIFEST, MAX_MANIFEST + 128, "manifest")
    obj, h, version = decode_manifest(raw, directory)
    return _info(obj, h, version, directory)


def _check_index(info: SnapshotInfo, raw: bytes
                 ) -> tuple[npt.NDArray[np.void], npt.NDArray[np.void], npt.NDArray[np.uint32]]:
    where = f"index of {info.path!r}"
    if len(raw) < _INDEX_HEADER.size:
        raise SnapshotError(f"{where}: truncated header")
    magic, version, layout, zero, n_runs, n_chunks, chunk, zero2 = _INDEX_HEADER.unpack_from(raw)
    if magic != _INDEX_MAGIC or version != info.version or zero or zero2:
        raise SnapshotError(f"{where}: bad header")
    if layout != _LAYOUTS[info.memory_layout] or chunk != info.chunk_bytes:
        raise SnapshotError(f"{where}: its header disagrees with the manifest")
    if (n_runs, n_chunks) != (info.runs, info.chunks) or len(raw) != info.index.bytes:
        raise SnapshotError(f"{where}: its counts disagree with the manifest")
    runs = np.frombuffer(raw, dtype=RUN, count=n_runs, offset=_INDEX_HEADER.size)
    chunks = np.frombuffer(raw, dtype=CHUNK, count=n_chunks,
                           offset=_INDEX_HEADER.size + n_runs * RUN.itemsize)
    m = info.machine
    page = np.uint64(PAGE_SIZE)
    if len(runs):
        slot_ids = np.array([s.slot for s in m.slots], dtype=np.uint32)
        slot_pages = np.array([s.num_pages for s in m.slots], dtype=np.uint64)
        pos = np.searchsorted(slot_ids, runs["slot"])
        known = pos < len(slot_ids)
        known[known] = slot_ids[pos[known]] == runs["slot"][known]
        if not known.all():
            raise SnapshotError(f"{where}: a run names a slot the machine does not have")
        if (runs["flags"] != 0).any():
            raise SnapshotError(f"{where}: a run has unknown flags")
        first, pages = runs["first"], runs["pages"]
        limit = slot_pages[pos]
        if (pages == 0).any() or (first >= limit).any() or (pages > limit - first).any():
            raise SnapshotError(f"{where}: a run lies outside its slot")
        same = runs["slot"][1:] == runs["slot"][:-1]
        if ((runs["slot"][1:] < runs["slot"][:-1])
                | (same & (first[1:] < first[:-1] + pages[:-1]))).any():
            raise SnapshotError(f"{where}: runs are out of order or overlap")
        if int(pages.sum()) != info.stored_pages:
            raise SnapshotError(f"{where}: the runs hold {int(pages.sum())} pages, the "
                                f"manifest says {info.stored_pages}")
        offsets = runs["offset"]
        if (offsets % page).any():
            raise SnapshotError(f"{where}: a run's file offset is not page aligned")
        if info.memory_layout == "image":
            starts = np.array([o for o in m.image_offsets().values()], dtype=np.uint64)
            if (offsets != starts[pos] + first * page).any():
                raise SnapshotError(f"{where}: a run of an image is not at its place")
            order = np.arange(len(runs))
        else:
            order = np.argsort(offsets, kind="stable")
            so, sp = offsets[order], pages[order]
            expect = np.concatenate(([0], np.cumsum(sp)[:-1])).astype(np.uint64) * page
            if (so != expect).any():
                raise SnapshotError(f"{where}: the runs do not tile the packed memory file")
    elif info.stored_pages:
        raise SnapshotError(f"{where}: no runs, but the manifest says {info.stored_pages} "
                            "pages")
    chunk_slots = np.zeros(0, dtype=np.uint32)
    if len(runs):
        o = runs["offset"][order]
        offs, lens = canonical_chunks(o, runs["pages"][order] * page, runs["slot"][order],
                                      info.chunk_bytes)
        # the slot of each chunk: that of the run holding its first byte
        chunk_slots = runs["slot"][order][np.searchsorted(o, offs, side="right") - 1]
    else:
        offs = lens = np.zeros(0, dtype=np.uint64)
    if (len(offs) != len(chunks) or (chunks["offset"] != offs).any()
            or (chunks["length"] != lens).any()):
        raise SnapshotError(f"{where}: the checksummed chunks do not cover the runs exactly")
    return runs, chunks, chunk_slots


def read_layer(path: str | os.PathLike[str]) -> Layer:
    """Read and check one layer (see the module): manifest, index, state, memory size.
    Raises :class:`SnapshotError` for anything it does not accept."""
    info = read_info(path)
    d = info.path
    raw_index = _read_file(d, INDEX, MAX_INDEX, "index")
    if len(raw_index) != info.index.bytes or f"{xxh3(raw_index):016x}" != info.index.hash:
        raise SnapshotError(f"index of {d!r}: size or checksum mismatch (corrupted, truncated "
                            "or from another snapshot)")
    runs, chunks, chunk_slots = _check_index(info, raw_index)
    raw_state = _read_file(d, STATE, MAX_STATE, "state")
    if len(raw_state) != info.state.bytes or f"{xxh3(raw_state):016x}" != info.state.hash:
        raise SnapshotError(f"state of {d!r}: size or checksum mismatch (corrupted, truncated "
                            "or from another snapshot)")
    try:
        state = MachineState.from_bytes(raw_state)
    except SnapshotError as e:
        raise SnapshotError(f"state of {d!r}: {e}") from None
    m = info.machine
    if tuple(state.vcpus) != m.vcpus:
        raise SnapshotError(f"state of {d!r}: vCPUs {list(state.vcpus)}, the manifest says "
                            f"{list(m.vcpus)}")
    if (state.vm.has_irqchip, state.vm.has_pit) != (m.irqchip, m.pit):
        raise SnapshotError(f"state of {d!r}: its irqchip and PIT disagree with the manifest")
    mem_path = os.path.join(d, MEMORY)
    try:
        st = os.stat(mem_path)
    except FileNotFoundError:
        raise SnapshotError(f"{d!r} has no memory file ({MEMORY})") from None
    except OSError as e:
        raise SnapshotError(f"cannot stat {mem_path!r}: {e.strerror}", errno=e.errno) from None
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{mem_path!r} is not a regular file")
    if st.st_size != info.memory.bytes:
        raise SnapshotError(f"memory of {d!r}: {st.st_size} bytes, the manifest says "
                            f"{info.memory.bytes} (truncated or extended)")
    return Layer(info, runs, chunks, chunk_slots, state)
