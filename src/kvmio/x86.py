"""x86_64 register state as plain Python values (converted to and from the kernel's structs)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from kvmio._abi import ffi, from_bytes
from kvmio._check import u64
from kvmio.errors import KvmInvalidArgumentError

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")

# Control-register and EFER bits used by the mode helpers.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11


@dataclass(slots=True)
class Regs:
    """General-purpose registers (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 2

    @classmethod
    def from_c(cls, c: Any) -> Regs:
        """From a ``struct kvm_regs``."""
        return cls(**{n: int(getattr(c, n)) for n in REG_NAMES})

    @classmethod
    def from_bytes(cls, raw: bytes) -> Regs:
        """From a raw ``struct kvm_regs`` (as a vCPU state holds it)."""
        return cls.from_c(from_bytes("struct kvm_regs", raw))

    def validate(self) -> None:
        """Raise :class:`KvmInvalidArgumentError` naming the first register that is not a
        u64."""
        for n in REG_NAMES:
            u64(n, getattr(self, n))

    def to_c(self) -> Any:
        """A new ``struct kvm_regs *``."""
        self.validate()
        c = ffi.new("struct kvm_regs *")
        for n in REG_NAMES:
            setattr(c, n, getattr(self, n))
        return c


@dataclass(slots=True)
class Segment:
    """A segment register's visible and hidden parts (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741  (the kernel's name)
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def _into(self, c: Any) -> None:
        for f in fields(self):
            setattr(c, f.name, getattr(self, f.name))

    @classmethod
    def _from(cls, c: Any) -> Segment:
        return cls(**{f.name: int(getattr(c, f.name)) for f in fields(cls)})


@dataclass(slots=True)
class DTable:
    """A descriptor-table register (GDTR/IDTR)."""

    base: int = 0
    limit: int = 0xFFFF


_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CRS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass(slots=True)
class Sregs:
    """Special registers (``struct kvm_sregs``): segments, descriptor tables, control regs."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = (0, 0, 0, 0)

    @classmethod
    def from_c(cls, c: Any) -> Sregs:
        """From a ``struct kvm_sregs``."""
        kw: dict[str, Any] = {s: Segment._from(getattr(c, s)) for s in _SEGS}
        kw["gdt"] = DTable(int(c.gdt.base), int(c.gdt.limit))
        kw["idt"] = DTable(int(c.idt.base), int(c.idt.limit))
        kw.update({r: int(getattr(c, r)) for r in _CRS})
        kw["interrupt_bitmap"] = tuple(int(x) for x in c.interrupt_bitmap)
        return cls(**kw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Sregs:
        """From a raw ``struct kvm_sregs`` (as a vCPU state holds it)."""
        return cls.from_c(from_bytes("struct kvm_sregs", raw))

    def to_c(self) -> Any:
        """A new ``struct kvm_sregs *``.  A field of the wrong type or range raises
        :class:`KvmInvalidArgumentError` naming it."""
        c = ffi.new("struct kvm_sregs *")
        field = "sregs"
        try:
            for s in _SEGS:
                field = s
                getattr(self, s)._into(getattr(c, s))
            for t in ("gdt", "idt"):
                field = t
                d = getattr(self, t)
                getattr(c, t).base, getattr(c, t).limit = d.base, d.limit
            for r in _CRS:
                field = r
                setattr(c, r, u64(r, getattr(self, r)))
            field = "interrupt_bitmap"
            if len(self.interrupt_bitmap) > len(c.interrupt_bitmap):
                raise KvmInvalidArgumentError("interrupt_bitmap has too many words")
            for i, v in enumerate(self.interrupt_bitmap):
                c.interrupt_bitmap[i] = u64("interrupt_bitmap word", v)
        except (TypeError, OverflowError, AttributeError) as e:
            raise KvmInvalidArgumentError(f"sregs.{field} is invalid: {e}") from None
        return c

    def copy(self) -> Sregs:
        """A deep copy."""
        return replace(self, **{s: replace(getattr(self, s)) for s in _SEGS},
                       gdt=replace(self.gdt), idt=replace(self.idt))


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def cpuid_entries(buf: Any) -> list[CpuidEntry]:
    """Decode a filled ``struct kvm_cpuid2``."""
    out = []
    for i in range(buf.nent):
        e = buf.entries[i]
        out.append(CpuidEntry(int(e.function), int(e.index), int(e.flags), int(e.eax),
                              int(e.ebx), int(e.ecx), int(e.edx)))
    return out
