"""Benchmark: does compressing the migration stream (``send_vm(compress=True)``: zstd level 1
page records) pay, and where?

A stopped 256 MiB workload VM whose memory is filled with one of three contents is migrated
(a full pass and a final one) with and without compression, over:

- a socket pair (memory speed: the sender's and receiver's CPU decide);
- TCP over a veth pair into another network namespace, capped at 100 Mbit/s with
  ``tc ... tbf`` (needs root and iproute2; skipped otherwise).

Contents: ``workload`` (the built-in workload's pages: a counter and zeros), ``binary`` (the
bytes of the host's executables: code and data, compressible about 2x), ``random``
(incompressible: every record goes uncompressed, the cost is the failed attempt).

Reported per row: seconds without and with compression, their ratio (below 1: compression
pays), and the bytes on the wire with compression against without.

Usage: python bench/compression.py [--mib N] [--json FILE]
       (python bench/compression.py --receive PORT: the destination, run in the namespace)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvmio import Kvm
from kvmio.guests.workload import MEM_BASE, Workload
from kvmio.migration import send_vm, socket_pair

MiB = 1 << 20
CONTENTS = ["workload", "binary", "random"]


def fill(w: Workload, content: str, size: int) -> None:
    """Fill ``size`` bytes of the workload's memory with ``content``."""
    if content == "random":
        data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    elif content == "binary":
        blobs = bytearray()
        for f in sorted(glob.glob("/usr/bin/*")):
            if len(blobs) >= size:
                break
            with contextlib.suppress(OSError):
                if os.path.isfile(f) and not os.path.islink(f):
                    blobs += Path(f).read_bytes()
        data = bytes(blobs[:size]).ljust(size, b"\0")
    else:
        words = np.zeros((size // 4096, 512), dtype=np.uint64)
        words[:, 0] = np.arange(1, size // 4096 + 1)
        data = words.tobytes()
    w.vm.write_memory(MEM_BASE, data)


def migrate(kvm: Kvm, w: Workload, conn: Any, compress: bool) -> tuple[float, int]:
    """Migrate the stopped workload on ``conn``: seconds and bytes sent."""
    t0 = time.monotonic()
    report = send_vm(conn, w.vm, w.vcpus, guest=w._snapshot_guest(), compress=compress)
    return time.monotonic() - t0, report.bytes_sent


def over_socket_pair(kvm: Kvm, w: Workload, compress: bool) -> tuple[float, int]:
    a, b = socket_pair()
    got: dict[str, Any] = {}

    def receive() -> None:
        try:
            Workload.from_migration(kvm, b).close()
        except BaseException as e:
            got["e"] = e

    th = threading.Thread(target=receive)
    th.start()
    with a, b:
        out = migrate(kvm, w, a, compress)
        th.join()
    if "e" in got:
        raise got["e"]
    return out


class Link:
    """A namespace reached over a veth pair capped at ``rate`` bits/s (needs root)."""

    def __init__(self, rate: int = 100_000_000):
        tag = os.getpid() % 100000
        self.ns, self.near, self.far = f"kvb{tag}", f"kvbs{tag}", f"kvbd{tag}"
        self.src, self.dst = "10.251.77.1", "10.251.77.2"
        cmds = [["ip", "netns", "add", self.ns],
                ["ip", "link", "add", self.near, "type", "veth", "peer", "name", self.far],
                ["ip", "link", "set", self.far, "netns", self.ns],
                ["ip", "addr", "add", f"{self.src}/24", "dev", self.near],
                ["ip", "link", "set", self.near, "up"],
                ["ip", "-n", self.ns, "addr", "add", f"{self.dst}/24", "dev", self.far],
                ["ip", "-n", self.ns, "link", "set", self.far, "up"],
                ["ip", "-n", self.ns, "link", "set", "lo", "up"],
                ["tc", "qdisc", "add", "dev", self.near, "root", "tbf", "rate", str(rate),
                 "burst", "32kb", "latency", "50ms"]]
        try:
            for c in cmds:
                subprocess.run(c, check=True, capture_output=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.near], capture_output=True)


def over_link(kvm: Kvm, w: Workload, link: Link, compress: bool) -> tuple[float, int]:
    p = subprocess.Popen(["ip", "netns", "exec", link.ns, sys.executable, __file__,
                          "--receive", link.dst], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    port = int(p.stdout.readline())
    with socket.create_connection((link.dst, port)) as conn:
        out = migrate(kvm, w, conn, compress)
    if p.wait(120):
        raise RuntimeError("the destination failed")
    return out


def receive(host: str) -> None:
    with socket.create_server((host, 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
    with conn, Kvm() as kvm:
        Workload.from_migration(kvm, conn).close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="guest memory filled (MiB)")
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--receive", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receive:
        receive(a.receive)
        return
    size = a.mib * MiB
    can_link = os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")
    link = Link() if can_link else None
    rows = []
    print("| link | content | seconds, plain | seconds, compressed | compressed / plain: time "
          "| bytes |")
    print("|---|---|---|---|---|---|")
    try:
        with Kvm() as kvm:
            for content in CONTENTS:
                with Workload(kvm, mem_size=size + (16 << 20), max_writes=0) as w:
                    fill(w, content, size)
                    paths: list[tuple[str, Any]] = [
                        ("socket pair", lambda c: over_socket_pair(kvm, w, c))]
                    if link is not None:
                        paths.append(("100 Mbit/s veth (tbf)",
                                      lambda c: over_link(kvm, w, link, c)))
                    for name, run in paths:
                        (t0, b0), (t1, b1) = run(False), run(True)
                        rows.append({"link": name, "content": content, "plain_s": t0,
                                     "compressed_s": t1, "plain_bytes": b0,
                                     "compressed_bytes": b1})
                        print(f"| {name} | {content} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f} "
                              f"| {b1 / b0:.3f} |", flush=True)
    finally:
        if link is not None:
            link.close()
    if not can_link:
        print("(the 100 Mbit/s link needs root and iproute2: not measured)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
