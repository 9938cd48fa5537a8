"""The QEMU comparison benchmark's verifier (bench/qemu_migration.py): its guest kernel
builds and keeps the ascending-increment shape on a real VM, and the check counts exactly the
pages that break the shape (a page left behind, one written ahead, one corrupted)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from kvmio import Kvm
from kvmio.guests.multiboot import KernelRunner, MultibootMachine


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "qemu_migration.py"
    spec = importlib.util.spec_from_file_location("qemu_migration", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("qemu_migration", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("values", "broken"), [
    ([5, 5, 5, 5], 0),
    ([6, 6, 5, 5], 0),
    ([6, 5, 5, 5], 0),
    ([6, 5, 6, 5], 1),     # one page left behind (or one ahead)
    ([6, 6, 4, 5], 1),     # a page two steps behind
    ([9, 6, 6, 5], 1),     # a corrupted page
    ([5, 6, 6, 6], 1),
    ([], 0),
])
def test_the_shape_check_counts_the_pages_that_break_it(values: list[int], broken: int) -> None:
    assert _bench().broken_pages(np.array(values, dtype=np.uint32)) == broken


def test_the_guest_keeps_the_shape_and_a_lost_write_shows(kvm: Kvm, tmp_path: Path) -> None:
    b = _bench()
    kernel = b.build_kernel(tmp_path)
    pages = 4096
    with MultibootMachine(kvm, str(kernel), mem=64 << 20,
                          cmdline=f"load=dense pages={pages}") as m:
        with KernelRunner(m):
            end = time.monotonic() + 60
            while int.from_bytes(m.vm.read_memory(b.PASSES_AT, 4), "little") < 3:
                assert time.monotonic() < end, "the guest made no passes"
                time.sleep(0.01)
        words = b.area_words(m.vm.read_memory(b.AREA, pages * 4096), pages)
        assert int(words.max()) >= 3
        assert b.broken_pages(words) == 0
        # Writes the destination missed: one page two steps behind (never in the shape,
        # whichever side of the boundary it is on).
        i = pages // 2
        m.vm.write_memory(b.AREA + i * 4096, int(words[i] - 2).to_bytes(4, "little"))
        words = b.area_words(m.vm.read_memory(b.AREA, pages * 4096), pages)
        assert b.broken_pages(words) == 1
