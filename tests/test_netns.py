"""Migration between two "hosts": the destination listens in its own network namespace,
joined to the source's by a veth pair whose link is capped with a token bucket filter
(``tc ... tbf``; this kernel has no netem).  TLS with a certificate for the destination's
address, as beyond loopback it must be.  Needs root and iproute2 (``ip``, ``tc``): without
them the test skips with the reason, except under CI=true, where it fails."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import IN_CI
from kvmio import Kvm
from test_cli import KVMIO


@dataclass(frozen=True)
class Link:
    """A namespace ``ns`` holding ``dest_ip``, reached from ``source_ip`` over a veth pair
    whose source side sends at most ``rate`` bits/s."""

    ns: str
    source_ip: str
    dest_ip: str
    rate: int


def _need_root_and_iproute2() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root (network namespaces)"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        why = "needs iproute2 (ip, tc)"
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI=true but this test {why}", pytrace=False)
        pytest.skip(why)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def link() -> Iterator[Link]:
    _need_root_and_iproute2()
    tag = f"{os.getpid() % 100000}"
    ns, near, far = f"kvmio{tag}", f"kvs{tag}", f"kvd{tag}"
    net = 16 + os.getpid() % 200  # 10.<net>.77.0/24: one per test process
    source_ip, dest_ip = f"10.{net}.77.1", f"10.{net}.77.2"
    rate = 100_000_000  # 100 Mbit/s: 12.5 MB/s
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", near, "type", "veth", "peer", "name", far)
        _ip("link", "set", far, "netns", ns)
        _ip("addr", "add", f"{source_ip}/24", "dev", near)
        _ip("link", "set", near, "up")
        _ip("-n", ns, "addr", "add", f"{dest_ip}/24", "dev", far)
        _ip("-n", ns, "link", "set", far, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(["tc", "qdisc", "add", "dev", near, "root", "tbf", "rate",
                        str(rate), "burst", "32kb", "latency", "50ms"],
                       check=True, capture_output=True, timeout=30)
        yield Link(ns, source_ip, dest_ip, rate)
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("netns", "del", ns)  # takes its end of the pair, and so the pair, with it
        with contextlib.suppress(subprocess.SubprocessError):
            _ip("link", "del", near)  # (if the namespace was never made)


def _listen_in(link: Link, args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    p = subprocess.Popen(["ip", "netns", "exec", link.ns, KVMIO, "migrate", "listen",
                          f"{link.dest_ip}:0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    out = b""
    end = time.monotonic() + 60
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            while b"\n" not in out:
                assert time.monotonic() < end and p.poll() is None, out
                if sel.select(1):
                    out += os.read(p.stdout.fileno(), 4096)
        line = out.decode().splitlines()[0]
        assert line.startswith(f"listening on {link.dest_ip}:"), line
    except BaseException:
        p.kill()
        p.communicate()
        raise
    return p, int(line.rsplit(":", 1)[1])


@pytest.mark.timeout(300)
def test_a_workload_migrates_to_another_namespace_over_a_capped_tls_link(
        kvm: Kvm, link: Link, tmp_path: Path) -> None:
    """A guest dirtying memory faster than the 12.5 MB/s link carries: with auto-converge it
    converges, and the destination goes on from the source's counters; the full pass's
    bandwidth is the cap's (the link, not loopback, carried it)."""
    import trustme

    authority = trustme.CA()
    cert = authority.issue_cert(link.dest_ip)
    ca, crt, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca))
    cert.private_key_pem.write_to_path(str(key))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(crt), append=i > 0)
    lj, sj = tmp_path / "listen.json", tmp_path / "send.json"
    dest, port = _listen_in(link, ["--run", "0.5", "--json", str(lj), "--tls-cert", str(crt),
                                   "--tls-key", str(key)])
    with dest:
        src = subprocess.run([KVMIO, "migrate", "send", f"{link.dest_ip}:{port}", "--mem",
                              "32M", "--after", "0.5", "--auto-converge", "--tls-ca", str(ca),
                              "--json", str(sj), "--quiet"], capture_output=True, timeout=180)
        assert src.returncode == 0, src.stderr
        _, err = dest.communicate(timeout=60)
        assert dest.returncode == 0, err
    sent, got = json.loads(sj.read_text()), json.loads(lj.read_text())
    assert got["writes_on_arrival"] == sent["writes_at_switch_over"]
    assert all(b > a for a, b in zip(got["writes_on_arrival"], got["writes_after_run"],
                                     strict=True))
    full = sent["passes"][0]
    cap = link.rate / 8
    assert full["bytes"] > 16 << 20  # the full pass carried the guest's memory ...
    assert full["bandwidth"] < 1.2 * cap  # ... at the link's rate, not loopback's
    assert sent["throttle"], "the guest outran the link: auto-converge should have stepped in"
