"""Shared fixtures.  KVM tests need /dev/kvm: without it they skip with the reason, except
under CI=true, where a missing or unusable /dev/kvm fails the run instead."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmio import Kvm, KvmError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The device the KVM tests need (overridable, so that the skip/fail policy itself is testable).
DEVICE = os.environ.get("KVMIO_TEST_DEVICE", "/dev/kvm")


def _kvm_problem() -> str | None:
    try:
        Kvm(DEVICE).close()
    except KvmError as e:
        return str(e)
    return None


_PROBLEM = _kvm_problem()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _PROBLEM is not None and "kvm" in item.keywords:
        if IN_CI:
            pytest.fail(f"CI=true but /dev/kvm is not usable: {_PROBLEM}", pytrace=False)
        pytest.skip(f"no usable /dev/kvm: {_PROBLEM}")


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """An open /dev/kvm (the test is marked ``kvm`` automatically)."""
    k = Kvm(DEVICE)
    try:
        yield k
    finally:
        k.close()


def pytest_itemcollected(item: pytest.Item) -> None:
    if "kvm" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.kvm)
