"""The checkpoint-reset benchmark (kvmio.resetbench) behind ``kvmio bench reset``: its guests and
configuration checks, the cycles it reports, and that it refuses to time a reset that does
not restore what the guest wrote.  (The command itself: tests/test_cli.py.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvmio import Kvm, KvmError, KvmInvalidArgumentError
from kvmio.resetbench import (
    DEFAULT_GUESTS,
    FILL,
    MAX_DIRTY,
    MAX_MEMORY,
    ResetBench,
    ResetGuest,
    ResetMode,
    check_config,
    measure_resets,
    planned_cycles,
    repeats_for,
)

MIB = 1 << 20
GIB = 1 << 30


def test_guests_are_named_by_size_and_sparseness() -> None:
    assert [g.label for g in DEFAULT_GUESTS] == ["64 MiB", "1 GiB", "64 GiB sparse"]
    g = ResetGuest.of(64 * GIB)
    assert (g.populated, g.sparse, g.pages, g.populated_pages) == (GIB, True, 16 << 20, 1 << 18)
    assert g.describe() == "64 GiB sparse (1 GiB populated)"
    assert ResetGuest.of(64 * MIB) == ResetGuest(64 * MIB, 64 * MIB)
    assert ResetGuest.of(64 * MIB).describe() == "64 MiB"


@pytest.mark.parametrize(("size", "populated", "match"), [
    (0, 0, "between 4 KiB and 256 GiB"),
    (MAX_MEMORY + 4096, 4096, "between 4 KiB and 256 GiB"),
    (4096, 8192, "must be between 4 KiB and the guest's size"),
    (64 * MIB, 0, "must be between 4 KiB and the guest's size"),
    (5000, 4096, "not a multiple of a page"),
    (True, 4096, "must be an int"),
])
def test_a_guest_that_cannot_be_is_refused(size: int, populated: int, match: str) -> None:
    with pytest.raises(KvmInvalidArgumentError, match=match):
        ResetGuest(size, populated)


@pytest.mark.parametrize(("kw", "match"), [
    ({"dirty": []}, "must not be empty"),
    ({"dirty": [0]}, f"between 1 and {MAX_DIRTY}"),
    ({"dirty": [MAX_DIRTY + 1]}, f"between 1 and {MAX_DIRTY}"),
    ({"dirty": [4097]}, r"do not fit the 1 GiB sparse \(16 MiB populated\) guest \(4096 "),
    ({"modes": ["log"]}, "mode must be one of ring, bitmap"),
    ({"repeat": 0}, "repeat must be a positive int"),
])
def test_a_configuration_that_cannot_run_is_refused(kw: dict[str, object], match: str) -> None:
    config: dict[str, object] = {"guests": [ResetGuest(GIB, 16 * MIB)], "dirty": [1],
                                 "modes": ["ring"], "repeat": 3, **kw}
    with pytest.raises(KvmInvalidArgumentError, match=match):
        check_config(**config)  # type: ignore[arg-type]


def test_large_dirty_sets_take_a_third_of_the_repeats() -> None:
    assert [repeats_for(n, 21) for n in (1, 9_999, 10_000, MAX_DIRTY)] == [21, 21, 7, 7]
    assert [repeats_for(10_000, r) for r in (1, 2, 5, 9, 30)] == [1, 2, 3, 3, 10]
    assert planned_cycles(DEFAULT_GUESTS, [1, 10_000], ["ring"], 21) == 3 * ((1 + 42) + (1 + 14))


def test_progress_reports_every_planned_cycle(kvm: Kvm) -> None:
    guests = [ResetGuest(16 * MIB, 16 * MIB), ResetGuest(GIB, 4 * MIB)]
    modes: list[ResetMode] = ["ring", "bitmap"]
    starts: list[tuple[str, str, int]] = []
    cycles = 0
    cells = []

    def on_cycle(mode: ResetMode, guest: ResetGuest, n: int, done: int) -> None:
        nonlocal cycles
        if done == 0:
            starts.append((mode, guest.label, n))
        cycles += done

    got = measure_resets(kvm, guests, [3, 1], modes=modes, repeat=2, progress=cells.append,
                         on_cycle=on_cycle)
    assert got == cells and len(cells) == 8
    assert cycles == planned_cycles(guests, [3, 1], modes, 2) == 8 * 5
    assert starts == [(c.mode, c.guest, c.dirty) for c in cells]
    assert [c.guest for c in cells[:4]] == ["16 MiB", "16 MiB", "1 GiB sparse", "1 GiB sparse"]
    for c in cells:
        assert c.restored > c.dirty and c.repeats == 2


def test_a_callback_that_raises_ends_the_benchmark(kvm: Kvm) -> None:
    cells = []

    def stop_in_second_cell(mode: ResetMode, guest: ResetGuest, n: int, done: int) -> None:
        if cells and done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_resets(kvm, [ResetGuest(16 * MIB, 16 * MIB)], [1, 2], modes=["ring"],
                       repeat=2, progress=cells.append, on_cycle=stop_in_second_cell)
    assert [c.dirty for c in cells] == [1]


def test_a_reset_that_leaves_a_written_page_changed_is_not_timed(kvm: Kvm) -> None:
    with ResetBench(kvm, "ring", ResetGuest(16 * MIB, 16 * MIB)) as b:
        chosen: list[int] = []
        choose, reset = b.choose, b.checkpoint.reset

        def remember(n: int) -> Any:
            pages = choose(n)
            chosen.extend(pages.tolist())
            return pages

        def leaky_reset() -> Any:
            st = reset()
            b.mem.array()[chosen[-1] * 4096 + 100] = FILL ^ 1  # a write the reset "missed"
            return st

        b.choose = remember  # type: ignore[method-assign]
        b.checkpoint.reset = leaky_reset  # type: ignore[method-assign]
        with pytest.raises(KvmError, match="1 of the 5 pages the guest wrote differ"):
            b.measure(5, 2)


def test_a_kick_during_a_guest_run_is_reported_and_the_run_goes_on(kvm: Kvm) -> None:
    kicks = 0

    def on_interrupted() -> None:
        nonlocal kicks
        kicks += 1

    with ResetBench(kvm, "bitmap", ResetGuest(16 * MIB, 16 * MIB),
                    on_interrupted=on_interrupted) as b:
        pages = b.choose(1000)
        b.vcpu.kick()  # never lost: the next run returns Interrupted at once
        b.dirty(pages)
        assert kicks == 1
        written = b.mem.array().reshape(-1, 4096)[pages.astype(np.intp), :8].view("<u8")
        assert (written[:, 0] == np.arange(1, 1001)).all()  # every write, once, in order


def test_a_whole_checkpoint_can_take_over_the_memory(kvm: Kvm) -> None:
    # bench/checkpoint.py: the whole checkpoint needs the dirty log the bench's own holds.
    from kvmio.snapshot import Checkpoint

    with ResetBench(kvm, "ring", ResetGuest(16 * MIB, 16 * MIB)) as b, \
            ResetBench(kvm, "ring", ResetGuest(16 * MIB, 16 * MIB)) as other:
        with pytest.raises(KvmInvalidArgumentError, match="another VM"):
            b.use(other.checkpoint)
        b.checkpoint.close()
        with Checkpoint.take(b.vm) as ck:
            b.use(ck.memory)
            cell = b.measure(3, 1)
            assert cell.restored > 3 and b.checkpoint is ck.memory
