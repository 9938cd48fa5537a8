"""The compiled dedup (ring entries -> sorted distinct pages per slot) against a brute-force
model (Python sets), for every shape of input: one slot or many (more than the native grouping
holds), sorted runs, reversed runs, repeats, random pages, pages spread over 256 GiB, offsets
up to 2**52."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmio.dirty.pages import PageSet
from kvmio.dirty.ring import DirtyEntries
from kvmio.memory import SlotId


def model(slots: list[int], offsets: list[int]) -> dict[int, tuple[list[int], int]]:
    out: dict[int, tuple[set[int], int]] = {}
    for s, o in zip(slots, offsets, strict=True):
        pages, n = out.get(s, (set(), 0))
        pages.add(o)
        out[s] = (pages, n + 1)
    return {s: (sorted(p), n) for s, (p, n) in out.items()}


@st.composite
def entries(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    nslots = draw(st.sampled_from([1, 1, 2, 3, 70]))
    slot_ids = draw(st.lists(st.integers(0, (1 << 16) | 0x7FFF), min_size=nslots,
                             max_size=nslots, unique=True))
    n = draw(st.sampled_from([0, 1, 2, 31, 32, 33, 100, 5000, 70000]))
    shape = draw(st.sampled_from(["sequential", "reversed", "random", "repeats", "spread",
                                  "wide"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if shape == "sequential":
        offs = np.arange(n, dtype=np.uint64) + np.uint64(draw(st.integers(0, 1 << 30)))
    elif shape == "reversed":
        offs = np.arange(n, dtype=np.uint64)[::-1].copy()
    elif shape == "random":
        offs = rng.integers(0, 1 << 18, n, dtype=np.uint64)
    elif shape == "spread":  # a 256 GiB slot: 26 bits, split in even radix passes
        offs = rng.integers(0, 1 << 26, n, dtype=np.uint64)
    elif shape == "repeats":
        offs = rng.integers(0, 8, n, dtype=np.uint64)
    else:
        offs = rng.integers(0, 1 << 52, n, dtype=np.uint64)
    if nslots == 1:
        slots = np.full(n, slot_ids[0], dtype=np.uint32)
    else:
        slots = np.array(slot_ids, dtype=np.uint32)[rng.integers(0, nslots, n)]
    return slots.tolist(), offs.tolist()


@settings(max_examples=150, deadline=None)
@given(entries())
def test_slot_groups_match_a_brute_force_model(data: tuple[list[int], list[int]]) -> None:
    slots, offsets = data
    e = DirtyEntries(np.array(slots, dtype=np.uint32), np.array(offsets, dtype=np.uint64))
    got = {raw: (pages.tolist(), n) for raw, pages, n in e.slot_groups()}
    assert got == model(slots, offsets)
    for _, pages, _ in e.slot_groups():
        assert not pages.flags.writeable


@settings(max_examples=60, deadline=None)
@given(entries(), st.integers(0, 1 << 20))
def test_page_sets_from_entries_drop_what_lies_outside(data: tuple[list[int], list[int]],
                                                       size: int) -> None:
    slots, offsets = data
    e = DirtyEntries(np.array(slots, dtype=np.uint32), np.array(offsets, dtype=np.uint64))
    known = {SlotId.decode(s).slot for s in slots[:1] if SlotId.decode(s).address_space == 0}
    sizes = dict.fromkeys(known, size)
    ps, dropped = PageSet.from_entries(e, sizes)
    want: dict[int, list[int]] = {}
    want_dropped = 0
    for s, o in zip(slots, offsets, strict=True):
        sid = SlotId.decode(s)
        if sid.address_space != 0 or sid.slot not in sizes or o >= size:
            want_dropped += 1
        else:
            want.setdefault(sid.slot, []).append(o)
    assert dropped == want_dropped
    assert {s: ps[s].tolist() for s in ps} == {s: sorted(set(v)) for s, v in want.items()}


def test_results_survive_the_next_call() -> None:
    """Pages handed out stay intact while held, even though the buffers are pooled."""
    a = DirtyEntries(np.zeros(70000, dtype=np.uint32), np.arange(70000, dtype=np.uint64))
    first = a.slot_groups()[0][1]
    b = DirtyEntries(np.zeros(70000, dtype=np.uint32),
                     np.arange(70000, dtype=np.uint64) + np.uint64(1 << 40))
    for _ in range(3):
        b.slot_groups()
    assert np.array_equal(first, np.arange(70000, dtype=np.uint64))
