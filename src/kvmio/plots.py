"""Plots for the CLI (matplotlib with the headless Agg backend; ``pip install kvmio[plot]``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kvmio._abi import PAGE_SIZE
from kvmio.dirtyrate import CollectionCost, DirtyRateReport
from kvmio.errors import KvmError
from kvmio.resetbench import MODES, ResetCell

GIB = 1 << 30


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise KvmError("plots need matplotlib: pip install 'kvmio[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dirty_rate(report: DirtyRateReport, path: str | os.PathLike[str], *,
                    width: float = 10.0, height: float = 7.0, dpi: int = 100) -> None:
    """Two panels: the dirty rate over time (VM and per vCPU), and a heatmap of guest memory
    (y, guest physical address) against time (x) showing where writes land."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(width, height), dpi=dpi,
                                   gridspec_kw={"height_ratios": [1, 1.4]})
    try:
        t = [s["time"] for s in report.samples]
        ax1.plot(t, [s["bytes_per_second"] / (1 << 20) for s in report.samples], lw=2,
                 label="VM", color="black")
        vcpus = sorted({k for s in report.samples for k in s["vcpu_pages_per_second"]}, key=int)
        colours = {}
        for v in vcpus:
            (line,) = ax1.plot(t, [s["vcpu_pages_per_second"].get(v, 0) * PAGE_SIZE / (1 << 20)
                                   for s in report.samples], lw=1, label=f"vCPU {v}")
            colours[v] = line.get_color()
        # The dirty-rate limit in effect at each sample, dashed in its vCPU's colour.
        limited = sorted({k for s in report.samples
                          for k in s.get("limit_bytes_per_second", {})}, key=int)
        for v in limited:
            ax1.step(t, [s.get("limit_bytes_per_second", {}).get(v, np.nan) / (1 << 20)
                         for s in report.samples], where="post", lw=1.2, ls="--",
                     color=colours.get(v, "grey"), label=f"limit vCPU {v}")
        ax1.set_xlabel("time (s)")
        ax1.set_ylabel("dirty rate (MiB/s, distinct pages)")
        ax1.set_title(f"dirty rate, {report.config.get('mode')} mode, window "
                      f"{report.config.get('window')} s")
        ax1.grid(alpha=0.3)
        ax1.legend(loc="best", fontsize="small")
        counts = np.array(report.heatmap_counts, dtype=float)
        lo, hi = report.heatmap_span
        times = np.array(report.heatmap_times, dtype=float)
        if counts.size and hi > lo and len(times):
            # Passes come at irregular times (ring-full exits add some): regrid onto even time
            # bins so that the x axis is real time.
            t_end = max(float(times[-1]), 1e-3)
            interval = float(report.config.get("interval") or t_end / max(len(times), 1))
            nbins = max(1, min(400, len(times), round(t_end / interval)))
            col = np.minimum((times / t_end * nbins).astype(int), nbins - 1)
            grid = np.zeros((nbins, counts.shape[1]))
            np.add.at(grid, col, counts)
            rate = grid / (t_end / nbins)  # dirty pages per second in each cell
            im = ax2.imshow(np.log10(1 + rate.T), aspect="auto", origin="lower",
                            extent=(0.0, t_end, lo / GIB, hi / GIB), cmap="inferno",
                            interpolation="nearest")
            fig.colorbar(im, ax=ax2, label="log10(1 + dirty pages/s)")
        ax2.set_xlabel("time (s)")
        ax2.set_ylabel("guest physical address (GiB)")
        ax2.set_title("where writes land")
        fig.tight_layout()
        fig.savefig(os.fspath(path))
    finally:
        plt.close(fig)


def plot_ring_vs_bitmap(cells: list[CollectionCost], path: str | os.PathLike[str], *,
                        width: float = 9.0, height: float = 5.5, dpi: int = 100) -> None:
    """Collection time against guest memory size, one line per mode and dirty-set size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    try:
        sizes = sorted({c.dirty for c in cells})
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for mode, style in (("ring", "-o"), ("bitmap", "--s")):
            for k, n in enumerate(sizes):
                pts = sorted((c.mem, c.seconds) for c in cells if c.mode == mode and c.dirty == n)
                if pts:
                    ax.plot([m / GIB for m, _ in pts], [s * 1e3 for _, s in pts], style,
                            color=colours[k % len(colours)], label=f"{mode}, {n} dirty pages")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest memory (GiB, sparse)")
        ax.set_ylabel("one collection (ms)")
        ax.set_title("dirty-page collection cost: ring vs bitmap")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(os.fspath(path))
    finally:
        plt.close(fig)


def plot_reset(cells: list[ResetCell], path: str | os.PathLike[str], *, width: float = 9.0,
               height: float = 5.5, dpi: int = 100) -> None:
    """Checkpoint-reset time (p50, wall) against dirty pages, log-log: one line per guest and
    mode (a colour per guest; ring solid, bitmap dotted), and per guest the reference, a full
    copy of every stored page (dashed; the mean of the modes' p50s)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    try:
        guests: list[tuple[int, int, str]] = []
        for c in cells:  # in the order measured
            if (c.size, c.populated, c.guest) not in guests:
                guests.append((c.size, c.populated, c.guest))
        guests.sort()
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = {"ring": "-o", "bitmap": ":s"}
        for k, (size, populated, label) in enumerate(guests):
            colour = colours[k % len(colours)]
            mine = [c for c in cells if c.size == size and c.populated == populated]
            for mode in MODES:
                pts = sorted((c.dirty, c.reset_us) for c in mine if c.mode == mode)
                if pts:
                    ax.plot([n for n, _ in pts], [us / 1e3 for _, us in pts], styles[mode],
                            color=colour, label=f"{mode}, {label}")
            ref: dict[int, list[float]] = {}
            for c in mine:
                ref.setdefault(c.dirty, []).append(c.full_copy_us)
            if ref:
                xs = sorted(ref)
                ax.plot(xs, [float(np.mean(ref[n])) / 1e3 for n in xs], "--", color=colour,
                        alpha=0.8, label=f"full copy, {label}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dirty pages (written by the guest before each reset)")
        ax.set_ylabel("reset, p50 (ms)")
        ax.set_title("checkpoint reset vs a full copy of guest memory (dashed)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small", ncol=2 if len(guests) > 2 else 1)
        fig.tight_layout()
        fig.savefig(os.fspath(path))
    finally:
        plt.close(fig)
