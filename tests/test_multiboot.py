"""The Multiboot loader and runner (kvmio.guests.multiboot) and the ``kvmio run`` command.

The test kernels are built here, once per session, with the host's gcc (``-m32``): a C kernel
with an assembly entry point that reports what it was given, and an a.out-kludge kernel in
assembly.  Parsing errors are checked on small ELF files crafted in Python.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmio import Interrupted, Kvm, KvmError, KvmInvalidArgumentError, KvmStateError
from kvmio.cli import main
from kvmio.devices import (
    DebugConsole,
    DebugExit,
    DebugExitPort,
    IoBus,
    Output,
    PowerControl,
    PowerOff,
    ResetRequest,
    Uart16550,
    VgaText,
)
from kvmio.exits import InternalError
from kvmio.guests import multiboot as mb
from kvmio.guests.multiboot import (
    MultibootMachine,
    StopReason,
    parse_header,
    parse_kernel,
    parse_memory_size,
    render_vga_text,
    run_multiboot,
)
from kvmio.units import parse_size
from kvmio.x86 import CR0_PE, CR0_PG

from guests import wait_until

MIB = 1 << 20
COM1 = 0x3F8

# -- the test kernels -----------------------------------------------------------------------

ENTRY_S = r"""
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .bss
    .align 16
    .skip 8192
stack_top:

    .section .text
    .globl _start
_start:
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
1:  cli
    hlt
    jmp 1b
    .section .note.GNU-stack, "", @progbits
"""

KERNEL_C = r"""
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count;
    u32 mods_addr, syms[4], mmap_length, mmap_addr, drives_length;
    u32 drives_addr, config_table, boot_loader_name;
};

struct mmap_entry {
    u32 size;
    u64 addr, len;
    u32 type;
} __attribute__((packed));

static void outb(u16 port, u8 v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static void outw(u16 port, u16 v) {
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}
static u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void dbg(const char *s) { while (*s) outb(0xE9, (u8)*s++); }

static void dbg_rep(const char *s, u32 n) {
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"(0xE9) : "memory");
}

static void dbg_dec(u32 v) {
    char buf[12];
    int i = 11;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    dbg(&buf[i]);
}

static void dbg_hex(u64 v, int digits) {
    char buf[20];
    int i;
    buf[0] = '0';
    buf[1] = 'x';
    for (i = 0; i < digits; i++) {
        u32 d = (u32)(v >> (4 * (digits - 1 - i))) & 0xF;
        buf[2 + i] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    }
    buf[2 + digits] = 0;
    dbg(buf);
}

/* whether w is one of the space-separated words of s */
static int has_word(const char *s, const char *w) {
    while (*s) {
        const char *p = s, *q = w;
        while (*q && *p == *q) { p++; q++; }
        if (!*q && (*p == 0 || *p == ' ')) return 1;
        while (*s && *s != ' ') s++;
        while (*s == ' ') s++;
    }
    return 0;
}

#define COM1 0x3F8

/* the usual polling-driver set-up, with its loopback self-test */
static int serial_init(void) {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1 + 0, 0x03);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xC7);
    outb(COM1 + 4, 0x0B);
    outb(COM1 + 4, 0x1E);
    outb(COM1 + 0, 0xAE);
    if (inb(COM1 + 0) != 0xAE) return 0;
    outb(COM1 + 4, 0x0F);
    return 1;
}

static void serial(const char *s) {
    while (*s) {
        while (!(inb(COM1 + 5) & 0x20)) { }
        outb(COM1, (u8)*s++);
    }
}

static void vga(int row, int col, const char *s, u8 attr) {
    volatile u16 *cell = (volatile u16 *)0xB8000 + row * 80 + col;
    while (*s) *cell++ = (u16)((u8)*s++ | (attr << 8));
}

void kmain(u32 magic, struct mb_info *mbi) {
    const char *cmdline;
    volatile u32 *mmio = (volatile u32 *)0xE0000000;
    u32 n = 0, p;
    if (magic != 0x2BADB002) {
        dbg("bad magic ");
        dbg_hex(magic, 8);
        dbg("\n");
        outb(0xF4, 0x7F);
        return;
    }
    dbg("Hello from multiboot\n");
    cmdline = (mbi->flags & 4) ? (const char *)mbi->cmdline : "";
    dbg("cmdline: ");
    dbg(cmdline);
    dbg("\n");
    if (has_word(cmdline, "spin")) for (;;) { }
    if (has_word(cmdline, "flood")) for (;;) dbg("flood\n");
    if (serial_init()) serial("serial OK\n");
    else dbg("serial faulty\n");
    dbg("flags=");
    dbg_hex(mbi->flags, 8);
    dbg(" mem_lower=");
    dbg_dec(mbi->mem_lower);
    dbg(" mem_upper=");
    dbg_dec(mbi->mem_upper);
    dbg("\n");
    for (p = mbi->mmap_addr; p < mbi->mmap_addr + mbi->mmap_length;
         p += ((struct mmap_entry *)p)->size + 4) {
        struct mmap_entry *e = (struct mmap_entry *)p;
        dbg("mmap ");
        dbg_hex(e->addr, 9);
        dbg(" ");
        dbg_hex(e->len, 9);
        dbg(" ");
        dbg_dec(e->type);
        dbg("\n");
        n++;
    }
    dbg("mmap entries=");
    dbg_dec(n);
    dbg("\nloader: ");
    dbg((const char *)mbi->boot_loader_name);
    dbg("\nprobe e9=");
    dbg_hex(inb(0xE9), 2);
    dbg(" kbc=");
    dbg_hex(inb(0x64), 2);
    dbg(" com2=");
    dbg_hex(inb(0x2FD), 2);
    *mmio = 0x12345678;
    dbg(" mmio=");
    dbg_hex(*mmio, 8);
    dbg("\n");
    vga(0, 0, "VGA OK", 0x07);
    vga(2, 4, "\xC9\xCD\xBB caf\x82 \x01", 0x1F);
    if (has_word(cmdline, "halt")) return;
    if (has_word(cmdline, "sti")) __asm__ volatile("sti; hlt");
    if (has_word(cmdline, "ud2")) __asm__ volatile("ud2");
    if (has_word(cmdline, "reset")) outb(0x64, 0xFE);
    if (has_word(cmdline, "poweroff")) outw(0x604, 0x2000);
    dbg_rep("bye\n", 4);
    outb(0xF4, 0x21);
    dbg("resumed\n");
}
"""

LINK_LD = """
ENTRY(_start)
SECTIONS {
    . = 0x100000;
    .text : { KEEP(*(.multiboot)) *(.text .text.*) }
    .rodata : { *(.rodata .rodata.*) }
    .data : { *(.data .data.*) }
    .bss : { *(COMMON) *(.bss .bss.*) }
    /DISCARD/ : { *(.note*) *(.comment) *(.eh_frame*) }
}
"""

# A flat binary with the a.out kludge; the "TRAILER!" bytes after load_end_addr are in the file
# but must not be loaded.  It checks EAX and that its bss is zero.
AOUT_S = r"""
    .code32
    .text
    .globl start
start:
    jmp entry
    .align 4
header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long header
    .long start
    .long load_end
    .long bss_end
    .long entry
entry:
    cmp $0x2BADB002, %eax
    jne bad
    cmpl $0, bss_word
    jne bad
    mov $msg, %esi
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, $0xE9
    jmp 1b
2:  mov $0x05, %al
    outb %al, $0xF4
    hlt
bad:
    mov $0x7F, %al
    outb %al, $0xF4
    hlt
msg:
    .asciz "a.out kludge OK\n"
    .align 4
load_end:
    .ascii "TRAILER!"
    .bss
    .align 4
bss_word:
    .skip 4096
bss_end:
    .section .note.GNU-stack, "", @progbits
"""

# Programs the PIC (IRQ0 at vector 0x20, everything else masked) and the PIT (100 Hz), sets up
# an IDT, then waits in `sti; hlt`.  The timer handler prints "tick " to port 0xE9 three times,
# then a newline, and exits through port 0xF4 with 0x10.  Any exception exits with 0x7F.
# The handler returns by hand (pop EIP, drop CS, popf, jmp) rather than with IRET: the host
# this project is tested on emulates every guest instruction, and KVM's instruction emulator
# implements IRET only in real mode (a protected-mode IRET is an emulation failure there).
TIMER_S = r"""
    .code32
    .text
    .globl start
start:
    jmp entry
    .align 4
header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long header
    .long start
    .long load_end
    .long bss_end
    .long entry
entry:
    cli
    mov $stack_top, %esp
    xor %ecx, %ecx
1:  mov $fault, %eax
    cmp $0x20, %ecx
    jb 2f
    mov $spurious, %eax
    jne 2f
    mov $timer, %eax
2:  mov %ax, idt(,%ecx,8)
    movw %cs, idt+2(,%ecx,8)
    movw $0x8E00, idt+4(,%ecx,8)
    shr $16, %eax
    mov %ax, idt+6(,%ecx,8)
    inc %ecx
    cmp $0x30, %ecx
    jb 1b
    lidt idt_desc
    mov $0x11, %al          /* PIC: ICW1..ICW4, master at 0x20, slave at 0x28 */
    out %al, $0x20
    out %al, $0xA0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xA1
    mov $0x04, %al
    out %al, $0x21
    mov $0x02, %al
    out %al, $0xA1
    mov $0x01, %al
    out %al, $0x21
    out %al, $0xA1
    mov $0xFE, %al          /* unmask IRQ0 only */
    out %al, $0x21
    mov $0xFF, %al
    out %al, $0xA1
    mov $0x34, %al          /* PIT channel 0, lobyte/hibyte, mode 2 */
    out %al, $0x43
    mov $0x9C, %al          /* divisor 11932: 100 Hz */
    out %al, $0x40
    mov $0x2E, %al
    out %al, $0x40
3:  sti
    hlt
    jmp 3b
timer:
    mov $msg, %esi
    mov $5, %ecx
    mov $0xE9, %dx
    rep outsb
    incl ticks
    cmpl $3, ticks
    jb 4f
    mov $0x0A, %al
    out %al, $0xE9
    mov $0x10, %al
    out %al, $0xF4
4:  mov $0x20, %al          /* EOI */
    out %al, $0x20
    pop %eax                /* return by hand: EIP, CS, EFLAGS */
    add $4, %esp
    popfl
    jmp *%eax
spurious:
    pop %eax
    add $4, %esp
    popfl
    jmp *%eax
fault:
    mov $0x7F, %al
    out %al, $0xF4
    cli
    hlt
msg:
    .ascii "tick "
    .align 4
idt_desc:
    .word 0x30 * 8 - 1
    .long idt
load_end:
    .bss
    .align 8
idt:
    .skip 0x30 * 8
ticks:
    .skip 4
    .skip 4096
stack_top:
bss_end:
    .section .note.GNU-stack, "", @progbits
"""

CFLAGS = ["-m32", "-march=i686", "-ffreestanding", "-nostdlib", "-mgeneral-regs-only",
          "-fno-pic", "-fno-pie", "-no-pie", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-O2", "-static", "-Wl,--build-id=none"]

DEBUG_EXIT_CODE = (0x21 << 1) | 1


def _gcc(args: list[str], cwd: Path) -> None:
    r = subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode:
        pytest.fail(f"gcc {' '.join(args)} failed:\n{r.stderr}")


@pytest.fixture(scope="session")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test kernels: ``elf`` (C, ELF32), ``aout`` (a flat a.out-kludge binary) and
    ``timer`` (a.out kludge: waits for three PIT interrupts)."""
    # gcc is a build requirement of kvmio itself, so its absence is a failure, not a skip.
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed")
    d = tmp_path_factory.mktemp("multiboot")
    probe = d / "probe.c"
    probe.write_text("void _start(void) { for (;;) { } }\n")
    r = subprocess.run(["gcc", *CFLAGS, "probe.c", "-o", "probe"], cwd=d, capture_output=True,
                       text=True, timeout=120)
    if r.returncode:
        pytest.fail(f"gcc -m32 -nostdlib does not work here: {r.stderr.strip()}")
    (d / "entry.S").write_text(ENTRY_S)
    (d / "kernel.c").write_text(KERNEL_C)
    (d / "link.ld").write_text(LINK_LD)
    (d / "aout.S").write_text(AOUT_S)
    (d / "timer.S").write_text(TIMER_S)
    _gcc([*CFLAGS, "-Wl,--no-warn-rwx-segments", "-Wl,-T,link.ld", "entry.S", "kernel.c",
          "-o", "kernel.elf"], d)
    _gcc(["-m32", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-Wl,--build-id=none",
          "-Wl,-e,start", "-Wl,-Ttext=0x100000", "-Wl,--oformat=binary", "aout.S", "-o",
          "aout.bin"], d)
    _gcc(["-m32", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-Wl,--build-id=none",
          "-Wl,-e,start", "-Wl,-Ttext=0x100000", "-Wl,--oformat=binary", "timer.S", "-o",
          "timer.bin"], d)
    return {"elf": d / "kernel.elf", "aout": d / "aout.bin", "timer": d / "timer.bin"}


def expected_output(cmdline: str, mem: int) -> bytes:
    """What the C kernel prints (both ports, in order) when it runs to its debug exit."""
    high = mem - MIB
    return (f"Hello from multiboot\ncmdline: {cmdline}\nserial OK\n"
            f"flags=0x00000245 mem_lower=640 mem_upper={high // 1024}\n"
            "mmap 0x000000000 0x00009fc00 1\n"
            "mmap 0x00009fc00 0x000000400 2\n"
            "mmap 0x0000f0000 0x000010000 2\n"
            f"mmap 0x000100000 0x{high:09x} 1\n"
            "mmap entries=4\nloader: kvmio\n"
            "probe e9=0xe9 kbc=0x00 com2=0x00 mmio=0xffffffff\n"
            "bye\n").encode()


# -- crafted kernel files -------------------------------------------------------------------


def mb_header(flags: int = 0x3, *, checksum: int | None = None,
              aout: tuple[int, int, int, int, int] | None = None) -> bytes:
    """A Multiboot header (with the a.out kludge fields if given)."""
    if checksum is None:
        checksum = -(mb.HEADER_MAGIC + flags) % (1 << 32)
    h = struct.pack("<III", mb.HEADER_MAGIC, flags, checksum)
    return h + (struct.pack("<5I", *aout) if aout is not None else b"")


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, *, header: bytes | None = None,
             vaddr_offset: int = 0, eclass: int = 1, machine: int = 3, etype: int = 2) -> bytes:
    """An ELF32 file: the ELF header, the Multiboot header, one PT_LOAD program header per
    ``(paddr, data, memsz)``, then the segments' data."""
    header = mb_header() if header is None else header
    phoff = (52 + len(header) + 3) & ~3
    data_off = (phoff + 32 * len(segments) + 15) & ~15
    phdrs = b""
    blob = b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<8I", 1, data_off + len(blob), paddr + vaddr_offset, paddr,
                             len(data), memsz, 7, 16)
        blob += data
    ident = b"\x7fELF" + bytes([eclass, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, etype, machine, 1, entry, phoff, 0, 0, 52,
                       32, len(segments), 0, 0, 0)
    out = (ehdr + header).ljust(phoff, b"\0") + phdrs
    return out.ljust(data_off, b"\0") + blob


#: ``mov al, 0x2a; out 0xf4, al; hlt``: a whole kernel that exits with code 0x55.
EXIT_CODE_BLOB = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4])


# -- parsing (no KVM needed) ----------------------------------------------------------------


def _bytes_id(value: object) -> str | None:
    """Test ids: a file's size instead of its bytes."""
    return f"{len(value)}-byte-file" if isinstance(value, bytes) else None


def test_header_is_found_at_an_aligned_offset_with_a_valid_checksum() -> None:
    data = b"\x90" * 64 + mb_header(0x3) + b"\0" * 64
    h = parse_header(data)
    assert (h.offset, h.flags, h.aout_kludge, h.wants_video_mode) == (64, 0x3, False, False)
    # A candidate with a bad checksum is skipped when a good one follows (as QEMU does).
    data = mb_header(0x3, checksum=1) + mb_header(0x2)
    assert parse_header(data).offset == 12


def test_the_built_kernel_parses(kernels: dict[str, Path]) -> None:
    img = parse_kernel(kernels["elf"].read_bytes())
    assert img.format == "elf" and img.warnings == ()
    assert img.start == 0x100000 and img.end > img.start
    assert any(s.memsz > len(s.data) for s in img.segments)  # it has a bss
    aout = parse_kernel(kernels["aout"].read_bytes())
    assert aout.format == "aout" and aout.header.aout_kludge
    assert aout.start == 0x100000 and aout.entry == aout.header.entry_addr


@pytest.mark.parametrize(("data", "match"), [
    (b"", "only 0 bytes long"),
    (b"\x7fELF" + bytes(100), "no Multiboot header"),
    (bytes(8192) + mb_header(), "no Multiboot header"),  # beyond the first 8 KiB
    (bytes(2) + mb_header() + bytes(2), "no Multiboot header"),  # not 4-byte aligned
    (mb_header(0x3, checksum=0x1234), "bad Multiboot header checksum at offset 0x0"),
    (mb_header(0x8), r"flag bit\(s\) 3 "),
    (mb_header(0x8003 | 0x18), r"flag bit\(s\) 3, 4, 15 "),
    (mb_header(0x10000) + bytes(8), "truncated kernel: the file ends inside the a.out"),
], ids=_bytes_id)
def test_bad_headers_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(KvmInvalidArgumentError, match=match):
        parse_kernel(data)


def test_video_mode_is_accepted_with_a_warning() -> None:
    img = parse_kernel(make_elf([(0x100000, EXIT_CODE_BLOB, 16)], 0x100000,
                                header=mb_header(0x7)))
    assert img.header.wants_video_mode
    assert len(img.warnings) == 1 and "video mode" in img.warnings[0]


def _elf_errors() -> list[tuple[bytes, str]]:
    seg = [(0x100000, EXIT_CODE_BLOB, 0x1000)]
    good = make_elf(seg, 0x100000)
    return [
        (bytes(64) + mb_header(), "not an ELF file, and the Multiboot header has no a.out"),
        (make_elf(seg, 0x100000, eclass=2), "64-bit ELF"),
        (make_elf(seg, 0x100000, machine=62), "machine 62 .x86-64"),
        (make_elf(seg, 0x100000, machine=40), "machine 40"),
        (make_elf(seg, 0x100000, etype=3), "ET_EXEC"),
        (make_elf([], 0x100000), "no program headers"),
        (make_elf([(0x100000, b"", 0)], 0x100000), r"no loadable \(PT_LOAD\) segment"),
        (make_elf(seg, 0x200000), "entry point 0x200000 is in no loadable segment"),
        (make_elf([(0x100000, bytes(32), 16)], 0x100000), "file size 0x20 exceeds"),
        (make_elf([(0x100000, bytes(16), 0x1000), (0x100800, bytes(16), 16)], 0x100000),
         "overlaps loaded segment 0"),
        (make_elf([(0xFFFFF000, bytes(16), 0x2000)], 0xFFFFF000), "past 4 GiB"),
        (good[:-3], "truncated kernel: ELF segment 0"),
        (good[:70], "truncated kernel: the ELF program headers"),
    ]


@pytest.mark.parametrize(("data", "match"), _elf_errors(), ids=_bytes_id)
def test_bad_elf_files_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(KvmInvalidArgumentError, match=match) as e:
        parse_kernel(data)
    assert isinstance(e.value, KvmError)


#: Enough program headers that checking every pair (the old, quadratic check) takes many seconds.
MANY_HEADERS = 20_000


def test_many_program_headers_are_checked_in_n_log_n() -> None:
    # In reverse address order, so that a sort is really needed.
    segs = [(0x100000 + i * 0x1000, b"\x90", 16) for i in reversed(range(MANY_HEADERS))]
    img = parse_kernel(make_elf(segs, 0x100000))
    assert len(img.segments) == MANY_HEADERS
    assert (img.start, img.end) == (0x100000, 0x100000 + (MANY_HEADERS - 1) * 0x1000 + 16)
    # The last header overlaps the first one; all the others are disjoint.
    segs.append((segs[0][0] + 8, b"\x90", 16))
    with pytest.raises(KvmInvalidArgumentError,
                       match=f"ELF segment {MANY_HEADERS} .* overlaps loaded segment 0 "):
        parse_kernel(make_elf(segs, 0x100000))
    # Touching is not overlapping.
    ok = [(0x100000, b"\x90", 0x1000), (0x101000, b"\x90", 0x10), (0x0F0000, b"", 0x10000)]
    assert len(parse_kernel(make_elf(ok, 0x100000)).segments) == 3


def test_truncated_real_kernel_is_refused(kernels: dict[str, Path]) -> None:
    data = kernels["elf"].read_bytes()
    with pytest.raises(KvmInvalidArgumentError, match="truncated kernel"):
        parse_kernel(data[: len(data) // 2 + 0x800])
    bad = bytearray(data)
    h = parse_header(data)
    struct.pack_into("<I", bad, h.offset + 8, h.checksum ^ 1)
    with pytest.raises(KvmInvalidArgumentError, match="bad Multiboot header checksum"):
        parse_kernel(bytes(bad))


def test_higher_half_entry_is_translated_to_its_physical_address() -> None:
    img = parse_kernel(make_elf([(0x100000, EXIT_CODE_BLOB, 16)], 0xC0100002,
                                vaddr_offset=0xC0000000))
    assert img.entry == 0x100002


def _aout(load: int, load_end: int, bss_end: int, entry: int, *, body: bytes = b"",
          prefix: int = 0) -> bytes:
    """A flat image loaded at ``load`` whose header sits ``prefix`` bytes into the file."""
    return bytes(prefix) + mb_header(0x10002, aout=(load + prefix, load, load_end, bss_end,
                                                    entry)) + body


def test_aout_fields() -> None:
    img = parse_kernel(_aout(0x100000, 0, 0, 0x100020, body=bytes(16)))
    assert img.segments[0].paddr == 0x100000 and len(img.segments[0].data) == 48
    assert img.entry == 0x100020 and img.end == 0x100030  # load_end 0: the whole file
    img = parse_kernel(_aout(0x100000, 0x100010, 0x104000, 0x100000, prefix=8))
    assert len(img.segments[0].data) == 16 and img.end == 0x104000


@pytest.mark.parametrize(("data", "match"), [
    (mb_header(0x10002, aout=(0x100000, 0x100100, 0, 0, 0x100100)), "above header_addr"),
    (mb_header(0x10002, aout=(0x100100, 0x100000, 0, 0, 0x100000)), "before the start of the"),
    (_aout(0x100000, 0x100000, 0, 0x100000), "not above load_addr"),
    (_aout(0x100000, 0x101000, 0, 0x100000), "truncated kernel: Multiboot header"),
    (_aout(0x100000, 0x100010, 0x100008, 0x100000, body=bytes(16)), "bss_end_addr 0x100008"),
    (_aout(0x100000, 0, 0, 0x100040), "entry_addr 0x100040 is outside"),
], ids=_bytes_id)
def test_bad_aout_kludge_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(KvmInvalidArgumentError, match=match):
        parse_kernel(data)


@pytest.mark.parametrize(("paddr", "match"), [
    (0x8000000, "outside guest memory"),
    (0x7FFF000, "outside guest memory"),  # starts inside, ends outside
    (0x1000, "overlaps the boot loader's area"),
    (0x9F000, "overlaps the reserved hole"),
    (0xB8000, "overlaps the reserved hole"),
])
def test_segments_outside_free_memory_are_refused(paddr: int, match: str) -> None:
    img = parse_kernel(make_elf([(paddr, EXIT_CODE_BLOB, 0x2000)], paddr))
    with pytest.raises(KvmInvalidArgumentError, match=match):
        img.check_placement(128 * MIB)


def test_low_memory_kernel_is_placed() -> None:
    parse_kernel(make_elf([(0x10000, EXIT_CODE_BLOB, 0x1000)], 0x10000)).check_placement(2 * MIB)


@pytest.mark.parametrize(("text", "size"), [
    ("128M", 128 * MIB), ("1G", 1 << 30), ("64MiB", 64 * MIB), ("64MB", 64 * MIB),
    ("512", 512 * MIB), ("2048k", 2 * MIB), ("1.5G", 3 << 29), ("4096B", 4096),
    (" 16 m ", 16 * MIB),
])
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize(("text", "match"), [
    ("", "bad memory size"), ("M", "bad memory size"), ("12X", "bad memory size"),
    ("-1M", "bad memory size"), ("1.3B", "not a whole number of bytes"),
    ("0x10M", "bad memory size"), ("1 G B", "bad memory size"),
])
def test_bad_memory_sizes(text: str, match: str) -> None:
    with pytest.raises(KvmInvalidArgumentError, match=match):
        parse_memory_size(text)


def test_memory_map() -> None:
    entries = mb.memory_map(64 * MIB)
    assert [(e.base, e.length, e.type) for e in entries] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
        (0x100000, 63 * MIB, 1)]
    assert entries[0].pack() == struct.pack("<IQQI", 20, 0, 0x9FC00, 1)


def test_render_vga_text_from_bytes() -> None:
    buf = bytearray(4000)
    for i, c in enumerate(b"Hi \x01\xc9\xcd\xbb\xff"):
        buf[2 * (80 + i)] = c
        buf[2 * (80 + i) + 1] = 0x1F
    buf[2 * (24 * 80 + 79)] = ord("!")
    lines = render_vga_text(bytes(buf)).split("\n")
    assert len(lines) == 25
    assert lines[0] == "" and lines[1] == "Hi \u263a\u2554\u2550\u2557" and lines[24][-1] == "!"
    assert len(lines[24]) == 80
    with pytest.raises(KvmInvalidArgumentError, match="4000 bytes"):
        render_vga_text(bytes(100))


# -- running on /dev/kvm --------------------------------------------------------------------


def test_output_cmdline_memory_and_exit_code(kvm: Kvm, kernels: dict[str, Path]) -> None:
    chunks: list[bytes] = []
    r = run_multiboot(kvm, kernels["elf"], mem=64 * MIB, cmdline="hello  world",
                      timeout=20, on_output=chunks.append)
    path = str(kernels["elf"])
    assert r.output == expected_output(f"{path} hello  world", 64 * MIB), r.summary()
    assert b"".join(chunks) == r.output
    assert r.serial == b"serial OK\n"
    assert r.debugcon == r.output.replace(b"serial OK\n", b"")
    assert (r.reason, r.exit_code) == (StopReason.DEBUG_EXIT, DEBUG_EXIT_CODE)
    assert "exit code 67" in r.summary() and r.exits > 0 and r.warnings == ()


@pytest.mark.parametrize("mem", [2 * MIB, 128 * MIB, 1 << 30])
def test_memory_information_follows_mem(kvm: Kvm, kernels: dict[str, Path], mem: int) -> None:
    r = run_multiboot(kvm, kernels["elf"], mem=mem, name="k", timeout=20)
    assert r.output == expected_output("k", mem)


def test_entry_state(kvm: Kvm, kernels: dict[str, Path]) -> None:
    with MultibootMachine(kvm, kernels["elf"], mem=32 * MIB, cmdline="x") as m:
        regs = m.vcpu.get_regs()
        s = m.vcpu.get_sregs()
        assert (regs.rax, regs.rbx, regs.rip) == (0x2BADB002, m.info_addr, m.image.entry)
        assert not regs.rflags & (1 << 9)
        assert s.cr0 & CR0_PE and not s.cr0 & CR0_PG
        for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss):
            assert (seg.base, seg.limit, seg.db, seg.g) == (0, 0xFFFFFFFF, 1, 1)
        info = struct.unpack("<17I", m.vm.read_memory(m.info_addr, 68))
        assert info[0] == 0x245 and info[1:3] == (640, 31 * 1024)
        assert m.vm.read_memory(info[4], 10) == str(kernels["elf"]).encode()[:10]
        assert m.vm.read_memory(info[16], 6) == b"kvmio\0"
        assert m.cmdline == f"{kernels['elf']} x"
    assert m.vm.closed


def test_boot_information_follows_the_kernel(kvm: Kvm, kernels: dict[str, Path]) -> None:
    # Not at a fixed low address a kernel may use for its own data (it was 0x9000..0x10000).
    with MultibootMachine(kvm, kernels["elf"], mem=32 * MIB, cmdline="x") as m:
        page_end = (m.image.end + 4095) & ~4095
        assert m.info_addr == m.boot_info.info == page_end
        assert m.vm.read_memory(0x9000, 0x7000) == bytes(0x7000)
        info = struct.unpack("<17I", m.vm.read_memory(m.info_addr, 68))
        # The memory map, the loader name and the command line lie in the same block.
        assert m.info_addr < info[12] < info[16] < info[4] < m.boot_info.end
        assert m.vm.read_memory(info[4], len(m.cmdline) + 1) == m.cmdline.encode() + b"\0"
        assert m.boot_info.end <= m.mem_size
    # A kernel in low memory whose next page would run into the hole: the block moves to 1 MiB.
    low = make_elf([(0x10000, EXIT_CODE_BLOB, 0x9F000 - 0x10000)], 0x10000)
    with MultibootMachine(kvm, low, mem=4 * MIB, cmdline="y" * 8000) as m:
        assert m.info_addr == 0x100000
        assert m.run(timeout=20).exit_code == 0x55


def test_boot_information_must_fit_in_guest_memory(kvm: Kvm) -> None:
    full = make_elf([(0x100000, EXIT_CODE_BLOB, 3 * MIB - 4096)], 0x100000)
    with pytest.raises(KvmInvalidArgumentError, match="no room for the Multiboot information"):
        MultibootMachine(kvm, full, mem=4 * MIB, cmdline="z" * 5000)
    with MultibootMachine(kvm, full, mem=4 * MIB, cmdline="z" * 1000) as m:
        assert m.boot_info.end <= 4 * MIB and m.info_addr == 4 * MIB - 4096


def test_vga_text(kvm: Kvm, kernels: dict[str, Path]) -> None:
    with MultibootMachine(kvm, kernels["elf"], mem=16 * MIB) as m:
        r = m.run(timeout=20)
        lines = r.vga_text.split("\n")
        assert len(lines) == 25
        assert lines[0] == "VGA OK"
        assert lines[2] == "    \u2554\u2550\u2557 caf\u00e9 \u263a"
        assert all(line == "" for line in lines[3:])
        assert render_vga_text(m.vm) == r.vga_text == m.vga_text()
        assert render_vga_text(m.ram) == r.vga_text


def test_resume_after_debug_exit_then_halt(kvm: Kvm, kernels: dict[str, Path]) -> None:
    with MultibootMachine(kvm, kernels["elf"], mem=16 * MIB) as m:
        assert m.run(timeout=20).reason is StopReason.DEBUG_EXIT
        r = m.run(timeout=20)
        assert r.output == b"resumed\n"
        assert r.reason is StopReason.HALTED and r.exit_code is None
        assert "interrupts disabled" in r.detail


def test_output_keeps_a_bounded_tail(kvm: Kvm, kernels: dict[str, Path]) -> None:
    chunks: list[bytes] = []
    r = run_multiboot(kvm, kernels["elf"], mem=16 * MIB, name="k", timeout=20,
                      on_output=chunks.append, max_output=100)
    everything = expected_output("k", 16 * MIB)
    assert b"".join(chunks) == everything  # the callback sees every byte
    assert r.output == everything[-100:] and r.output_dropped == len(everything) - 100
    assert r.serial == b"serial OK\n" and len(r.debugcon) == 100
    assert f"{len(everything)} bytes of output" in r.summary()
    with pytest.raises(KvmInvalidArgumentError, match="max_output"):
        run_multiboot(kvm, kernels["elf"], mem=16 * MIB, max_output=-1)


def test_timeout_stops_a_spinning_kernel(kvm: Kvm, kernels: dict[str, Path]) -> None:
    with MultibootMachine(kvm, kernels["elf"], mem=16 * MIB, cmdline="spin") as m:
        t0 = time.monotonic()
        r = m.run(timeout=0.3)
        took = time.monotonic() - t0
        assert r.reason is StopReason.TIMEOUT and isinstance(r.exit, Interrupted)
        assert 0.25 <= took < 3, took
        assert r.output.endswith(b"cmdline: " + m.cmdline.encode() + b"\n")
        assert "timeout (0.3 s)" in r.summary()
        # The kick does not leak into the next run: it runs for its own timeout again.
        t0 = time.monotonic()
        assert m.run(timeout=0.2).reason is StopReason.TIMEOUT
        assert time.monotonic() - t0 >= 0.15


@pytest.mark.parametrize(("word", "reason", "detail", "irqchip"), [
    ("halt", StopReason.HALTED, "with interrupts disabled", True),  # found by polling
    ("halt", StopReason.HALTED, "with interrupts disabled", False),  # a HLT exit
    ("sti", StopReason.HALTED, "with interrupts enabled", False),
    ("ud2", StopReason.SHUTDOWN, "triple fault", True),
    ("reset", StopReason.RESET, "keyboard controller", True),
    ("poweroff", StopReason.POWEROFF, "port 0x604", True),
])
def test_other_stops(kvm: Kvm, kernels: dict[str, Path], word: str, reason: StopReason,
                     detail: str, irqchip: bool) -> None:
    with MultibootMachine(kvm, kernels["elf"], mem=16 * MIB, cmdline=word,
                          irqchip=irqchip) as m:
        r = m.run(timeout=20)
        assert r.reason is reason and detail in r.detail, r.detail
        assert r.output.endswith(b"probe e9=0xe9 kbc=0x00 com2=0x00 mmio=0xffffffff\n")
        assert r.exit_code is None
        if reason is not StopReason.HALTED:
            with pytest.raises(KvmStateError, match="cannot be resumed"):
                m.run(timeout=1)


def test_hlt_with_interrupts_enabled_waits_under_the_irqchip(kvm: Kvm,
                                                             kernels: dict[str, Path]) -> None:
    # KVM handles HLT in the kernel when the irqchip is there: no exit, the vCPU waits for an
    # interrupt (this kernel never programs the timer), so only the timeout ends the run.
    with MultibootMachine(kvm, kernels["elf"], mem=16 * MIB, cmdline="sti") as m:
        r = m.run(timeout=0.5)
        assert r.reason is StopReason.TIMEOUT, r.detail
        assert m.vcpu.get_mp_state() == 3  # KVM_MP_STATE_HALTED
        assert r.regs.rflags & (1 << 9)


def test_timer_interrupts_are_delivered(kvm: Kvm, kernels: dict[str, Path]) -> None:
    r = run_multiboot(kvm, kernels["timer"], mem=4 * MIB, timeout=20)
    assert (r.reason, r.exit_code) == (StopReason.DEBUG_EXIT, (0x10 << 1) | 1), r.detail
    assert r.output == b"tick tick tick \n"
    # Without the irqchip and PIT the same kernel halts with nothing to wake it.
    r = run_multiboot(kvm, kernels["timer"], mem=4 * MIB, timeout=20, irqchip=False)
    assert r.reason is StopReason.HALTED and "interrupts enabled" in r.detail
    assert r.output == b""


def test_internal_error_ends_the_run(kvm: Kvm) -> None:
    # KVM_EXIT_INTERNAL_ERROR depends on the host; feed the handler a decoded exit instead.
    with MultibootMachine(kvm, make_elf([(0x100000, EXIT_CODE_BLOB, 16)], 0x100000),
                          mem=4 * MIB) as m:
        stop = m._handle(InternalError(1, (2, 3)), lambda source, data: None)
        assert stop is not None and stop.reason is StopReason.INTERNAL_ERROR
        assert "suberror 1 (emulation failure)" in stop.detail and "data 0x2 0x3" in stop.detail


def test_crafted_higher_half_kernel_runs(kvm: Kvm) -> None:
    data = make_elf([(0x100000, EXIT_CODE_BLOB, 16)], 0xC0100000, vaddr_offset=0xC0000000)
    r = run_multiboot(kvm, data, mem=4 * MIB, timeout=20)
    assert (r.reason, r.exit_code, r.output) == (StopReason.DEBUG_EXIT, 0x55, b"")


def test_aout_kludge_kernel(kvm: Kvm, kernels: dict[str, Path]) -> None:
    data = kernels["aout"].read_bytes()
    img = parse_kernel(data)
    load_end, bss_end = img.header.load_end_addr, img.header.bss_end_addr
    assert load_end is not None and bss_end is not None and load_end < bss_end
    with MultibootMachine(kvm, data, mem=8 * MIB) as m:
        # The text is copied; the bss (where the file holds "TRAILER!" past load_end_addr)
        # reads as zero, because nothing was written there.
        assert m.vm.read_memory(0x100000, load_end - 0x100000) == data[:load_end - 0x100000]
        assert m.vm.read_memory(load_end, bss_end - load_end) == bytes(bss_end - load_end)
        r = m.run(timeout=20)
    assert (r.reason, r.exit_code, r.output) == (StopReason.DEBUG_EXIT, 11, b"a.out kludge OK\n")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mem": MIB}, "between 2 MiB and 3 GiB"),
    ({"mem": 4 << 30}, "between 2 MiB and 3 GiB"),
    ({"mem": 16 * MIB + 100}, "not a multiple of the page size"),
    ({"cmdline": "a\0b"}, "NUL"),
    ({"cmdline": "x" * 30000}, "at most 16383"),
])
def test_bad_machine_arguments(kvm: Kvm, kernels: dict[str, Path], kwargs: dict[str, object],
                               match: str) -> None:
    with pytest.raises(KvmInvalidArgumentError, match=match):
        MultibootMachine(kvm, kernels["elf"], **kwargs)  # type: ignore[arg-type]


def test_bad_kernels_through_the_runner(kvm: Kvm, tmp_path: Path) -> None:
    high = make_elf([(0x8000000, EXIT_CODE_BLOB, 16)], 0x8000000)
    with pytest.raises(KvmInvalidArgumentError, match="outside guest memory"):
        run_multiboot(kvm, high, mem=128 * MIB)
    assert run_multiboot(kvm, high, mem=256 * MIB, timeout=20).exit_code == 0x55
    with pytest.raises(KvmInvalidArgumentError, match="cannot read kernel") as e:
        run_multiboot(kvm, tmp_path / "missing.elf")
    assert isinstance(e.value, KvmError)
    with pytest.raises(KvmInvalidArgumentError, match="no Multiboot header"):
        run_multiboot(kvm, b"\x7fELF" + bytes(200))


def _rss() -> int:
    """The process's resident set now, in bytes (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_huge_bss_costs_no_host_memory(kvm: Kvm) -> None:
    # A ~100-byte file whose segment declares 1 GiB of bss: loading it used to write 1 GiB of
    # zeros from the host (and build them in a bytes object first).
    data = make_elf([(0x100000, EXIT_CODE_BLOB, 1 << 30)], 0x100000)
    assert len(data) < 128
    before = _rss()
    with MultibootMachine(kvm, data, mem=2 << 30) as m:
        grown = _rss() - before
        assert m.vm.read_memory(0x100000 + (1 << 30) - 4096, 4096) == bytes(4096)
        r = m.run(timeout=20)
    assert grown < 64 * MIB, f"loading raised RSS by {grown >> 20} MiB"
    assert (r.reason, r.exit_code) == (StopReason.DEBUG_EXIT, 0x55)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_non_regular_kernel_files_are_refused_before_reading(kvm: Kvm, tmp_path: Path,
                                                             kind: str) -> None:
    # A FIFO without a writer used to block in open(); /dev/zero was read without end.
    path = {"fifo": tmp_path / "fifo", "dev-zero": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    what = {"fifo": "a FIFO", "dev-zero": "a character device", "directory": "a directory"}
    with pytest.raises(KvmInvalidArgumentError, match=f"it is {what[kind]}; a kernel must be"):
        MultibootMachine(kvm, path, mem=4 * MIB)


def test_a_kernel_larger_than_guest_memory_is_refused_before_reading(kvm: Kvm,
                                                                     tmp_path: Path) -> None:
    big = tmp_path / "big.elf"
    good = make_elf([(0x100000, EXIT_CODE_BLOB, 16)], 0x100000)
    with open(big, "wb") as f:
        f.write(good)
        f.truncate(1 << 40)  # sparse: 1 TiB that nothing should try to read
    with pytest.raises(KvmInvalidArgumentError, match="larger than guest memory"):
        MultibootMachine(kvm, big, mem=4 * MIB)
    with pytest.raises(KvmInvalidArgumentError, match="larger than guest memory"):
        MultibootMachine(kvm, good + bytes(4 * MIB), mem=4 * MIB)
    small = tmp_path / "small.elf"
    small.write_bytes(good)
    with MultibootMachine(kvm, small, mem=4 * MIB) as m:
        assert m.run(timeout=20).exit_code == 0x55


# -- the command line -----------------------------------------------------------------------


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner()


@pytest.mark.usefixtures("kvm")
def test_cli_run(kernels: dict[str, Path]) -> None:
    path = str(kernels["elf"])
    r = _runner().invoke(main, ["run", path, "--mem", "64M", "--append", "from cli", "--vga",
                                "--timeout", "20"])
    assert r.exit_code == DEBUG_EXIT_CODE, r.output
    out = r.stdout_bytes
    expected = expected_output(f"{path} from cli", 64 * MIB)
    assert out.startswith(expected)
    screen = out[len(expected):].decode().split("\n")
    assert screen[:3] == ["VGA OK", "", "    \u2554\u2550\u2557 caf\u00e9 \u263a"]
    assert "debug exit" in r.stderr and "exit code 67" in r.stderr


@pytest.mark.usefixtures("kvm")
def test_cli_timeout_exits_zero(kernels: dict[str, Path]) -> None:
    r = _runner().invoke(main, ["run", str(kernels["elf"]), "--append", "spin", "--timeout",
                                "0.2", "--mem", "16MiB"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Hello from multiboot\n")
    assert "timeout (0.2 s)" in r.stderr


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize(("args", "code", "message"), [
    (["run", "/nonexistent/kernel.elf"], 2, "does not exist"),
    (["run", "BAD", "--mem", "12X"], 2, "bad memory size '12X'"),
    (["run", "BAD"], 1, "no Multiboot header"),
    (["run", "ELF", "--mem", "1M"], 2, "between 2 MiB and 3 GiB"),
    (["run", "ELF", "--timeout", "nan"], 2, "not a finite number"),
])
def test_cli_errors(kernels: dict[str, Path], tmp_path: Path, args: list[str], code: int,
                    message: str) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x7fELF" + bytes(100))
    paths = {"BAD": str(bad), "ELF": str(kernels["elf"])}
    r = _runner().invoke(main, [paths.get(a, a) for a in args])
    assert r.exit_code == code
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not isinstance(r.exception, KvmError)


@pytest.mark.usefixtures("kvm")
def test_cli_subprocess_streams_and_exits(kernels: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "kvmio.cli", "run", str(kernels["elf"]), "--mem", "32M"]
    r = subprocess.run([*cmd, "--append", "sub", "--vga"], capture_output=True, timeout=60)
    assert r.returncode == DEBUG_EXIT_CODE, r.stderr
    assert r.stdout.startswith(expected_output(f"{kernels['elf']} sub", 32 * MIB))
    assert b"VGA OK\n" in r.stdout
    assert r.stderr.decode().startswith("kvmio: debug exit")
    # Output arrives while the kernel still runs, not when it stops.
    with subprocess.Popen([*cmd, "--append", "spin", "--timeout", "1.5"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None
        first = p.stdout.readline()
        seen = time.monotonic()
        p.wait(timeout=60)
        done = time.monotonic()
        assert first == b"Hello from multiboot\n"
        assert done - seen > 0.7
        assert p.returncode == 0


@pytest.mark.usefixtures("kvm")
def test_cli_no_irqchip(kernels: dict[str, Path]) -> None:
    timer = str(kernels["timer"])
    r = _runner().invoke(main, ["run", timer, "--mem", "4M", "--timeout", "20"])
    assert r.exit_code == (0x10 << 1) | 1 and r.stdout == "tick tick tick \n", r.output
    # Without the irqchip and PIT nothing interrupts the kernel: its HLT ends the run.
    r = _runner().invoke(main, ["run", timer, "--mem", "4M", "--timeout", "20",
                                "--no-irqchip"])
    assert r.exit_code == 0 and r.stdout == "", r.output
    assert "interrupts enabled" in r.stderr
    assert "--no-irqchip" in _runner().invoke(main, ["run", "--help"]).stdout


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize("irqchip", [[], ["--no-irqchip"]])
def test_cli_ctrl_c_stops_a_kernel_that_never_stops(kernels: dict[str, Path],
                                                    irqchip: list[str]) -> None:
    kvmio = str(Path(sys.executable).with_name("kvmio"))  # the console script
    with subprocess.Popen([kvmio, "run", str(kernels["elf"]), "--mem", "16M", "--append",
                           "spin", *irqchip], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as p:
        try:
            assert p.stdout is not None
            first = p.stdout.readline()  # the kernel runs (then spins, without a timeout)
            assert first == b"Hello from multiboot\n"
            assert p.poll() is None
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 130, err
    assert err.decode().splitlines() == ["Interrupted."] and b"Traceback" not in err


def test_cli_ctrl_c_stops_a_kernel_whose_output_nobody_reads(kernels: dict[str, Path]) -> None:
    """A kernel that writes without end into a pipe nobody reads: kvmio blocks writing its
    output, and the first Ctrl-C still ends it (it is raised inside the output callback,
    where no vCPU call is half done), with status 130."""
    kvmio = str(Path(sys.executable).with_name("kvmio"))
    with subprocess.Popen([kvmio, "run", str(kernels["elf"]), "--mem", "16M", "--append",
                           "flood"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            assert p.stdout is not None
            assert p.stdout.readline() == b"Hello from multiboot\n"

            def blocked_on_the_pipe() -> bool:
                with open(f"/proc/{p.pid}/wchan") as f:
                    return "pipe_write" in f.read()  # (anon_)pipe_write, by kernel

            wait_until(blocked_on_the_pipe, what="kvmio blocked writing to the full pipe")
            p.send_signal(signal.SIGINT)
            # The pipe is never drained: kvmio must stop without its write completing.
            p.wait(timeout=60)
            assert p.stderr is not None
            err = p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 130, err
    assert b"Interrupted." in err and b"Traceback" not in err


# -- the devices (kvmio.devices) and sizes (kvmio.units) ------------------------------------


def _uart_script(u: Uart16550) -> list[int]:
    """What a polling driver reads after the state under test: registers and a loopback byte."""
    u.io_write(COM1 + 0, 1, 0x5A)  # THR: output, or RBR in loopback
    return [u.io_read(COM1 + r, 1) for r in (5, 0, 1, 2, 3, 4, 6, 7, 5)]


def test_uart_state_round_trip() -> None:
    u = Uart16550()
    for reg, v in [(3, 0x80), (0, 0x01), (1, 0x02), (3, 0x03), (2, 0xC7), (7, 0x42),
                   (4, 0x1E), (0, 0xAE)]:
        assert u.io_write(COM1 + reg, 1, v) is None  # loopback: nothing goes out
    saved = u.state()
    assert saved["data_ready"] == 1 and saved["rbr"] == 0xAE and saved["dll"] == 1
    json.dumps(saved)  # plain values
    fresh = Uart16550()
    assert fresh.state() != saved
    fresh.restore(saved)
    assert fresh.state() == saved
    assert fresh.io_read(COM1 + 0, 1) == u.io_read(COM1 + 0, 1) == 0xAE
    assert _uart_script(fresh) == _uart_script(u)
    # Out of loopback a THR write is output.
    u.io_write(COM1 + 4, 1, 0x0B)
    assert u.io_write(COM1, 1, ord("x")) == Output("serial", b"x")


@pytest.mark.parametrize(("state", "match"), [
    ("nope", "must be a mapping"),
    ({}, "missing"),
    ({**Uart16550().state(), "extra": 1}, "unknown extra"),
    ({**Uart16550().state(), "ier": 0x10}, r"ier=16 is outside \[0, 15\]"),
    ({**Uart16550().state(), "lcr": True}, "lcr must be an int"),
    ({**Uart16550().state(), "rbr": -1}, "rbr=-1"),
])
def test_uart_refuses_bad_state(state: object, match: str) -> None:
    u = Uart16550()
    u.io_write(COM1 + 7, 1, 0x99)
    before = u.state()
    with pytest.raises(KvmInvalidArgumentError, match=match):
        u.restore(state)  # type: ignore[arg-type]
    assert u.state() == before


def test_power_and_debug_devices() -> None:
    p = PowerControl()
    assert p.io_write(0x64, 1, 0xAD) is None
    assert isinstance(p.io_write(0x64, 1, 0xFE), ResetRequest)
    assert p.io_write(0xCF9, 1, 0x02) is None and p.io_read(0xCF9, 1) == 0x02
    assert isinstance(p.io_write(0xCF9, 1, 0x06), ResetRequest)
    assert p.io_write(0x604, 1, 0x00) is None and p.io_write(0x604, 2, 0x1000) is None
    assert isinstance(p.io_write(0xB004, 2, 0x2000), PowerOff)
    p.io_write(0xCF9, 1, 0x08)
    q = PowerControl()
    q.restore(p.state())
    assert q.io_read(0xCF9, 1) == p.io_read(0xCF9, 1) == 0x08
    with pytest.raises(KvmInvalidArgumentError, match="bits other than 1 and 3"):
        q.restore({"rcr": 0x04})
    d, x = DebugConsole(), DebugExitPort()
    assert d.io_write(0xE9, 1, 0x141) == Output("debugcon", b"A") and d.io_read(0xE9, 1) == 0xE9
    ev = x.io_write(0xF4, 4, 0x1234)
    assert isinstance(ev, DebugExit) and ev.exit_code == (0x1234 << 1) | 1
    for dev in (d, x):
        assert dev.state() == {}
        dev.restore({})
        with pytest.raises(KvmInvalidArgumentError, match="unknown a"):
            dev.restore({"a": 1})


def test_vga_crtc_state_round_trip() -> None:
    v = VgaText()
    v.io_write(0x3D4, 1, 0x0F)
    v.io_write(0x3D5, 1, 0xA2)
    v.io_write(0x3D4, 2, 0x010E)  # outw: index 0x0E, data 0x01
    assert v.cursor == divmod(0x1A2, 80) and v.io_read(0x3D5, 1) == 0x01
    saved = v.state()
    w = VgaText()
    w.restore(saved)
    assert (w.cursor, w.io_read(0x3D4, 1), w.state()) == (v.cursor, 0x0E, saved)
    with pytest.raises(KvmInvalidArgumentError, match="crtc must be 25 bytes"):
        w.restore({"crtc_index": 0, "crtc": b"\0"})


def test_bus_routes_and_restores_all_or_nothing() -> None:
    bus = IoBus([DebugConsole(), Uart16550(), PowerControl()])
    assert bus.read(0x60, 1) == 0 and bus.write(0x80, 1, 0x12) is None  # unclaimed
    assert bus.read(0xE9, 2) == 0xE9
    with pytest.raises(KvmInvalidArgumentError, match="already belong to debugcon"):
        bus.add(DebugConsole(name="other"))
    bus.write(COM1 + 7, 1, 0x77)
    saved = bus.state()
    other = IoBus([DebugConsole(), Uart16550(), PowerControl()])
    bad = {**saved, "power": {"rcr": 0x100}}
    with pytest.raises(KvmInvalidArgumentError, match="rcr=256"):
        other.restore(bad)
    assert other.read(COM1 + 7, 1) == 0  # nothing restored
    other.restore(saved)
    assert other.read(COM1 + 7, 1) == 0x77 and other.state() == saved


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("2K", 2048), ("1.5M", 3 << 19), ("3GiB", 3 << 30), ("7B", 7),
])
def test_parse_size_in_bytes_by_default(text: str, size: int) -> None:
    assert parse_size(text, default_shift=0) == size


def test_parse_size_names_what() -> None:
    assert parse_size("64") == 64 * MIB
    with pytest.raises(KvmInvalidArgumentError, match="bad working set '1Q'"):
        parse_size("1Q", what="working set")
    with pytest.raises(KvmInvalidArgumentError, match="must be a string"):
        parse_size(12)  # type: ignore[arg-type]
