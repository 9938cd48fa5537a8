"""``kvmio migrate listen|send`` as real processes over loopback TCP: a workload migrated
between two processes goes on at the destination where the source stopped; bad addresses,
a refused connection, a stream that is not a migration, and Ctrl-C on a waiting listener."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmio import Kvm
from kvmio.cli import main
from test_cli import KVMIO, _assert_interrupted, _interrupt
from test_snapshot_files import EXIT_CODE, MEM, ticker, ticker_output  # noqa: F401 (fixtures)

from guests import wait_until


def _listen(args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``kvmio migrate listen 127.0.0.1:0 args``; return it and the port it says."""
    p = subprocess.Popen([KVMIO, "migrate", "listen", "127.0.0.1:0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    out = b""
    end = time.monotonic() + 60
    try:
        while b"\n" not in out:
            assert time.monotonic() < end and p.poll() is None, out
            if sel.select(1):
                out += os.read(p.stdout.fileno(), 4096)
    finally:
        sel.close()
    line = out.decode().splitlines()[0]
    assert line.startswith("listening on 127.0.0.1:"), line
    return p, int(line.rsplit(":", 1)[1])


def test_a_workload_migrates_between_two_processes(kvm: Kvm, tmp_path: Path) -> None:
    lj, sj = tmp_path / "listen.json", tmp_path / "send.json"
    dest, port = _listen(["--run", "0.5", "--json", str(lj)])
    with dest:
        src = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--mem", "64M",
                              "--vcpus", "2", "--after", "0.3", "--json", str(sj), "--quiet"],
                             capture_output=True, timeout=120)
        assert src.returncode == 0, src.stderr
        _, err = dest.communicate(timeout=120)
        assert dest.returncode == 0, err
    assert b"migrated in" in src.stdout
    sent = json.loads(sj.read_text())
    got = json.loads(lj.read_text())
    assert sent["passes"][-1]["final"] and not sent["passes"][0]["final"]
    assert sent["downtime"] > 0 and sent["pages_sent"] > 0
    # The destination went on from where the source stopped (by the guest's own counters).
    assert got["writes_on_arrival"] == sent["writes_at_switch_over"]
    assert all(b > a for a, b in zip(got["writes_on_arrival"], got["writes_after_run"],
                                     strict=True))
    assert b"the guest went on" in err


@pytest.mark.parametrize(("args", "match"), [
    (["send", "nowhere"], "is not HOST:PORT"),
    (["send", "localhost:http"], "port 'http' is not a number"),
    (["send", "localhost:0"], "port 0 is out of range"),
    (["listen", "localhost:70000"], "port 70000 is out of range"),
    (["send", "localhost:1", "--downtime", "0"], "--downtime"),
    (["send", "localhost:1", "--mem", "lots"], "--mem"),
])
def test_bad_arguments_are_usage_errors(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                       match: str) -> None:
    def refuse(ctx: object) -> None:
        raise AssertionError("the command started although its arguments are bad")

    monkeypatch.setattr("kvmio.cli.migrate.open_kvm", refuse)
    r = CliRunner().invoke(main, ["migrate", *args])
    assert r.exit_code == 2, r.output
    assert match in r.output


def test_a_refused_connection_is_one_error_line(kvm: Kvm) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--mem", "16M",
                        "--after", "0", "--quiet"], capture_output=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.decode().splitlines() == [
        f"Error: cannot connect to 127.0.0.1:{port}: Connection refused "
        "[errno 111: ECONNREFUSED]"], r.stderr


def test_a_listener_refuses_a_stream_that_is_not_a_migration(kvm: Kvm) -> None:
    dest, port = _listen([])
    with dest:
        with socket.create_connection(("127.0.0.1", port)) as c:
            # Exactly a preamble's length (16 bytes): the listener reads it all, so that its
            # close is a clean end of stream (unread bytes would make it a reset).
            c.sendall(b"GET / HTTP/1.0\r\n")
            c.settimeout(60)
            answer = b""
            while True:
                b = c.recv(4096)
                if not b:
                    break
                answer += b
        _, err = dest.communicate(timeout=60)
    assert dest.returncode == 1
    assert b"FAIL" in answer  # the source is told why
    assert err.decode().splitlines()[-1] == \
        "Error: not a kvmio migration stream (bad preamble)", err


def test_ctrl_c_stops_a_waiting_listener(kvm: Kvm) -> None:
    code, _, err = _interrupt(["migrate", "listen", "127.0.0.1:0"], b"listening on")
    _assert_interrupted(code, err)


@pytest.fixture
def ca(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a certificate for 127.0.0.1 from it, and another CA."""
    import trustme

    authority, other = trustme.CA(), trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    out = {"ca": tmp_path / "ca.pem", "other": tmp_path / "other.pem",
           "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    authority.cert_pem.write_to_path(str(out["ca"]))
    other.cert_pem.write_to_path(str(out["other"]))
    cert.private_key_pem.write_to_path(str(out["key"]))
    cert.cert_chain_pems[0].write_to_path(str(out["cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(out["cert"]), append=True)
    return out


def test_a_migration_over_tls_verifies_the_destination(kvm: Kvm, ca: dict[str, Path],
                                                       tmp_path: Path) -> None:
    sj = tmp_path / "send.json"
    dest, port = _listen(["--run", "0.2", "--tls-cert", str(ca["cert"]), "--tls-key",
                          str(ca["key"])])
    with dest:
        src = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--mem", "32M",
                              "--after", "0.2", "--tls-ca", str(ca["ca"]), "--json", str(sj),
                              "--quiet"], capture_output=True, timeout=120)
        assert src.returncode == 0, src.stderr
        _, err = dest.communicate(timeout=120)
        assert dest.returncode == 0, err
    assert json.loads(sj.read_text())["passes"][-1]["final"]
    assert b"the guest went on" in err


def test_a_destination_whose_certificate_does_not_verify_gets_nothing(
        kvm: Kvm, ca: dict[str, Path]) -> None:
    dest, port = _listen(["--tls-cert", str(ca["cert"]), "--tls-key", str(ca["key"])])
    with dest:
        src = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--mem", "16M",
                              "--after", "0", "--tls-ca", str(ca["other"]), "--quiet"],
                             capture_output=True, timeout=120)
        _, err = dest.communicate(timeout=120)
    assert src.returncode == 1
    assert b"TLS failed: the certificate did not verify" in src.stderr, src.stderr
    assert dest.returncode == 1 and b"TLS failed" in err, err


@pytest.mark.parametrize(("args", "match"), [
    (["send", "10.1.2.3:4444"], "beyond loopback: give --tls-ca"),
    (["listen", "0.0.0.0:0"], "beyond loopback: give --tls-cert/--tls-key"),
    (["send", "localhost:4444", "--tls-name", "x"], "needs --tls-ca"),
])
def test_beyond_loopback_tls_is_required(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                         match: str) -> None:
    monkeypatch.setattr("kvmio.cli.migrate.open_kvm", lambda ctx: pytest.fail("started"))
    r = CliRunner().invoke(main, ["migrate", *args])
    assert r.exit_code == 2, r.output
    assert match in r.output


def test_a_kernel_migrates_between_two_processes_and_its_output_goes_on(
        kvm: Kvm, ticker: Path, ticker_output: bytes) -> None:  # noqa: F811 (fixtures)
    dest, port = _listen(["--guest", "kernel"])
    with dest:
        src = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--kernel",
                              str(ticker), "--mem", str(MEM >> 20), "--after", "0.3"],
                             capture_output=True, timeout=120)
        assert src.returncode == 0, src.stderr
        rest, err = dest.communicate(timeout=120)
    assert dest.returncode == EXIT_CODE, err  # the kernel's own exit, as kvmio run gives it
    assert b"migrated in" in src.stderr
    assert src.stdout + rest == ticker_output
    assert src.stdout  # it ran (and printed) before it moved


def test_ctrl_c_stops_a_sending_source(kvm: Kvm) -> None:
    """A destination that accepts and never reads: the source blocks in its first pass;
    Ctrl-C ends it (the guest resumed, every thread joined), exit 130."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        held: list[socket.socket] = []

        def accept_and_hold() -> None:
            conn, _ = srv.accept()
            held.append(conn)

        th = threading.Thread(target=accept_and_hold, daemon=True)
        th.start()
        try:
            code, out, err = _interrupt(["migrate", "send", f"127.0.0.1:{port}", "--mem",
                                         "256M", "--after", "0.5"], b"migrating to")
        finally:
            th.join(10)
            for c in held:
                c.close()
    _assert_interrupted(code, err)
    assert b"migrated in" not in out


@pytest.mark.parametrize("when", ["first pass", "final pass"])
def test_a_killed_destination_leaves_the_source_running_with_nothing_lost(
        kvm: Kvm, when: str) -> None:
    """``kvmio migrate listen`` killed (SIGKILL) mid-migration, while the guest runs or once
    it is paused for the switch-over: the source raises MigrationError, runs on, and its
    dirty log is its own again; the guest's pages are as it wrote them."""
    import signal

    from kvmio import MigrationError, MigrationInDoubtError
    from kvmio.guests.workload import Workload
    from kvmio.migration import PassReport, socket_pair
    from test_migration import Destination, _differing_pages

    dest, port = _listen([])
    with dest, Workload(kvm, mem_size=64 << 20, order="sequential", value="count",
                        ring_entries=4096) as w, w.runner() as r:
        wait_until(lambda: w.writes(0) > 1000, what="writes")

        def on_pass(p: PassReport) -> None:
            if (p.number == 0) if when == "first pass" else p.final:
                dest.send_signal(signal.SIGKILL)
                dest.wait(30)

        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn, \
                pytest.raises(MigrationError) as got:
            w.migrate(conn, runner=r, on_pass=on_pass, max_passes=50)
        assert not isinstance(got.value, MigrationInDoubtError)
        assert dest.returncode == -signal.SIGKILL
        assert not r.paused and r.running  # the source runs on
        n = w.writes(0)
        wait_until(lambda: w.writes(0) > n + 1000, what="the source to go on")
        # Nothing lost: the same running guest migrates again, to a new destination, and
        # arrives page-exact (the failed attempt left the dirty log whole and free).
        a, b = socket_pair()
        again = Destination(kvm, b)
        again.start()
        with a, b:
            w.migrate(a, runner=r, max_passes=50)
            again.join(60)
        assert again.error is None and again.w is not None, repr(again.error)
        with again.w as d:
            assert _differing_pages(w, d) == {0: 0, 1: 0}


def test_send_compress_sends_compressed_pages(kvm: Kvm, tmp_path: Path) -> None:
    sj = tmp_path / "send.json"
    dest, port = _listen(["--run", "0.2"])
    with dest:
        src = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--mem", "32M",
                              "--after", "0.3", "--compress", "--json", str(sj), "--quiet"],
                             capture_output=True, timeout=120)
        assert src.returncode == 0, src.stderr
        _, err = dest.communicate(timeout=120)
        assert dest.returncode == 0, err
    sent = json.loads(sj.read_text())
    assert 0 < sent["compressed_to"] < sent["compressed_bytes"]
    assert sent["bytes_sent"] < sent["pages_sent"] * 4096


def test_a_kernel_that_overruns_the_ring_migrates_and_runs_on(kvm: Kvm, tmp_path: Path) -> None:
    """The benchmark's dense writer overruns a 4096-entry ring on this host by construction
    (the emulator pushes a whole batch of writes past the soft limit).  The source runs the
    kernel under a dirty tracker from its start, which survives overruns (a slot overrun
    during the migration is sent whole); the destination runs it on, without a ring, until
    --run ends it."""
    from test_bench_migkernel import _bench

    kernel = _bench().build_kernel(tmp_path)
    lj, sj = tmp_path / "listen.json", tmp_path / "send.json"
    dest, port = _listen(["--guest", "kernel", "--run", "1.0", "--accept-timeout", "120",
                          "--json", str(lj)])
    try:
        src = subprocess.run([KVMIO, "migrate", "send", f"127.0.0.1:{port}", "--kernel",
                              str(kernel), "--append", "load=dense pages=8192", "--mem", "64",
                              "--after", "1.0", "--json", str(sj)],
                             capture_output=True, timeout=120)
        assert src.returncode == 0, src.stderr
        _, err = dest.communicate(timeout=120)
    finally:  # a source that failed before it connected leaves the listener waiting
        dest.kill()
        dest.wait()
    assert dest.returncode == 0, err
    got = json.loads(lj.read_text())
    assert got["stop"] == "timeout", got  # it ran on for --run, and was stopped there
    sent = json.loads(sj.read_text())
    # From the kernel's start on (a ring fills in well under --after's 1 s), it overran the
    # ring, and the tracker survived it.
    assert sent["ring_overruns"] > 0, "the dense writer did not overrun the ring"
