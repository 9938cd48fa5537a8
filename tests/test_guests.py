"""Built-in guests: the committed bytes match their sources; workload parameters are checked."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmio import Kvm, KvmInvalidArgumentError
from kvmio.guests.programs import names, program
from kvmio.guests.workload import DirtierParams, Workload

ROOT = Path(__file__).resolve().parent.parent


def test_blobs_match_sources() -> None:
    assert shutil.which("as") and shutil.which("ld"), "binutils come with gcc"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "assemble_guests.py"), "--check"])
    assert r.returncode == 0, "run tools/assemble_guests.py: _blobs.py is stale"


def test_programs_have_source() -> None:
    assert {"hello", "dirtier", "burst", "probe32", "probe64", "fpu"} <= set(names())
    for n in names():
        p = program(n)
        assert p.code and "kvmio-guest" in p.source
    with pytest.raises(KvmInvalidArgumentError, match="no built-in guest"):
        program("nope")


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"pages": 0}, "at least one page"), ({"stride": 0}, "stride"), ({"seed": 0}, "seed"),
     ({"offset": 4}, "offset"), ({"pace": -1}, "pace"), ({"port": 0xFFFF}, "port")])
def test_params_validation(kw: dict[str, int], match: str) -> None:
    base = {"base": 1 << 30, "pages": 16}
    base.update(kw)
    with pytest.raises(KvmInvalidArgumentError, match=match):
        DirtierParams(**base).pack()  # type: ignore[arg-type]


def test_workload_argument_errors(kvm: Kvm) -> None:
    for kw, match in [({"vcpus": 0}, r"vcpus must be 1\.\.16"),
                      ({"vcpus": 17}, r"vcpus must be 1\.\.16"),
                      ({"mem_size": 1000}, "mem_size must be a positive multiple"),
                      ({"working_set": 1 << 40}, "working_set must be between"),
                      ({"mem_size": 1 << 40}, "too large for the workload's page tables")]:
        with pytest.raises(KvmInvalidArgumentError, match=match):
            Workload(kvm, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_workload_counts_and_patterns(kvm: Kvm, order: str) -> None:
    with Workload(kvm, mem_size=8 << 20, working_set=64 * 4096, order=order, value="count",
                  max_writes=300, report_every=100, stride=3) as w:
        progress: list[int] = []
        ex = w.run_vcpu(0, on_progress=lambda i, n: progress.append(n))
        assert type(ex).__name__ == "Hlt"
        assert w.writes(0) == 300 and progress == [100, 200, 300]
        words = w.mem.page_words()
        assert words[64:].max() == 0  # nothing outside the working set
        assert words.max() == 300  # value = running count: the last write
        if order == "sequential":
            # stride 3 over 64 pages: write k goes to page (3k) mod 64
            assert words[(3 * 299) % 64] == 300


def test_workload_reaches_memory_above_64_gib(kvm: Kvm) -> None:
    """The workload gives its vCPUs the host's CPUID: with KVM's default (36 physical address
    bits) a write above 64 GiB would become an MMIO exit instead of a memory write."""
    with Workload(kvm, mem_size=128 << 30, order="sequential", stride=(127 << 30) // 4096,
                  value="count", max_writes=2) as w:
        assert type(w.run_vcpu(0)).__name__ == "Hlt"
        assert w.writes(0) == 2
        top = (127 << 30) // 4096
        assert w.mem.page_words()[top] == 2


def test_workload_memory_avoids_the_apic_page(kvm: Kvm) -> None:
    """On this host a guest write to page 0xFEE00000 always exits as MMIO (the xAPIC's default
    base), so a workload whose slot would cover it is placed at 4 GiB instead."""
    from kvmio.guests.workload import APIC_PAGE, HIGH_MEM_BASE, MEM_BASE

    with Workload(kvm, mem_size=1 << 30) as w:
        assert w.mem.guest_phys_addr == w.mem_base == MEM_BASE
    with Workload(kvm, mem_size=4 << 30, order="sequential", stride=(4 << 30) // 4096 - 1,
                  value="count", max_writes=2, ring_entries=4096) as w:
        assert w.mem.guest_phys_addr == w.mem_base == HIGH_MEM_BASE > APIC_PAGE
        assert type(w.run_vcpu(0)).__name__ == "Hlt"
        last = (4 << 30) // 4096 - 1
        assert w.mem.page_words()[last] == 2
        assert w.vm.collect_dirty_pages().pages[w.mem.slot].tolist() == [0, last]
