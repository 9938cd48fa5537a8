"""The suite's policy for KVM tests: skip with a reason without /dev/kvm, fail under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(ci: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVMIO_TEST_DEVICE="/nonexistent/kvm", CI=ci)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{HERE / 'test_system.py'}::test_api_version_and_sizes",
         f"{HERE / 'test_system.py'}::test_missing_device_is_clear_error"],
        capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=120)


@pytest.mark.parametrize("ci", ["", "false"])
def test_kvm_tests_skip_outside_ci(ci: str) -> None:
    r = _run(ci)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 1 skipped" in r.stdout
    assert "no usable /dev/kvm" in r.stdout and "does not exist" in r.stdout


def test_kvm_tests_fail_under_ci() -> None:
    r = _run("true")
    assert r.returncode == 1, r.stdout
    assert "1 passed, 1 error" in r.stdout  # a failure in setup: the test cannot run
    assert "CI=true but /dev/kvm is not usable" in r.stdout
