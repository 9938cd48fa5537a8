"""arm64 build check without arm64 hardware: kvmio's aarch64 declarations against arm64 headers.

Uses Debian's cross toolchain (``gcc-aarch64-linux-gnu``, ``libc6-dev-arm64-cross`` for the C
library headers that Python.h and the cffi source include, ``linux-libc-dev-arm64-cross`` for the
arm64 <linux/kvm.h> and <asm/kvm.h>).  Nothing is run on arm64:

* the cffi C source of ``make_builder("aarch64")`` is compiled with ``aarch64-linux-gnu-gcc``, which
  proves that every field cffi checks exists with the declared type in the arm64 headers;
* a probe generated from the same declarations is compiled to an object file whose
  ``.kvmio_probe`` section holds one 64-bit value per number (sizes, alignments, offsets, ioctl
  numbers, capabilities...); the section is extracted with ``aarch64-linux-gnu-objcopy`` and the
  numbers are compared with the layout cffi computes for the fully declared structs, with the
  host's compiled module for everything the two architectures share, and with arm64 ABI facts;
* the build's ``#error`` guard is shown to fire (and only it) when the arm64 <asm/kvm.h> has no
  ``KVM_DIRTY_LOG_PAGE_OFFSET``;
* the ring functions of the compiled object are disassembled (``aarch64-linux-gnu-objdump``, from
  ``binutils-aarch64-linux-gnu``, which the gcc package pulls in): their loops must load the
  entries' flags with a load-acquire and store RESET with a store-release, so the ``__atomic_*``
  orderings of the C source survive compilation for the weakly ordered architecture where they
  matter (x86 orders plain loads and stores this way anyway).

Without the cross toolchain the tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cffi import VerificationMissing

from kvmio._abi import ffi as host_ffi
from kvmio._abi import lib as host_lib
from kvmio._native_build import CDEF_COMMON, CDEF_X86, SOURCE, cdef_for, make_builder

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TRIPLET = "aarch64-linux-gnu"
PACKAGES = "gcc-aarch64-linux-gnu libc6-dev-arm64-cross linux-libc-dev-arm64-cross"
CC = shutil.which(f"{TRIPLET}-gcc")
OBJCOPY = shutil.which(f"{TRIPLET}-objcopy")
OBJDUMP = shutil.which(f"{TRIPLET}-objdump")

ARM_CDEF = cdef_for("aarch64")
ARM_FFI = make_builder("aarch64")  # the builder: computes layouts only of fully declared structs
STRUCTS = sorted({s for s in re.findall(r"^struct (\w+) \{", ARM_CDEF, re.M)
                  if s.startswith("kvm_")})
#: Structs whose layout is the architecture's own (opaque ``{ ...; }`` in the common cdef).
ARCH_STRUCTS = ("kvm_regs", "kvm_sregs", "kvm_fpu")
#: Shared structs: declared only by the common cdef, so the host module has the same field list.
SHARED_STRUCTS = [s for s in STRUCTS
                  if s not in ARCH_STRUCTS and f"struct {s} {{" not in CDEF_X86]
RUN_MEMBERS = ("io", "mmio", "internal", "system_event", "fail_entry", "hw")
CONSTANTS = [c for c in re.findall(r"^#define (\w+) \.\.\.$", ARM_CDEF, re.M)
             if not c.startswith("KVMIO_")]
#: ioctl numbers that encode the size of an architecture-specific struct.
SIZED_IOCTLS = {"KVM_GET_REGS": "kvm_regs", "KVM_SET_REGS": "kvm_regs",
                "KVM_GET_SREGS": "kvm_sregs", "KVM_SET_SREGS": "kvm_sregs",
                "KVM_GET_FPU": "kvm_fpu", "KVM_SET_FPU": "kvm_fpu"}
FALLBACK_BLOCKS = re.findall(r"^#ifndef (\w+)\n(.*?)^#endif\n", SOURCE, re.M | re.S)
UPSTREAM = {
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    "KVM_EXIT_DIRTY_RING_FULL": 31,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_DIRTY_GFN_F_DIRTY": 1,
    "KVM_DIRTY_GFN_F_RESET": 2,
}
MAGIC = 0x6B766D696F2D7072  # "kvmio-pr"
GUARD_MESSAGE = "lacks KVM_DIRTY_LOG_PAGE_OFFSET"
OFFSET_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+KVM_DIRTY_LOG_PAGE_OFFSET\b.*\n", re.M)


def _fields(ffi: Any, name: str) -> list[tuple[str, Any]]:
    return list(ffi.typeof(f"struct {name}").fields or [])


def _field_size(ffi: Any, ctype: Any) -> int | None:
    if ctype.kind == "array" and ctype.length is None:
        return None
    return int(ffi.sizeof(ctype))


def _complete(name: str) -> bool:
    """Whether the aarch64 cdef declares ``struct name`` in full (no ``...;``)."""
    try:
        ARM_FFI.sizeof(f"struct {name}")
    except VerificationMissing:
        return False
    return True


def _field_list(name: str) -> tuple[Any, list[tuple[str, Any]]]:
    """The cdef's fields of a struct, with the ffi that knows their types."""
    if _complete(name):
        return ARM_FFI, _fields(ARM_FFI, name)
    if name in SHARED_STRUCTS:
        return host_ffi, _fields(host_ffi, name)
    return ARM_FFI, []


def _probe_items() -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for s in STRUCTS:
        items += [(f"sizeof {s}", f"sizeof(struct {s})"),
                  (f"alignof {s}", f"_Alignof(struct {s})")]
        ffi, fields = _field_list(s)
        for name, field in fields:
            items.append((f"offsetof {s}.{name}", f"offsetof(struct {s}, {name})"))
            if _field_size(ffi, field.type) is not None:
                items.append((f"fieldsize {s}.{name}", f"sizeof(((struct {s} *)0)->{name})"))
    for m in RUN_MEMBERS:
        base = f"offsetof(struct kvm_run, {m})"
        items += [(f"run.offsetof {m}", base),
                  (f"run.sizeof {m}", f"sizeof(((struct kvm_run *)0)->{m})")]
        for name, _ in _fields(ARM_FFI, f"kvmio_exit_{m}"):
            items += [(f"run.offsetof {m}.{name}",
                       f"offsetof(struct kvm_run, {m}.{name}) - {base}"),
                      (f"run.fieldsize {m}.{name}", f"sizeof(((struct kvm_run *)0)->{m}.{name})")]
    items += [(f"const {c}", c) for c in CONSTANTS]
    items += [(f"header-has {g}", f"KVMIO_PROBE_HDR_{g}") for g, _ in FALLBACK_BLOCKS]
    items.append(("header-has KVM_DIRTY_LOG_PAGE_OFFSET", "KVMIO_PROBE_ASM_OFFSET"))
    return items


def _probe_source(items: list[tuple[str, str]]) -> str:
    """A C file whose ``.kvmio_probe`` section is [MAGIC, count, value...] (int64, native order)."""
    lines = ["#ifndef __aarch64__", '#error "not an aarch64 compiler"', "#endif",
             # <asm/kvm.h> alone first: <linux/kvm.h> defaults the offset to 0 when it is absent.
             "#include <asm/kvm.h>", "#ifdef KVM_DIRTY_LOG_PAGE_OFFSET",
             "#define KVMIO_PROBE_ASM_OFFSET 1", "#else", "#define KVMIO_PROBE_ASM_OFFSET 0",
             "#endif"]
    lines += re.findall(r"^#include <[^>]+>$", SOURCE, re.M)
    for guard, body in FALLBACK_BLOCKS:
        lines += [f"#ifdef {guard}", f"#define KVMIO_PROBE_HDR_{guard} 1", "#else",
                  f"#define KVMIO_PROBE_HDR_{guard} 0", "#endif",
                  f"#ifndef {guard}", body.rstrip("\n"), "#endif"]
    lines += ['__attribute__((used, aligned(8), section(".kvmio_probe")))',
              "const long long kvmio_probe[] = {",
              f"    {MAGIC}LL, {len(items)},"]
    lines += [f"    (long long)({expr}),  /* {key} */" for key, expr in items]
    lines += ["};", ""]
    return "\n".join(lines)


def _resolve(cc: str, header: str, *args: str) -> Path | None:
    """Where ``cc`` finds ``<header>`` (from the preprocessor's line markers), or None."""
    r = subprocess.run([cc, *args, "-E", "-x", "c", "-"], input=f"#include <{header}>\n",
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    for path in re.findall(r'^# \d+ "([^"]+)"', r.stdout, re.M):
        if path.endswith("/" + header):
            return Path(path)
    return None


@pytest.fixture(scope="module")
def cross() -> dict[str, Any]:
    """The cross toolchain and the arm64 headers it finds (skip, or fail under CI, if absent)."""
    problem = None
    if CC is None or OBJCOPY is None:
        problem = f"{TRIPLET}-gcc/-objcopy not found"
    else:
        headers = {h: _resolve(CC, h) for h in ("stdio.h", "linux/kvm.h", "asm/kvm.h")}
        missing = [h for h, p in headers.items() if p is None]
        foreign = [f"{h} ({p})" for h, p in headers.items() if p and TRIPLET not in str(p)]
        if missing:
            problem = f"{TRIPLET}-gcc finds no {', '.join(missing)}"
        elif foreign:
            # e.g. only the host's /usr/include (which the Debian cross gcc also searches).
            problem = f"{TRIPLET}-gcc takes {', '.join(foreign)} from outside the arm64 sysroot"
    if problem:
        msg = f"no arm64 cross toolchain: {problem} (apt-get install {PACKAGES})"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}")
        pytest.skip(msg)
    assert CC is not None and OBJCOPY is not None
    return {"cc": CC, "objcopy": OBJCOPY, **headers}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, cross: dict[str, Any]) -> dict[str, Any]:
    """The emitted aarch64 cffi source and include dirs shadowing the arm64 <asm/kvm.h>:
    ``ring`` (the ring offset defined, adding upstream's definition if the headers lack it) and
    ``stripped`` (the ring offset removed), plus a pyconfig.h shim."""
    d = tmp_path_factory.mktemp("arm64")
    c_file = d / "_native_aarch64.c"
    ARM_FFI.emit_c_code(str(c_file))
    text = cross["asm/kvm.h"].read_text()
    stripped = OFFSET_RE.sub("", text)
    if stripped == text:
        # Linux >= 6.2 arm64 <asm/kvm.h>: right after KVM_COALESCED_MMIO_PAGE_OFFSET.
        ring, n = re.subn(r"^#define KVM_COALESCED_MMIO_PAGE_OFFSET.*\n",
                          r"\g<0>#define KVM_DIRTY_LOG_PAGE_OFFSET 64\n", text, flags=re.M)
        assert n == 1
    else:
        ring = text
    for name, content in (("ring", ring), ("stripped", stripped)):
        (d / name / "asm").mkdir(parents=True)
        (d / name / "asm" / "kvm.h").write_text(content)
    # Python.h: the host's headers are fine for a syntax check (x86_64 and aarch64 are both LP64
    # and little-endian).  A Debian-packaged Python's pyconfig.h is a dispatcher that includes
    # <aarch64-linux-gnu/python3.X/pyconfig.h> under __aarch64__: provide that as the host's.
    shim = d / "pyshim" / TRIPLET / f"python{sysconfig.get_python_version()}"
    shim.mkdir(parents=True)
    shutil.copy(sysconfig.get_config_h_filename(), shim / "pyconfig.h")
    return {"c": c_file, "ring": d / "ring", "stripped": d / "stripped", "pyshim": d / "pyshim",
            "dir": d}


def _compile(cross: dict[str, Any], c_file: Path, *include_dirs: Path,
             extra: tuple[str, ...] = ("-fsyntax-only",)) -> subprocess.CompletedProcess[str]:
    args = [cross["cc"], "-std=gnu11", "-Wall", *extra]
    args += [f"-I{d}" for d in include_dirs] + [str(c_file)]
    return subprocess.run(args, capture_output=True, text=True)


def _errors(stderr: str) -> list[str]:
    """gcc's error lines (not the source excerpts it quotes under them)."""
    return re.findall(r"^\S.*?: (?:fatal )?error: .*$", stderr, re.M)


@pytest.fixture(scope="module")
def probe(cross: dict[str, Any], workdir: dict[str, Any]) -> dict[str, int]:
    """The arm64 numbers, read from the probe object (stock arm64 headers)."""
    d: Path = workdir["dir"]
    items = _probe_items()
    src, obj, raw = d / "probe.c", d / "probe.o", d / "probe.bin"
    src.write_text(_probe_source(items))
    r = _compile(cross, src, extra=("-c", "-O0", "-o", str(obj)))
    assert r.returncode == 0, f"arm64 probe does not compile ({src}):\n{r.stderr}"
    subprocess.run([cross["objcopy"], "-O", "binary", "--only-section=.kvmio_probe", str(obj),
                    str(raw)], check=True, capture_output=True)
    data = raw.read_bytes()
    assert len(data) == 8 * (len(items) + 2), f"unexpected .kvmio_probe size {len(data)}"
    magic, count, *values = struct.unpack(f"<{len(items) + 2}q", data)
    assert (magic, count) == (MAGIC, len(items)), "bad .kvmio_probe section"
    result = dict(zip((k for k, _ in items), values, strict=True))
    assert len(result) == len(items), "probe keys are not unique"
    return result


def _compare(probe: dict[str, int], expected: dict[str, int]) -> None:
    bad = {k: (probe.get(k), v) for k, v in expected.items() if probe.get(k) != v}
    assert not bad, "arm64 gcc vs expected (key: arm64 != expected):\n" + "\n".join(
        f"  {k}: {g} != {v}" for k, (g, v) in sorted(bad.items()))


# --------------------------------------------------------------------------- the toolchain


def test_headers_are_the_arm64_ones(cross: dict[str, Any], probe: dict[str, int]) -> None:
    for header in ("stdio.h", "linux/kvm.h", "asm/kvm.h"):
        assert TRIPLET in str(cross[header]), cross[header]
    assert probe["sizeof kvm_regs"] == 864  # not x86_64's 144


def test_arm64_cdef_is_the_common_one() -> None:
    assert ARM_CDEF == CDEF_COMMON
    assert "KVM_GET_SUPPORTED_CPUID" not in CONSTANTS
    assert {"kvm_regs", "kvm_sregs", "kvm_fpu", "kvm_run", "kvm_dirty_gfn"} <= set(STRUCTS)


# --------------------------------------------------------------------------- arm64 ABI facts


def test_arm64_abi_facts(probe: dict[str, int]) -> None:
    _compare(probe, {
        "sizeof kvm_regs": 864,  # user_pt_regs, sp_el1, elr_el1, spsr[5], user_fpsimd_state
        "alignof kvm_regs": 16,  # __uint128_t vregs[32]
        "sizeof kvm_sregs": 0,  # empty on arm64 (GNU C)
        "sizeof kvm_fpu": 0,
        "sizeof kvm_dirty_gfn": 16,
        "sizeof kvm_run": 2352,
        "run.offsetof io": 32,
        "const KVMIO": 0xAE,
        "const KVM_RUN": 0xAE80,
        "const KVM_RESET_DIRTY_RINGS": 0xAEC7,
        "const KVM_CAP_DIRTY_LOG_RING": 192,
        "const KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
        "const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    })


def test_arm64_dirty_log_page_offset(cross: dict[str, Any], probe: dict[str, int]) -> None:
    """Headers with arm64's dirty ring (Linux >= 6.2) define the offset as 64.  Older ones
    (Debian 12's 6.1) lack it, so <linux/kvm.h> defaults it to 0: the probe sees 0, and kvmio's
    #error refuses to build (test_stock_headers_build_outcome checks the build fails)."""
    if probe["header-has KVM_DIRTY_LOG_PAGE_OFFSET"]:
        assert probe["const KVM_DIRTY_LOG_PAGE_OFFSET"] == 64
    else:
        assert probe["const KVM_DIRTY_LOG_PAGE_OFFSET"] == 0
        assert "KVM_DIRTY_LOG_PAGE_OFFSET" not in Path(cross["asm/kvm.h"]).read_text()


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", [s for s in STRUCTS if s not in ARCH_STRUCTS])
def test_struct_layout(probe: dict[str, int], name: str) -> None:
    """Fully declared structs: arm64 gcc == cffi's own layout (what cffi checks at import time on
    arm64).  Shared structs: arm64 gcc == the host's compiled module.  (The opaque ARCH_STRUCTS
    are checked by test_arm64_abi_facts.)"""
    sources = [ffi for ffi, ok in ((ARM_FFI, _complete(name)), (host_ffi, name in SHARED_STRUCTS))
               if ok]
    assert sources, f"struct {name}: nothing to compare with"
    for ffi in sources:
        expected = {f"sizeof {name}": ffi.sizeof(f"struct {name}"),
                    f"alignof {name}": ffi.alignof(f"struct {name}")}
        for fname, field in _fields(ffi, name):
            expected[f"offsetof {name}.{fname}"] = field.offset
            size = _field_size(ffi, field.type)
            if size is not None:
                expected[f"fieldsize {name}.{fname}"] = size
        _compare(probe, expected)


@pytest.mark.parametrize("member", RUN_MEMBERS)
def test_run_union_member(probe: dict[str, int], member: str) -> None:
    view = f"kvmio_exit_{member}"
    expected = {f"run.offsetof {member}": int(host_lib.kvmio_run_union_offset()),
                f"run.sizeof {member}": ARM_FFI.sizeof(f"struct {view}")}
    for name, field in _fields(ARM_FFI, view):
        expected[f"run.offsetof {member}.{name}"] = field.offset
        expected[f"run.fieldsize {member}.{name}"] = ARM_FFI.sizeof(field.type)
    _compare(probe, expected)


# --------------------------------------------------------------------------- constants


def _ioctl_with_size(request: int, size: int) -> int:
    """``request`` with its _IOC size field (14 bits at 16, asm-generic) replaced by ``size``."""
    return (request & ~(0x3FFF << 16)) | (size << 16)


def test_constants(probe: dict[str, int]) -> None:
    """Every constant equals the host module's, but for the ioctls encoding an arm-specific size
    (which must then encode the arm64 size) and the ring offset (test_arm64_dirty_log_page_offset).
    """
    expected = {}
    for c in CONSTANTS:
        if c == "KVM_DIRTY_LOG_PAGE_OFFSET":
            continue
        value = int(getattr(host_lib, c))
        if c in SIZED_IOCTLS:
            value = _ioctl_with_size(value, probe[f"sizeof {SIZED_IOCTLS[c]}"])
        expected[f"const {c}"] = value
    _compare(probe, expected)


def test_fallbacks_have_known_upstream_values(probe: dict[str, int]) -> None:
    names = [n for _, body in FALLBACK_BLOCKS for n in re.findall(r"^#define (\w+)", body, re.M)]
    assert sorted(names) == sorted(UPSTREAM), "SOURCE's #ifndef fallbacks changed"
    _compare(probe, {f"const {n}": v for n, v in UPSTREAM.items()})


# --------------------------------------------------------------------------- the cffi C source


def test_cffi_source_compiles_against_arm64_headers(cross: dict[str, Any],
                                                    workdir: dict[str, Any]) -> None:
    """The generated source, with cffi's field and type checks, builds for aarch64 (-O2 -fPIC -c,
    as setuptools would), given an <asm/kvm.h> that defines the ring offset.  Without a single
    warning: cffi checks integer fields only for being integers (their sizes are compared at
    import, which test_struct_layout stands in for), and a pointer or array field of the wrong
    type is only an -Wincompatible-pointer-types warning with gcc < 14."""
    py_include = Path(sysconfig.get_paths()["include"])
    r = _compile(cross, workdir["c"], workdir["ring"], workdir["pyshim"], py_include,
                 extra=("-c", "-O2", "-fPIC", "-o", str(workdir["dir"] / "_native_aarch64.o")))
    assert r.returncode == 0, r.stderr
    assert "warning:" not in r.stderr, r.stderr


def test_stock_headers_build_outcome(cross: dict[str, Any], workdir: dict[str, Any],
                                     probe: dict[str, int]) -> None:
    """With the installed arm64 headers as they are: builds if they define the ring offset,
    otherwise fails with exactly kvmio's #error (Debian 12's linux-libc-dev-arm64-cross 6.1)."""
    py_include = Path(sysconfig.get_paths()["include"])
    r = _compile(cross, workdir["c"], workdir["pyshim"], py_include)
    if probe["header-has KVM_DIRTY_LOG_PAGE_OFFSET"]:
        assert r.returncode == 0, r.stderr
        assert "warning:" not in r.stderr, r.stderr
    else:
        assert r.returncode != 0
        errors = _errors(r.stderr)
        assert len(errors) == 1 and "#error" in errors[0] and GUARD_MESSAGE in errors[0], r.stderr


def test_build_refuses_missing_dirty_log_page_offset(cross: dict[str, Any],
                                                     workdir: dict[str, Any]) -> None:
    py_include = Path(sysconfig.get_paths()["include"])
    r = _compile(cross, workdir["c"], workdir["stripped"], workdir["pyshim"], py_include)
    assert r.returncode != 0
    errors = _errors(r.stderr)
    assert len(errors) == 1, r.stderr
    assert "#error" in errors[0]
    assert GUARD_MESSAGE in errors[0]



# --------------------------------------------------------------------------- memory ordering

#: A load-acquire into a 32-bit register (``flags`` is a u32): LDAR (ARMv8.0), or the RCpc
#: forms LDAPR / LDAPUR that gcc may pick when the target has them (all are acquire loads).
ACQUIRE_LOADS = ("ldar", "ldapr", "ldapur")
#: A store-release from a 32-bit register: STLR, or STLUR (RCpc, with an offset).
RELEASE_STORES = ("stlr", "stlur")
BRANCHES = re.compile(r"^(?:b|b\.\w+|cbz|cbnz|tbz|tbnz)$")
#: The ring functions and what their loops must do: load the entries' flags with a
#: load-acquire; store a value to them with a store-release (2 is KVM_DIRTY_GFN_F_RESET, 1 is
#: KVM_DIRTY_GFN_F_DIRTY); and whether one loop does both (takes entries one by one: acquire,
#: copy, release) rather than separate loops (skip_hole scans, then marks).  Checked by
#: instruction kind within the function's loops, not by instruction sequence or count, so that
#: reshaping a loop (or adding checks around it) does not break the test, while losing an
#: ordering does.
ORDERING: dict[str, tuple[bool, int | None, bool]] = {
    # name: (acquire load, release-stored value, both in one loop)
    "kvmio_ring_harvest": (True, 2, True),
    "kvmio_ring_sweep": (True, 2, True),
    "kvmio_ring_harvest_reference": (True, 2, True),
    "kvmio_ring_skip_hole": (True, 2, False),
    "kvmio_ring_mark_harvested": (False, 2, False),
    "kvmio_ring_count_dirty": (True, None, False),
    "kvmio_ring_fill": (False, 1, False),
}
INSN_RE = re.compile(r"^\s*([0-9a-f]+):\t(\S+)(?:\s+(.*?))?\s*$")
FUNC_RE = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
BRANCH_TARGET_RE = re.compile(r"(?:^|, )([0-9a-f]+) <")


@dataclass(frozen=True)
class Insn:
    address: int
    mnemonic: str
    operands: str

    @property
    def first_reg(self) -> str:
        return self.operands.split(",")[0].strip()


@pytest.fixture(scope="module")
def objdump(cross: dict[str, Any]) -> str:
    """``aarch64-linux-gnu-objdump`` (skip, or fail under CI, if absent)."""
    if OBJDUMP is None:
        msg = (f"no {TRIPLET}-objdump to disassemble the arm64 ring functions "
               f"(apt-get install binutils-{TRIPLET}, which gcc-{TRIPLET} normally pulls in)")
        if IN_CI:
            pytest.fail(f"CI=true but {msg}")
        pytest.skip(msg)
    return OBJDUMP


@pytest.fixture(scope="module")
def disassembly(cross: dict[str, Any], workdir: dict[str, Any],
                objdump: str) -> dict[str, list[list[Insn]]]:
    """The cffi source compiled for aarch64 as setuptools compiles it (-O2 -fPIC), disassembled:
    function name -> the instructions of the function and of each of its compiler clones
    (``name.part.0``, ``name.constprop.0``...)."""
    obj = workdir["dir"] / "_native_aarch64_ordering.o"
    py_include = Path(sysconfig.get_paths()["include"])
    r = _compile(cross, workdir["c"], workdir["ring"], workdir["pyshim"], py_include,
                 extra=("-c", "-O2", "-fPIC", "-o", str(obj)))
    assert r.returncode == 0, r.stderr
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(obj)], capture_output=True,
                         text=True, check=True).stdout
    functions: dict[str, list[list[Insn]]] = {}
    body: list[Insn] | None = None
    for line in out.splitlines():
        if m := FUNC_RE.match(line):
            body = []
            functions.setdefault(m.group(1).split(".")[0], []).append(body)
        elif (m := INSN_RE.match(line)) and body is not None:
            body.append(Insn(int(m.group(1), 16), m.group(2), m.group(3) or ""))
    return functions


def _loops(body: list[Insn]) -> list[list[Insn]]:
    """The instructions of every loop: from a backward branch's target to the branch."""
    loops = []
    for b in body:
        m = BRANCH_TARGET_RE.search(b.operands) if BRANCHES.match(b.mnemonic) else None
        if m and int(m.group(1), 16) <= b.address:
            start = int(m.group(1), 16)
            loops.append([i for i in body if start <= i.address <= b.address])
    return loops


def _stored_constant(body: list[Insn], store: Insn) -> set[int]:
    """The constants that ``body`` moves into the register a store writes from."""
    reg = store.first_reg
    if reg == "wzr":
        return {0}
    return {int(m.group(1), 0) for i in body if i.mnemonic == "mov" and i.first_reg == reg
            for m in [re.search(r"#(-?(?:0x)?[0-9a-f]+)$", i.operands)] if m}


def _describe(bodies: list[list[Insn]]) -> str:
    return "\n".join(f"  {i.address:6x}: {i.mnemonic} {i.operands}" for b in bodies for i in b)


@pytest.mark.parametrize("name", sorted(ORDERING))
def test_ring_loops_keep_acquire_release_on_arm64(disassembly: dict[str, list[list[Insn]]],
                                                   name: str) -> None:
    """arm64 is weakly ordered: without a load-acquire of ``flags``, the reads of ``slot`` and
    ``offset`` may be satisfied before it and see the previous lap's values; without a
    store-release of RESET, the RESET may become visible before those reads are done, and the
    kernel may recycle and rewrite the entry under them.  So a loop of each function must do
    its acquire loads / release stores of the 32-bit flags, a release store must write the
    right flag value, and the harvesting loops must do both in the same loop."""
    assert name in disassembly, f"{name} is not in the arm64 object"
    bodies = disassembly[name]
    acquire, value, one_loop = ORDERING[name]
    loops = [loop for body in bodies for loop in _loops(body)]
    assert loops, f"{name} has no loop in its arm64 code:\n{_describe(bodies)}"

    def acq(i: Insn) -> bool:
        return i.mnemonic in ACQUIRE_LOADS and i.first_reg.startswith("w")

    def rel(i: Insn) -> bool:
        return i.mnemonic in RELEASE_STORES and i.first_reg[0] == "w"

    if acquire:
        assert any(acq(i) for loop in loops for i in loop), (
            f"{name}: no load-acquire (ldar/ldapr) of a 32-bit value in any loop: the flags are "
            f"read with a plain load\n{_describe(bodies)}")
    if value is not None:
        stores = [(body, i) for body in bodies for loop in _loops(body) for i in loop if rel(i)]
        assert stores, (f"{name}: no store-release (stlr) of a 32-bit value in any loop: the "
                        f"flags are written with a plain store\n{_describe(bodies)}")
        assert any(value in _stored_constant(body, i) for body, i in stores), (
            f"{name}: no store-release in a loop writes {value}\n{_describe(bodies)}")
    if one_loop:
        assert any(any(acq(i) for i in loop) and any(rel(i) for i in loop) for loop in loops), (
            f"{name}: no loop both load-acquires and store-releases\n{_describe(bodies)}")
