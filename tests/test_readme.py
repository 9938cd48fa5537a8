"""The README's Python examples run as written (on the real /dev/kvm)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from kvmio import Kvm

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example(kvm: Kvm, code: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    text = out.getvalue()
    if "Checkpoint" in code:
        assert re.fullmatch(r"\{'ring': 100\} \d+ us per reset \(p50\)\n", text), text
    elif "IoOut" in code:
        assert "IoOut(port=233" in text and "Hlt()" in text and "1 [5]" in text
    elif "DirtyLimit" in code:
        assert text.split() == ["True", "True", "True"], text
    elif "DirtyTracker" in code:
        assert text.strip() == "True True"
    elif "snapshotter" in code:
        assert text.split() == ["diff", "../full", "True", "5000"]
    else:
        assert "distinct pages from 10000 ring entries" in text


def test_guarantees_name_real_tests() -> None:
    """Every test the guarantees section names as a proof exists (a renamed or deleted test
    would leave a guarantee unproven without anyone noticing)."""
    text = README.read_text()
    section = text[text.index("## Dirty tracking: what kvmio guarantees"):]
    section = section[:section.index("\n## ", 1)]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", section)
    assert len(named) >= 20
    tests = README.parent / "tests"
    for module, name in named:
        source = (tests / module).read_text()
        assert re.search(rf"^(def {name}\(|{name} = )", source, re.M), f"{module}::{name} is gone"
