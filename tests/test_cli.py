"""The command line: info, demo, dirtyrate (workload and kernel, JSON and plot), bench
(ring-vs-bitmap, reset)."""

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

from guests import wait_until
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


@pytest.mark.parametrize("command", [[], ["info"], ["demo"], ["run"], ["dirtyrate"],
                                     ["bench"], ["bench", "ring-vs-bitmap"], ["bench", "reset"],
                                     ["snapshot"],
                                     ["snapshot", "take"], ["snapshot", "inspect"],
                                     ["snapshot", "merge"], ["restore"], ["migrate"],
                                     ["migrate", "listen"], ["migrate", "send"]])
def test_help(command: list[str]) -> None:
    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Usage: ")


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
    # Against the guest's own count (random pages over 65,536: few repeats in a window), not
    # against a speed this host happens to have.
    own = data["summary"]["guest_writes_per_second"]
    assert 0.5 * own < data["summary"]["mean_pages_per_second"] <= 1.05 * own
    assert len(data["heatmap_counts"]) == len(data["heatmap_times"]) == len(data["samples"])
    assert data["guest_writes"] > 0
    _png(png, 1000, 700)


def test_dirtyrate_limit_json_and_plot(kvm: Kvm, tmp_path: Path) -> None:
    """--limit on one vCPU of two: the samples carry the limit series, the limited vCPU's
    rate comes down to its limit, the other runs free."""
    j, png = tmp_path / "limit.json", tmp_path / "limit.png"
    r = CliRunner().invoke(main, ["dirtyrate", "--mem", "2G", "--vcpus", "2", "--order",
                                  "sequential", "--duration", "3", "--limit", "4MiB/s",
                                  "--limit-vcpu", "1", "--json", str(j), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "vCPU 1: limit 4.0 MiB/s" in r.output
    data = json.loads(j.read_text())
    assert data["config"]["limit"] == 4 << 20 and data["config"]["limit_vcpu"] == 1
    assert all(s["limit_bytes_per_second"] == {"1": 4 << 20} for s in data["samples"])
    limit = data["extra"]["limit"]
    assert limit["changes"][0]["vcpu"] == 1 and limit["changes"][0]["bytes_per_second"] == 4 << 20
    assert limit["vcpus"]["1"]["throttled_seconds"] > 1.0
    assert limit["vcpus"]["0"]["limit"] is None and limit["vcpus"]["0"]["throttled_seconds"] == 0
    late = [s["vcpu_pages_per_second"] for s in data["samples"] if s["time"] >= 2.0]
    assert late
    for rates in late:  # the tracker's figure (test_limit.py holds it to the guest's counter)
        assert abs(rates["1"] * 4096 - (4 << 20)) < 0.3 * (4 << 20), rates
        assert rates["0"] > 3 * rates["1"]
    _png(png, 1000, 700)


def test_dirtyrate_kernel_under_a_limit(kvm: Kvm, tmp_path: Path) -> None:
    """A multiboot kernel's run loop is paced too: the sweeper (thousands of pages a second
    unlimited, see test_dirtyrate_kernel) stays under 2 MiB/s."""
    kernel = tmp_path / "sweeper.elf"
    kernel.write_bytes(make_elf([(0x100000, SWEEPER, len(SWEEPER))], 0x100000))
    j = tmp_path / "k.json"
    r = CliRunner().invoke(main, ["dirtyrate", "--kernel", str(kernel), "--mem", "64M",
                                  "--duration", "2.5", "--quiet", "--limit", "2M",
                                  "--json", str(j)])
    assert r.exit_code == 0, r.output
    data = json.loads(j.read_text())
    assert data["extra"]["limit"]["vcpus"]["0"]["throttled_seconds"] > 0.5
    late = [s for s in data["samples"] if s["time"] >= 1.5]
    assert late
    for s in late:  # distinct pages over the window: at most what the passes charged
        assert 0 < s["pages_per_second"] * 4096 < 1.3 * (2 << 20), s


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
    # The kernel writes only [4 MiB, 32 MiB): 7168 distinct pages at most in the span each
    # rate covers (the passes closest to the 0.5 s window).
    late = [s for s in data["samples"] if s["time"] >= 0.6]
    assert late and all(s["pages_per_second"] > 1000 for s in late)
    assert all(round(s["pages_per_second"] * s["span"]) <= 7168 for s in late)
    assert all(abs(s["span"] - 0.5) < 0.25 for s in late)
    counts = np.array(data["heatmap_counts"]).sum(axis=0)
    lo, hi = data["heatmap_span"]
    edges = np.linspace(lo, hi, len(counts) + 1)
    assert counts[edges[1:] <= 4 << 20].sum() == 0  # nothing below 4 MiB
    assert counts[edges[:-1] >= 32 << 20].sum() == 0  # nothing above 32 MiB


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [(["dirtyrate", "--mem", "lots"], 2, "Invalid value for '--mem'"),
     (["dirtyrate", "--duration", "0"], 2, "Invalid value for '--duration'"),
     (["dirtyrate", "--kernel", "/nonexistent/kernel", "--duration", "0.2"], 2,
      "does not exist"),
     (["dirtyrate", "--working-set", "2G", "--mem", "1G"], 2, "Invalid value for '--working-set'"),
     (["bench", "ring-vs-bitmap", "--mem", "16K", "--dirty", "1000"], 2, "do not fit"),
     (["demo", "--ring", "1024", "--writes", "1", "--mem", "1M"], 0, "reported == written"),
     (["--device", "/dev/null", "info"], 1, "Error: ")])
def test_bad_arguments(kvm: Kvm, args: list[str], code: int, match: str) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, r.output
    assert match in r.output and "Traceback" not in r.output


def test_bench_ring_vs_bitmap(kvm: Kvm, tmp_path: Path) -> None:
    png, j = tmp_path / "bench.png", tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", "ring-vs-bitmap", "--mem", "1G", "--mem", "64G",
                                  "--dirty", "256", "--dirty", "2048", "--repeat", "1",
                                  "--plot", str(png), "--json", str(j)])
    assert r.exit_code == 0, r.output
    data = json.loads(j.read_text())
    assert data["interrupted"] is False
    assert data["config"] == {"mems": [1 << 30, 64 << 30], "dirty": [256, 2048], "repeat": 1}
    cells = data["cells"]
    assert len(cells) == 2 * 2 * 2
    for c in cells:
        assert c["pages_found"] == c["dirty"]  # both modes find exactly the dirty set
    assert "faster" in r.output
    _png(png, 900, 550)


def test_bench_reset(kvm: Kvm, tmp_path: Path) -> None:
    png, j = tmp_path / "reset.png", tmp_path / "reset.json"
    r = CliRunner().invoke(main, ["bench", "reset", "--mem", "64M", "--dirty", "1", "--dirty",
                                  "10", "--repeat", "2", "--plot", str(png), "--json", str(j)])
    assert r.exit_code == 0, r.output
    data = json.loads(j.read_text())
    assert data["interrupted"] is False
    assert data["config"] == {"guests": [{"label": "64 MiB", "size": 64 << 20,
                                          "populated": 64 << 20}],
                              "dirty": [1, 10], "modes": ["ring", "bitmap"], "repeat": 2}
    cells = data["cells"]
    assert [(c["mode"], c["dirty"]) for c in cells] == [("ring", 1), ("ring", 10),
                                                        ("bitmap", 1), ("bitmap", 10)]
    for c in cells:
        assert (c["guest"], c["size"], c["populated"], c["repeats"]) == (
            "64 MiB", 64 << 20, 64 << 20, 2)
        # The pages the guest wrote, and besides them only its write list and the page-table
        # pages its writes mark accessed and dirty: not the 16,384 pages of the guest.
        assert c["dirty"] < c["restored"] <= c["dirty"] + 8, c
        assert 0 < c["collect_us"] <= c["reset_us"] and c["reset_cpu_us"] > 0
        assert c["full_copy_us"] > 0 and c["ratio"] == c["reset_us"] / c["full_copy_us"]
    assert "copy: the reference" in r.output and r.output.count(" dirty: reset ") == 4
    _png(png, 900, 550)


def test_bench_reset_sparse_guest_and_one_mode(kvm: Kvm, tmp_path: Path) -> None:
    j = tmp_path / "sparse.json"
    r = CliRunner().invoke(main, ["bench", "reset", "--mem", "64G", "--populated", "4M",
                                  "--dirty", "100", "--mode", "bitmap", "--repeat", "1",
                                  "--quiet", "--json", str(j)])
    assert r.exit_code == 0, r.output
    assert "dirty: reset" not in r.output  # --quiet: the table only
    [cell] = json.loads(j.read_text())["cells"]
    assert (cell["mode"], cell["guest"], cell["populated"]) == ("bitmap", "64 GiB sparse",
                                                                4 << 20)
    assert 100 < cell["restored"] < 1024  # not the whole of the 1,024 populated pages


def test_dirtyrate_json_marks_a_complete_run(kvm: Kvm, tmp_path: Path) -> None:
    j = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["dirtyrate", "--mem", "64M", "--duration", "0.3", "--quiet",
                                  "--json", str(j)])
    assert r.exit_code == 0, r.output
    data = json.loads(j.read_text())
    assert data["interrupted"] is False and data["stop"] == "duration reached"
    # Without --window the window is 1 s, or the duration if shorter.
    assert data["config"]["window"] == 0.3


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


# -- range checks: every numeric option, before anything runs ---------------------------------


def _no_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make opening /dev/kvm fail loudly: a usage error must come before it."""
    def refuse(ctx: object) -> None:
        raise AssertionError("the command started although its arguments are bad")

    for mod in ("info", "demo", "run", "dirtyrate", "bench", "migrate"):
        monkeypatch.setattr(f"kvmio.cli.{mod}.open_kvm", refuse, raising=False)


@pytest.mark.parametrize(("args", "option", "match"), [
    (["demo", "--writes", "0"], "--writes", "0 is not in the range 1<=x"),
    (["demo", "--writes", "-5"], "--writes", ""),
    (["demo", "--writes", "1e12"], "--writes", "not a valid integer"),
    (["demo", "--mem", "abc"], "--mem", "bad memory size 'abc'"),
    (["demo", "--mem", "0"], "--mem", "out of range"),
    (["demo", "--mem", "1T"], "--mem", "between 1 MiB and 512 GiB"),
    (["demo", "--mem", "1025K"], "--mem", "not a multiple of 4 KiB"),
    (["demo", "--ring", "1000"], "--ring", "not a power of two between 256 and 65536 (or 0"),
    (["demo", "--ring", "128"], "--ring", "power of two"),
    (["demo", "--ring", "131072"], "--ring", ""),
    (["run", "KERNEL", "--timeout", "nan"], "--timeout", "'nan' is not a finite number"),
    (["run", "KERNEL", "--timeout", "inf"], "--timeout", "not a finite number"),
    (["run", "KERNEL", "--timeout", "-inf"], "--timeout", "not a finite number"),
    (["run", "KERNEL", "--timeout", "-1"], "--timeout", ""),
    (["run", "KERNEL", "--timeout", "1e10"], "--timeout", ""),
    (["run", "KERNEL", "--mem", "4G"], "--mem", "between 2 MiB and 3 GiB"),
    (["run", "KERNEL", "--mem", "0"], "--mem", "out of range"),
    (["dirtyrate", "--interval", "1e10"], "--interval", ""),
    (["dirtyrate", "--interval", "nan"], "--interval", "not a finite number"),
    (["dirtyrate", "--interval", "2", "--duration", "1"], "--interval",
     "longer than --duration"),
    (["dirtyrate", "--interval", "0.5", "--window", "0.2"], "--interval",
     "longer than --window"),
    (["dirtyrate", "--window", "120"], "--window", ""),
    (["dirtyrate", "--window", "NaN"], "--window", "not a finite number"),
    (["dirtyrate", "--window", "2", "--duration", "1"], "--window", "longer than --duration"),
    (["dirtyrate", "--duration", "inf"], "--duration", "not a finite number"),
    (["dirtyrate", "--duration", "1e9"], "--duration", ""),
    (["dirtyrate", "--mem", "0"], "--mem", "out of range"),
    (["dirtyrate", "--mem", "1T"], "--mem", "between 1 MiB and 512 GiB"),
    (["dirtyrate", "--mem", "lots"], "--mem", "bad memory size"),
    (["dirtyrate", "--kernel", "KERNEL", "--mem", "4G"], "--mem",
     "out of range for a kernel: it must be between 2 MiB and 3 GiB"),
    (["dirtyrate", "--working-set", "0"], "--working-set", "out of range"),
    (["dirtyrate", "--working-set", "2G", "--mem", "1G"], "--working-set",
     "larger than --mem"),
    (["dirtyrate", "--vcpus", "0"], "--vcpus", ""),
    (["dirtyrate", "--pace", "-1"], "--pace", ""),
    (["dirtyrate", "--ring", "1000"], "--ring", "power of two"),
    (["dirtyrate", "--ring", "0"], "--ring", "power of two"),
    (["dirtyrate", "--limit", "0"], "--limit", "out of range"),
    (["dirtyrate", "--limit", "1K/s"], "--limit", "between 4 KiB/s and 1 TiB/s"),
    (["dirtyrate", "--limit", "nan"], "--limit", "bad rate"),
    (["dirtyrate", "--limit", "fast"], "--limit", "bad rate"),
    (["dirtyrate", "--limit-vcpu", "0"], "--limit-vcpu", "needs --limit"),
    (["dirtyrate", "--limit", "4M", "--limit-vcpu", "2", "--vcpus", "2"], "--limit-vcpu",
     "vCPU 2 does not exist: the guest has 2 vCPUs"),
    (["dirtyrate", "--kernel", "KERNEL", "--limit", "4M", "--limit-vcpu", "1"],
     "--limit-vcpu", "the guest has 1 vCPU"),
    (["dirtyrate", "--limit", "4M", "--limit-vcpu", "16"], "--limit-vcpu", ""),
    (["bench", "ring-vs-bitmap", "--repeat", "0"], "--repeat", ""),
    (["bench", "ring-vs-bitmap", "--dirty", "0"], "--dirty", ""),
    (["bench", "ring-vs-bitmap", "--dirty", "70000"], "--dirty", ""),
    (["bench", "ring-vs-bitmap", "--mem", "1T"], "--mem", "between 4 KiB and 512 GiB"),
    (["bench", "ring-vs-bitmap", "--mem", "16K", "--dirty", "1000"], "--mem", "do not fit"),
    (["bench", "reset", "--repeat", "0"], "--repeat", ""),
    (["bench", "reset", "--dirty", "0"], "--dirty", ""),
    (["bench", "reset", "--dirty", "20000"], "--dirty", "1<=x<=15360"),
    (["bench", "reset", "--mem", "512G"], "--mem", "between 1 MiB and 256 GiB"),
    (["bench", "reset", "--mem", "16M", "--dirty", "5000"], "--dirty",
     "5,000 dirty pages do not fit the 16 MiB guest (4,096 populated pages)"),
    (["bench", "reset", "--mem", "1G", "--populated", "4M", "--dirty", "2000"], "--dirty",
     "do not fit the 1 GiB sparse (4 MiB populated) guest (1,024 populated pages)"),
    (["bench", "reset", "--populated", "1K"], "--populated", "out of range"),
    (["bench", "reset", "--mode", "fast"], "--mode", "'fast' is not one of 'ring', 'bitmap'"),
])
def test_numeric_options_are_range_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           args: list[str], option: str, match: str) -> None:
    _no_kvm(monkeypatch)
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf([(0x100000, SWEEPER, len(SWEEPER))], 0x100000))
    r = CliRunner().invoke(main, [str(kernel) if a == "KERNEL" else a for a in args])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{option}'" in r.output and match in r.output, r.output
    assert "Traceback" not in r.output and r.exception is not None
    assert isinstance(r.exception, SystemExit)


def test_click_float_range_alone_would_let_nan_through() -> None:
    # Why kvmio has FiniteFloatRange: NaN compares false with every bound.
    import math

    import click

    from kvmio.cli.params import FiniteFloatRange

    assert math.isnan(click.FloatRange(0, 1).convert("nan", None, None))
    for bad in ("nan", "inf", "-inf", float("nan")):
        with pytest.raises(click.BadParameter, match="not a finite number"):
            FiniteFloatRange(0).convert(bad, None, None)
    assert FiniteFloatRange(0, 2).convert("1.5", None, None) == 1.5


def test_sizes_are_parsed_one_way() -> None:
    import click

    from kvmio.cli.params import Size, format_size
    from kvmio.units import parse_size

    size = Size(min=1 << 20, max=4 << 30, what="memory size")
    for text in ("128M", "1G", "64MiB", "512", "1.5G", "1048576B"):
        assert size.convert(text, None, None) == parse_size(text)
    assert size.convert(1 << 30, None, None) == 1 << 30  # a default given in bytes
    with pytest.raises(click.BadParameter, match="between 1 MiB and 4 GiB"):
        size.convert("5G", None, None)
    assert [format_size(n) for n in (3 << 30, 1536 << 10, 100, 0)] == [
        "3 GiB", "1536 KiB", "100 bytes", "0 bytes"]


# -- output files: checked before the guest starts --------------------------------------------


@pytest.mark.parametrize("command", [["dirtyrate", "--duration", "0.2"],
                                     ["bench", "ring-vs-bitmap", "--dirty", "16"],
                                     ["bench", "reset", "--dirty", "1"]])
@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize(("where", "match"), [
    ("missing/out", "does not exist"),
    ("adir", "is a directory"),
    ("file/out", "does not exist"),
    ("locked/out", "is not writable"),
])
def test_output_paths_are_checked_up_front(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           command: list[str], option: str, where: str,
                                           match: str) -> None:
    _no_kvm(monkeypatch)
    (tmp_path / "adir").mkdir()
    (tmp_path / "file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere: make the directory look unwritable instead of chmod-ing it.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(locked)
                        and real_access(p, mode, **kw))
    r = CliRunner().invoke(main, [*command, option, str(tmp_path / where)])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{option}'" in r.output and match in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("command", [["dirtyrate", "--duration", "0.2"],
                                     ["bench", "ring-vs-bitmap", "--dirty", "16"],
                                     ["bench", "reset", "--dirty", "1"]])
def test_plot_without_matplotlib_is_refused_up_front(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path,
                                                     command: list[str]) -> None:
    _no_kvm(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    r = CliRunner().invoke(main, [*command, "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--plot'" in r.output
    assert "matplotlib, which is not installed: pip install 'kvmio[plot]'" in r.output
    assert not (tmp_path / "p.png").exists()


def test_json_path_that_is_fine_is_accepted(kvm: Kvm, tmp_path: Path) -> None:
    j = tmp_path / "existing.json"
    j.write_text("old")
    r = CliRunner().invoke(main, ["bench", "ring-vs-bitmap", "--mem", "1G", "--dirty", "16",
                                  "--repeat", "1", "--json", str(j)])
    assert r.exit_code == 0, r.output
    assert json.loads(j.read_text())["cells"]


# -- the error boundary -----------------------------------------------------------------------


def test_error_boundary_turns_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from kvmio.cli.errors import EXIT_INTERRUPTED, error_boundary
    from kvmio.errors import KvmInvalidArgumentError

    with pytest.raises(click.ClickException) as e1, error_boundary():
        raise KvmInvalidArgumentError("bad thing", ioctl="KVM_X")
    assert e1.value.exit_code == 1 and e1.value.message == "KVM_X: bad thing"
    with pytest.raises(click.ClickException) as e2, error_boundary():
        raise OSError(28, "No space left on device", "/x/out.json")
    assert e2.value.message == "/x/out.json: No space left on device"
    with pytest.raises(click.exceptions.Exit) as e3, error_boundary():
        raise KeyboardInterrupt
    assert e3.value.exit_code == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "Interrupted.\n"
    with pytest.raises(ValueError), error_boundary():  # a bug stays a traceback
        raise ValueError("bug")


def test_an_output_file_that_fails_late_is_one_error_line(kvm: Kvm, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import kvmio.cli.bench

    def full(path: str, data: object) -> None:
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(kvmio.cli.bench, "write_json", full)
    j = tmp_path / "out.json"
    r = CliRunner().invoke(main, ["bench", "ring-vs-bitmap", "--mem", "1G", "--dirty", "16",
                                  "--repeat", "1", "--json", str(j)])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == f"Error: {j}: No space left on device"


def test_second_ctrl_c_does_not_cut_the_clean_up_short(capfd: pytest.CaptureFixture[str]
                                                       ) -> None:
    import signal

    from kvmio.cli.errors import sigint_once

    with sigint_once():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between two bytecodes
                pass
        os.kill(os.getpid(), signal.SIGINT)  # while stopping: noted, not raised
        for _ in range(1000):
            pass
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a third would end it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "still stopping" in capfd.readouterr().err


def test_ctrl_c_reaches_a_vcpu_in_kvm_run_of_the_main_thread(kvm: Kvm) -> None:
    # Python raises KeyboardInterrupt in the main thread only between bytecodes.  A SIGINT
    # whose C handler runs in another thread (as a process-directed signal may, or one that
    # lands just before the main thread enters KVM_RUN) leaves a guest that never exits
    # running: the helper thread of sigint_once() kicks the registered vCPU.
    import signal
    import threading
    import time

    from kvmio.cli.errors import kick_on_interrupt, sigint_once
    from kvmio.exits import Interrupted

    with kvm.create_vm() as vm:
        vm.add_memory_region(0, 1 << 20)
        # 1: inc word [0x2000]; jmp 1b: no exit, ever, and a counter that moves only while
        # the guest runs, i.e. while the main thread is inside KVM_RUN.
        vm.write_memory(0x1000, bytes([0xFF, 0x06, 0x00, 0x20, 0xEB, 0xFA]))
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip = 0x1000
        vcpu.set_regs(regs)

        def counter() -> bytes:
            return vm.read_memory(0x2000, 2)

        def interrupt() -> None:
            wait_until(lambda: vcpu.running, what="the main thread to enter run()")
            seen = counter()
            wait_until(lambda: counter() != seen, what="the guest to run")  # inside KVM_RUN
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # handled here

        safety = threading.Timer(20, vcpu.kick)  # without the helper: end the test anyway
        sender = threading.Thread(target=interrupt)
        t0 = time.monotonic()
        try:
            with sigint_once(), kick_on_interrupt(vcpu.kick), pytest.raises(KeyboardInterrupt):
                safety.start()
                sender.start()
                while True:
                    assert isinstance(vcpu.run(), Interrupted)
        finally:
            safety.cancel()
            sender.join()
        assert time.monotonic() - t0 < 10
    assert [t for t in threading.enumerate() if t.name == "kvmio-sigint"] == []


# -- Ctrl-C, for real: a subprocess gets SIGINT while its guest runs ----------------------------


KVMIO = str(Path(sys.executable).with_name("kvmio"))  # the console script


def _interrupt(args: list[str], ready: bytes, *, deadline: float = 120.0
               ) -> tuple[int, bytes, bytes]:
    """Start ``kvmio args``, wait until ``ready`` is on its stdout, send SIGINT, and return
    the exit status, stdout and stderr."""
    import selectors
    import signal
    import time

    env = dict(os.environ, COLUMNS="200")
    with subprocess.Popen([KVMIO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env) as p:
        assert p.stdout is not None and p.stderr is not None
        out = b""
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        end = time.monotonic() + deadline
        try:
            while ready not in out:
                left = end - time.monotonic()
                assert left > 0 and p.poll() is None, (out, p.stderr.read() if p.poll() else b"")
                if sel.select(left):
                    chunk = os.read(p.stdout.fileno(), 65536)
                    assert chunk, (out, p.stderr.read())
                    out += chunk
            assert p.poll() is None, "the command ended before it was interrupted"
            p.send_signal(signal.SIGINT)
            rest, err = p.communicate(timeout=60)
        finally:
            sel.close()
            if p.poll() is None:
                p.kill()
    return p.returncode, out + rest, err


def _assert_interrupted(code: int, err: bytes) -> None:
    assert code == 130, err
    assert b"Traceback" not in err
    assert err.decode().splitlines() == ["Interrupted."], err


def test_ctrl_c_stops_dirtyrate_and_keeps_the_samples(kvm: Kvm, tmp_path: Path) -> None:
    j, png = tmp_path / "out.json", tmp_path / "out.png"
    code, out, err = _interrupt(["dirtyrate", "--mem", "128M", "--duration", "30", "--json",
                                 str(j), "--plot", str(png), "--quiet"], b"measuring")
    _assert_interrupted(code, err)
    data = json.loads(j.read_text())
    assert data["interrupted"] is True and data["stop"] == "interrupted"
    assert data["samples"] and data["duration"] < 25
    assert data["guest_writes"] > 0 and data["summary"]["samples"] == len(data["samples"])
    assert b"mean dirty rate" in out and f"wrote {j}".encode() in out
    assert png.exists()


def test_ctrl_c_stops_dirtyrate_on_a_kernel(kvm: Kvm, tmp_path: Path) -> None:
    kernel = tmp_path / "sweeper.elf"
    kernel.write_bytes(make_elf([(0x100000, SWEEPER, len(SWEEPER))], 0x100000))
    j = tmp_path / "k.json"
    code, _, err = _interrupt(["dirtyrate", "--kernel", str(kernel), "--mem", "64M",
                               "--duration", "30", "--json", str(j)], b"measuring")
    _assert_interrupted(code, err)
    data = json.loads(j.read_text())
    assert data["interrupted"] is True and data["samples"] and data["duration"] < 25


def test_ctrl_c_stops_demo(kvm: Kvm) -> None:
    code, out, err = _interrupt(["demo", "--writes", "1000000000", "--mem", "64M"],
                                b"hello guest")
    _assert_interrupted(code, err)
    assert b"reported == written" not in out


def test_ctrl_c_stops_bench_and_keeps_the_cells(kvm: Kvm, tmp_path: Path) -> None:
    j = tmp_path / "b.json"
    code, out, err = _interrupt(["bench", "ring-vs-bitmap", "--mem", "1G", "--mem", "2G",
                                 "--mem", "4G", "--mem", "8G", "--dirty", "16384",
                                 "--repeat", "5", "--json", str(j)], b"ring")
    _assert_interrupted(code, err)
    data = json.loads(j.read_text())
    assert data["interrupted"] is True
    assert 1 <= len(data["cells"]) < 8
    assert data["cells"][0]["mode"] == "ring"
    assert b"one collection (ms)" in out  # the table of the cells measured


def test_ctrl_c_stops_bench_reset_and_keeps_the_cells(kvm: Kvm, tmp_path: Path) -> None:
    # The first cell takes a second; the second one (10,000 pages a run) ten: SIGINT lands in
    # it, most likely while its guest runs in the main thread.
    j, png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = _interrupt(["bench", "reset", "--mem", "64M", "--dirty", "1", "--dirty",
                                 "10000", "--repeat", "20", "--json", str(j), "--plot",
                                 str(png)], b"dirty: reset")
    _assert_interrupted(code, err)
    data = json.loads(j.read_text())
    assert data["interrupted"] is True
    assert 1 <= len(data["cells"]) < 4
    assert (data["cells"][0]["mode"], data["cells"][0]["dirty"]) == ("ring", 1)
    assert b"copy: the reference" in out and png.exists()  # the table and the plot


# -- arguments that are not UTF-8 --------------------------------------------------------------


@pytest.mark.parametrize("args", [
    [b"run", b"/tmp/kernel\xff.elf"],
    [b"run", b"/bin/true", b"--append", b"caf\xe9"],
    [b"dirtyrate", b"--json", b"/tmp/\xff.json"],
])
def test_non_utf8_arguments_are_a_clear_error(args: list[bytes]) -> None:
    p = subprocess.run([KVMIO.encode(), *args], capture_output=True, timeout=60)
    assert p.returncode == 2, p.stderr
    err = p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "UnicodeEncodeError" not in err
    i, raw = next((i, a) for i, a in enumerate(args, 1) if not a.isascii())
    assert f"Error: argument {i} is not valid UTF-8: {raw!r}" in err
