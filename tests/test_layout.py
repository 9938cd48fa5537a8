"""Layout test: what ``kvmio._native`` reports against what gcc says about <linux/kvm.h>.

cffi already asks the compiler for the layout of every ``...;`` struct, so this test is a second,
independent opinion: a probe program is generated from the cdef itself (struct list, field lists
from ``ffi.typeof(...).fields``, every ``#define X ...``), compiled with the system gcc straight
against the kernel headers (not through cffi), run, and every number it prints is compared with
``ffi``/``lib``.  A few absolute facts of the kernel ABI are checked as well, independently of both
compilers, and the build's ``#error`` guard for a missing ``KVM_DIRTY_LOG_PAGE_OFFSET`` is shown to
fire (and only it) when <asm/kvm.h> loses that definition.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmio._abi import ffi, lib
from kvmio._native_build import SOURCE, cdef_for, make_builder

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
GCC = shutil.which("gcc")
#: Whether the compiled module has the x86_64 declarations (which cdef it was built from).
IS_X86 = hasattr(lib, "KVM_GET_SUPPORTED_CPUID")
CDEF = cdef_for("x86_64" if IS_X86 else "aarch64")

#: The structs the cdef declares (kernel ones, then kvmio's own views of kvm_run's exit union).
STRUCTS = sorted({s for s in re.findall(r"^struct (\w+) \{", CDEF, re.M) if s.startswith("kvm_")})
VIEWS = sorted({s for s in re.findall(r"^struct (kvmio_exit_\w+) \{", CDEF, re.M)})
#: kvm_run exit-union members that kvmio reads through its views (``struct kvmio_exit_<member>``).
RUN_MEMBERS = ("io", "mmio", "internal", "system_event", "fail_entry", "hw")
#: Every ``#define X ...`` of the cdef, except kvmio's own KVMIO_* constants (KVMIO itself is the
#: kernel's ioctl type and is checked).
CONSTANTS = [c for c in re.findall(r"^#define (\w+) \.\.\.$", CDEF, re.M)
             if not c.startswith("KVMIO_")]

#: The guarded fallbacks in SOURCE: ``#ifndef GUARD`` ... ``#endif`` blocks, verbatim.
FALLBACK_BLOCKS = re.findall(r"^#ifndef (\w+)\n(.*?)^#endif\n", SOURCE, re.M | re.S)
#: Upstream values (include/uapi/linux/kvm.h) of every constant SOURCE may supply itself.
UPSTREAM = {
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    "KVM_EXIT_DIRTY_RING_FULL": 31,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,  # _IO(KVMIO, 0xc7)
    "KVM_DIRTY_GFN_F_DIRTY": 1,
    "KVM_DIRTY_GFN_F_RESET": 2,
}

#: The structs the layout test must cover at the least (a new cdef struct is picked up by itself).
EXPECTED_STRUCTS = {
    "kvm_userspace_memory_region", "kvm_enable_cap", "kvm_dirty_log", "kvm_clear_dirty_log",
    "kvm_dirty_gfn", "kvm_irq_level", "kvm_clock_data", "kvm_mp_state", "kvm_regs", "kvm_sregs",
    "kvm_fpu", "kvm_run",
}
EXPECTED_X86_STRUCTS = {
    "kvm_segment", "kvm_dtable", "kvm_msr_entry", "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2",
    "kvm_cpuid2", "kvm_xcr", "kvm_xcrs", "kvm_pit_config", "kvm_lapic_state", "kvm_xsave",
    "kvm_vcpu_events", "kvm_debugregs", "kvm_pic_state", "kvm_ioapic_state", "kvm_irqchip",
    "kvm_pit_channel_state", "kvm_pit_state2",
}
#: Members cffi is not asked to model, which kvmio reaches through C helpers (x86): key, C
#: expression, and the lib function that must agree.
HELPER_MEMBERS = [
    ("irqchip.offsetof chip", "offsetof(struct kvm_irqchip, chip)", "kvmio_irqchip_data_offset"),
    ("irqchip.sizeof chip", "sizeof(((struct kvm_irqchip *)0)->chip)",
     "kvmio_irqchip_data_size"),
]


def _fields(struct: str) -> list[tuple[str, Any]]:
    return list(ffi.typeof(f"struct {struct}").fields or [])


def _field_size(ctype: Any) -> int | None:
    """The field's size, or None for a flexible array member (which has none)."""
    if ctype.kind == "array" and ctype.length is None:
        return None
    return int(ffi.sizeof(ctype))


def _fallback_names() -> dict[str, list[str]]:
    """guard -> the names its block defines."""
    return {guard: re.findall(r"^#define (\w+)", body, re.M) for guard, body in FALLBACK_BLOCKS}


def _probe_items() -> list[tuple[str, str]]:
    """(key, C integer expression) pairs: everything the probe reports."""
    items: list[tuple[str, str]] = []
    for s in STRUCTS:
        items += [(f"sizeof {s}", f"sizeof(struct {s})"),
                  (f"alignof {s}", f"_Alignof(struct {s})")]
        for name, field in _fields(s):
            items.append((f"offsetof {s}.{name}", f"offsetof(struct {s}, {name})"))
            if _field_size(field.type) is not None:
                items.append((f"fieldsize {s}.{name}", f"sizeof(((struct {s} *)0)->{name})"))
    for m in RUN_MEMBERS:
        base = f"offsetof(struct kvm_run, {m})"
        items += [(f"run.offsetof {m}", base),
                  (f"run.sizeof {m}", f"sizeof(((struct kvm_run *)0)->{m})")]
        for name, field in _fields(f"kvmio_exit_{m}"):
            items.append((f"run.offsetof {m}.{name}",
                          f"offsetof(struct kvm_run, {m}.{name}) - {base}"))
            if _field_size(field.type) is not None:
                items.append((f"run.fieldsize {m}.{name}",
                              f"sizeof(((struct kvm_run *)0)->{m}.{name})"))
    items += [(f"const {c}", c) for c in CONSTANTS]
    if IS_X86:
        items += [(key, expr) for key, expr, _ in HELPER_MEMBERS]
    return items


def _probe_source(items: list[tuple[str, str]]) -> str:
    """A C program printing ``key value`` lines, built on SOURCE's includes and fallbacks."""
    lines = re.findall(r"^#include <[^>]+>$", SOURCE, re.M)
    lines += ["#include <stdio.h>", ""]
    for guard, body in FALLBACK_BLOCKS:
        # Record whether the header had the name before the fallback (same text) supplies it.
        lines += [f"#ifdef {guard}", f"#define KVMIO_PROBE_HDR_{guard} 1", "#else",
                  f"#define KVMIO_PROBE_HDR_{guard} 0", "#endif",
                  f"#ifndef {guard}", body.rstrip("\n"), "#endif"]
    lines += ["", "int main(void)", "{"]
    for key, expr in items:
        lines.append(f'    printf("%s %lld\\n", "{key}", (long long)({expr}));')
    for guard, _ in FALLBACK_BLOCKS:
        lines.append(f'    printf("%s %d\\n", "header-has {guard}", KVMIO_PROBE_HDR_{guard});')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _need_gcc() -> str:
    if GCC is None:
        msg = "gcc is not installed (the layout probe is compiled with the system gcc)"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}")
        pytest.skip(msg)
    return GCC


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """The probe's output (compiled and run once per module)."""
    gcc = _need_gcc()
    d = tmp_path_factory.mktemp("layout")
    src, exe = d / "probe.c", d / "probe"
    items = _probe_items()
    src.write_text(_probe_source(items))
    cc = subprocess.run([gcc, "-std=gnu11", "-O0", "-Wall", "-o", str(exe), str(src)],
                        capture_output=True, text=True)
    assert cc.returncode == 0, f"probe does not compile ({src}):\n{cc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        values[key] = int(value)
    assert len(values) == len(items) + len(FALLBACK_BLOCKS), "probe keys are not unique"
    return values


def _compare(probe: dict[str, int], expected: dict[str, int]) -> None:
    bad = {k: (probe.get(k), v) for k, v in expected.items() if probe.get(k) != v}
    assert not bad, "gcc vs kvmio (key: (gcc, kvmio)):\n" + "\n".join(
        f"  {k}: {g} != {v}" for k, (g, v) in sorted(bad.items()))


# --------------------------------------------------------------------------- structs


def test_cdef_declares_the_expected_structs() -> None:
    expected = EXPECTED_STRUCTS | (EXPECTED_X86_STRUCTS if IS_X86 else set())
    assert expected <= set(STRUCTS), f"missing from the cdef: {sorted(expected - set(STRUCTS))}"
    assert {f"kvmio_exit_{m}" for m in RUN_MEMBERS} == set(VIEWS)


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_layout(probe: dict[str, int], struct: str) -> None:
    expected = {f"sizeof {struct}": ffi.sizeof(f"struct {struct}"),
                f"alignof {struct}": ffi.alignof(f"struct {struct}")}
    for name, field in _fields(struct):
        expected[f"offsetof {struct}.{name}"] = field.offset
        size = _field_size(field.type)
        if size is not None:
            expected[f"fieldsize {struct}.{name}"] = size
    _compare(probe, expected)


def test_every_declared_field_is_probed(probe: dict[str, int]) -> None:
    # kvm_run's fields come from the cdef: a struct with fields must have had them all probed.
    for struct in STRUCTS:
        for name, _ in _fields(struct):
            assert f"offsetof {struct}.{name}" in probe
    assert len(_fields("kvm_run")) >= 8


# --------------------------------------------------------------------------- kvm_run's union


@pytest.mark.parametrize("member", RUN_MEMBERS)
def test_run_union_member(probe: dict[str, int], member: str) -> None:
    view = f"struct kvmio_exit_{member}"
    expected = {f"run.offsetof {member}": int(lib.kvmio_run_union_offset()),
                f"run.sizeof {member}": ffi.sizeof(view)}
    for name, field in _fields(f"kvmio_exit_{member}"):
        expected[f"run.offsetof {member}.{name}"] = field.offset
        size = _field_size(field.type)
        if size is not None:
            expected[f"run.fieldsize {member}.{name}"] = size
    _compare(probe, expected)


@pytest.mark.parametrize("member", RUN_MEMBERS)
def test_run_union_accessor(member: str) -> None:
    run = ffi.new("struct kvm_run *")
    base = int(ffi.cast("uintptr_t", run))
    view = getattr(lib, f"kvmio_run_{member}")(run)
    assert ffi.typeof(view) is ffi.typeof(f"struct kvmio_exit_{member} *")
    assert int(ffi.cast("uintptr_t", view)) - base == lib.kvmio_run_union_offset()


@pytest.mark.skipif(not IS_X86, reason="struct kvm_irqchip is x86-only")
def test_irqchip_union_helpers(probe: dict[str, int]) -> None:
    _compare(probe, {key: int(getattr(lib, fn)()) for key, _, fn in HELPER_MEMBERS})
    chip = ffi.new("struct kvm_irqchip *")
    offset = int(ffi.cast("uintptr_t", lib.kvmio_irqchip_data(chip))) - int(
        ffi.cast("uintptr_t", chip))
    assert offset == probe["irqchip.offsetof chip"]
    assert offset + probe["irqchip.sizeof chip"] == ffi.sizeof("struct kvm_irqchip")


# --------------------------------------------------------------------------- constants


def test_constants(probe: dict[str, int]) -> None:
    missing = [c for c in CONSTANTS if not hasattr(lib, c)]
    assert not missing, f"declared in the cdef but absent from lib: {missing}"
    _compare(probe, {f"const {c}": int(getattr(lib, c)) for c in CONSTANTS})


def test_constant_list_is_complete() -> None:
    # The regexp must see the whole cdef: every ``#define`` line is a ``...`` one.
    assert len(CONSTANTS) + len(re.findall(r"^#define KVMIO_\w+ \.\.\.$", CDEF, re.M)) == len(
        re.findall(r"^#define ", CDEF, re.M))
    assert {"KVMIO", "KVM_RUN", "KVM_CAP_DIRTY_LOG_RING", "MAP_NORESERVE"} <= set(CONSTANTS)


def test_fallbacks_have_known_upstream_values(probe: dict[str, int]) -> None:
    names = [n for ns in _fallback_names().values() for n in ns]
    assert names, "no #ifndef fallback found in SOURCE"
    assert sorted(names) == sorted(UPSTREAM), (
        "SOURCE's #ifndef fallbacks changed: give each one its upstream value in UPSTREAM")
    for name in names:
        assert int(getattr(lib, name)) == UPSTREAM[name], name
        assert probe[f"const {name}"] == UPSTREAM[name], name


# --------------------------------------------------------------------------- ABI facts


def test_abi_facts(probe: dict[str, int]) -> None:
    facts = {
        "sizeof kvm_dirty_gfn": 16,
        "sizeof kvm_run": 2352,  # 32 + 256 (exit union) + 2 * 8 + 2048 (sync regs)
        "run.offsetof io": 32,
        "const KVMIO": 0xAE,
        "const KVM_RUN": 0xAE80,
        "const KVM_RESET_DIRTY_RINGS": 0xAEC7,
        "const KVM_CAP_DIRTY_LOG_RING": 192,
        "const KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
        "const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
        "const KVM_DIRTY_LOG_PAGE_OFFSET": 64,
    }
    if IS_X86:
        facts |= {"sizeof kvm_regs": 144, "alignof kvm_regs": 8, "sizeof kvm_sregs": 312,
                  "sizeof kvm_pic_state": 16, "sizeof kvm_pit_state2": 112,
                  "sizeof kvm_irqchip": 520, "irqchip.offsetof chip": 8,
                  "irqchip.sizeof chip": 512, "const KVM_IRQCHIP_PIC_MASTER": 0,
                  "const KVM_IRQCHIP_PIC_SLAVE": 1, "const KVM_IRQCHIP_IOAPIC": 2}
    _compare(probe, facts)
    assert ffi.sizeof("struct kvm_dirty_gfn") == 16
    assert ffi.sizeof("struct kvm_run") == 2352
    assert lib.KVM_RUN == 0xAE80
    assert lib.KVM_RESET_DIRTY_RINGS == 0xAEC7
    assert lib.KVM_DIRTY_LOG_PAGE_OFFSET == 64
    if IS_X86:
        assert ffi.sizeof("struct kvm_regs") == 144


# --------------------------------------------------------------------------- the #error guard


def _real_header(gcc: str, header: str) -> Path:
    """Where ``gcc`` finds ``<header>`` (read from the preprocessor's line markers)."""
    pp = subprocess.run([gcc, "-E", "-x", "c", "-"], input=f"#include <{header}>\n",
                        capture_output=True, text=True, check=True).stdout
    for path in re.findall(r'^# \d+ "([^"]+)"', pp, re.M):
        if path.endswith("/" + header):
            return Path(path)
    raise AssertionError(f"{gcc} does not find <{header}>")


@pytest.fixture(scope="module")
def guard_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The real cffi C source, and two include dirs shadowing <asm/kvm.h>: an exact copy, and a
    copy without its KVM_DIRTY_LOG_PAGE_OFFSET definition."""
    gcc = _need_gcc()
    d = tmp_path_factory.mktemp("guard")
    c_file = d / "_native.c"
    make_builder("x86_64" if IS_X86 else "aarch64").emit_c_code(str(c_file))
    real = _real_header(gcc, "asm/kvm.h")
    text = real.read_text()
    stripped, n = re.subn(r"^[ \t]*#[ \t]*define[ \t]+KVM_DIRTY_LOG_PAGE_OFFSET\b.*\n", "", text,
                          flags=re.M)
    assert n == 1, f"{real} defines KVM_DIRTY_LOG_PAGE_OFFSET {n} times"
    for name, content in (("copy", text), ("stripped", stripped)):
        (d / name / "asm").mkdir(parents=True)
        (d / name / "asm" / "kvm.h").write_text(content)
    yield {"c": c_file, "copy": d / "copy", "stripped": d / "stripped", "real": real}


def _syntax_check(c_file: Path, *include_dirs: Path) -> subprocess.CompletedProcess[str]:
    python_include = sysconfig.get_paths()["include"]
    args = [_need_gcc(), "-std=gnu11", "-Wall", "-fsyntax-only"]
    args += [f"-I{d}" for d in include_dirs] + [f"-I{python_include}", str(c_file)]
    return subprocess.run(args, capture_output=True, text=True)


def _errors(stderr: str) -> list[str]:
    """gcc's error lines (not the source excerpts it quotes under them)."""
    return re.findall(r"^\S.*?: (?:fatal )?error: .*$", stderr, re.M)


def test_native_source_compiles_with_real_headers(guard_setup: dict[str, Path]) -> None:
    # Without a single warning: with gcc < 14, a field whose declared pointer or array type
    # disagrees with the header is only an -Wincompatible-pointer-types warning in cffi's checks.
    for dirs in ((), (guard_setup["copy"],)):
        r = _syntax_check(guard_setup["c"], *dirs)
        assert r.returncode == 0, r.stderr
        assert "warning:" not in r.stderr, r.stderr


def test_build_refuses_missing_dirty_log_page_offset(guard_setup: dict[str, Path]) -> None:
    r = _syntax_check(guard_setup["c"], guard_setup["stripped"])
    assert r.returncode != 0
    errors = _errors(r.stderr)
    assert len(errors) == 1, r.stderr
    assert "#error" in errors[0]
    assert "lacks KVM_DIRTY_LOG_PAGE_OFFSET" in errors[0]


def test_native_stub_is_current() -> None:
    """The typed stub of kvmio._native is generated from the cffi declarations."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "gen_native_stub.py"), "--check"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
