"""The command line: info, demo, dirtyrate (workload and kernel, JSON and plot), bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kvmio import Kvm
from kvmio.cli import main

from test_multiboot import make_elf

# A multiboot kernel (32-bit, at 1 MiB) that sweeps [4 MiB, 32 MiB) writing one word per page,
# with ~23 instructions per write (safe for the ring on this host), forever.
SWEEPER = bytes([
    0xBF, 0x00, 0x00, 0x40, 0x00,        # 0: mov edi, 0x400000
    0x89, 0x3F,                          # 5: mov [edi], edi
    0x81, 0xC7, 0x00, 0x10, 0x00, 0x00,  # 7: add edi, 0x1000
    0xB9, 0x08, 0x00, 0x00, 0x00,        # 13: mov ecx, 8
    0x49,                                # 18: dec ecx
    0x75, 0xFD,                          # 19: jnz 18
    0x81, 0xFF, 0x00, 0x00, 0x00, 0x02,  # 21: cmp edi, 0x2000000
    0x72, 0xE8,                          # 27: jb 5
    0xEB, 0xE1,                          # 29: jmp 0
])


def _png(path: Path, width: int, height: int) -> None:
    import matplotlib.image

    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (height, width)
    flat = img[..., :3].reshape(-1, 3)
    assert flat.std() > 0.05  # not blank
    assert len(np.unique((flat * 255).astype(int), axis=0)) > 20  # lines, colours, heatmap


def test_info(kvm: Kvm) -> None:
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    for word in ("API version 12", "DIRTY_LOG_RING_ACQ_REL", "65536", "MANUAL_DIRTY_LOG_PROTECT2",
                 "MAX_VCPUS", "NR_MEMSLOTS"):
        assert word in r.output


def test_missing_device_is_a_clean_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["--device", str(tmp_path / "nokvm"), "info"])
    assert r.exit_code == 1 and "does not exist" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("ring", ["4096", "0"])
def test_demo(kvm: Kvm, ring: str) -> None:
    r = CliRunner().invoke(main, ["demo", "--writes", "3000", "--mem", "64", "--ring", ring])
    assert r.exit_code == 0, r.output
    assert "Hello from a kvmio guest!" in r.output
    assert "reported == written" in r.output and "yes" in r.output
    assert "3,000" in r.output


def test_dirtyrate_workload_json_and_plot(kvm: Kvm, tmp_path: Path) -> None:
    j, png = tmp_path / "rate.json", tmp_path / "rate.png"
    r = CliRunner().invoke(main, ["dirtyrate", "--mem", "256M", "--vcpus", "2", "--duration",
                                  "1.2", "--window", "0.5", "--json", str(j), "--plot",
                                  str(png)])
    assert r.exit_code == 0, r.output
    assert "mean dirty rate" in r.output and "guest's own count" in r.output
    data = json.loads(j.read_text())
    assert data["config"]["mode"] == "ring" and data["config"]["vcpus"] == 2
    assert len(data["samples"]) >= 10
    s = data["samples"][-1]
    assert set(s["vcpu_pages_per_second"]) == {"0", "1"}
    assert s["bytes_per_second"] == pytest.approx(s["pages_per_second"] * 4096)
    assert data["summary"]["mean_pages_per_second"] > 10_000
    assert len(data["heatmap_counts"]) == len(data["heatmap_times"]) == len(data["samples"])
    assert data["guest_writes"] > 0
    _png(png, 1000, 700)


def test_dirtyrate_bitmap_mode(kvm: Kvm) -> None:
    r = CliRunner().invoke(main, ["dirtyrate", "--mode", "bitmap", "--mem", "64M",
                                  "--duration", "0.5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mean dirty rate" in r.output


def test_dirtyrate_kernel(kvm: Kvm, tmp_path: Path) -> None:
    kernel = tmp_path / "sweeper.elf"
    kernel.write_bytes(make_elf([(0x100000, SWEEPER, len(SWEEPER))], 0x100000))
    j = tmp_path / "k.json"
    r = CliRunner().invoke(main, ["dirtyrate", "--kernel", str(kernel), "--mem", "64M",
                                  "--duration", "1", "--window", "0.5", "--quiet",
                                  "--json", str(j)])
    assert r.exit_code == 0, r.output
    data = json.loads(j.read_text())
    assert data["config"]["guest"] == str(kernel)
    assert "timeout" in data["stop"]
    # The kernel writes only [4 MiB, 32 MiB): 7168 distinct pages at most per full window.
    late = [s["pages_per_second"] for s in data["samples"] if s["time"] >= 0.6]
    assert late and all(1000 < r <= 7168 / 0.5 * 1.05 for r in late)
    counts = np.array(data["heatmap_counts"]).sum(axis=0)
    lo, hi = data["heatmap_span"]
    edges = np.linspace(lo, hi, len(counts) + 1)
    assert counts[edges[1:] <= 4 << 20].sum() == 0  # nothing below 4 MiB
    assert counts[edges[:-1] >= 32 << 20].sum() == 0  # nothing above 32 MiB


@pytest.mark.parametrize(
    ("args", "match"),
    [(["dirtyrate", "--mem", "lots"], "Invalid value for '--mem'"),
     (["dirtyrate", "--duration", "0"], "Invalid value for '--duration'"),
     (["dirtyrate", "--kernel", "/nonexistent/kernel", "--duration", "0.2"], "cannot read"),
     (["dirtyrate", "--working-set", "2G", "--mem", "1G"], "working_set"),
     (["bench", "ring-vs-bitmap", "--mem", "16K", "--dirty", "1000"], "do not fit")])
def test_bad_arguments(kvm: Kvm, args: list[str], match: str) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert match in r.output and "Traceback" not in r.output


def test_bench_ring_vs_bitmap(kvm: Kvm, tmp_path: Path) -> None:
    png, j = tmp_path / "bench.png", tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", "ring-vs-bitmap", "--mem", "1G", "--mem", "64G",
                                  "--dirty", "256", "--dirty", "2048", "--repeat", "1",
                                  "--plot", str(png), "--json", str(j)])
    assert r.exit_code == 0, r.output
    cells = json.loads(j.read_text())
    assert len(cells) == 2 * 2 * 2
    for c in cells:
        assert c["pages_found"] == c["dirty"]  # both modes find exactly the dirty set
    assert "faster" in r.output
    _png(png, 900, 550)


def test_dirtyrate_as_a_real_process(kvm: Kvm, tmp_path: Path) -> None:
    j = tmp_path / "p.json"
    env = dict(os.environ, COLUMNS="100")
    p = subprocess.run([sys.executable, "-m", "kvmio.cli", "dirtyrate", "--mem", "128M",
                        "--duration", "0.6", "--json", str(j)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "mean dirty rate" in p.stdout
    assert json.loads(j.read_text())["summary"]["samples"] >= 5


@pytest.mark.parametrize("guest", ["workload", "kernel"])
def test_measurement_interrupted_by_ctrl_c_carries_the_partial_report(kvm: Kvm, tmp_path: Path,
                                                                     guest: str) -> None:
    import threading

    from kvmio.dirtyrate import MeasurementInterrupted, measure_kernel, measure_workload
    from kvmio.tracker import DirtyTracker

    before = set(threading.enumerate())
    calls = 0

    def progress(tracker: DirtyTracker, elapsed: float) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # Ctrl-C, as the main thread receives it, while the guest runs
            raise KeyboardInterrupt

    with pytest.raises(MeasurementInterrupted) as e:
        if guest == "kernel":
            kernel = tmp_path / "sweeper.elf"
            kernel.write_bytes(make_elf([(0x100000, SWEEPER, len(SWEEPER))], 0x100000))
            measure_kernel(kvm, str(kernel), mem=64 << 20, duration=30, progress=progress)
        else:
            measure_workload(kvm, mem=64 << 20, vcpus=2, duration=30, progress=progress)
    assert isinstance(e.value, KeyboardInterrupt)
    report = e.value.report
    assert report.interrupted and report.stop == "interrupted"
    assert report.samples and report.duration < 20
    assert report.to_json()["interrupted"] is True
    assert set(threading.enumerate()) <= before  # the vCPU, tracker and kernel threads joined
