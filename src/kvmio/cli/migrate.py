"""``kvmio migrate listen|send``: live migration of the built-in workload between two processes
(or hosts) over TCP (:mod:`kvmio.migration`).

``listen ADDR`` accepts one migration on ``HOST:PORT`` (port 0: any free port; the address is
printed), builds the VM from the stream, runs the guest on for ``--run`` seconds and reports
how far it got; the listener then closes.  ``send ADDR`` boots the workload, lets it dirty
memory for ``--after`` seconds, and migrates it while it runs, with a progress line per pass
(pages, bandwidth, remaining dirty bytes, downtime estimate) and a report at the end
(``--json`` for all of it).

Beyond loopback the migration goes over TLS (Python's ssl module, certificates verified):
``listen --tls-cert --tls-key``, ``send --tls-ca [--tls-name]``; ``--plaintext`` on either
side accepts the risk of sending guest memory unencrypted.

Errors (a connection refused or cut, a certificate that does not verify, a stream that is not
a migration, a migration that did not converge within ``--timeout``) are one ``Error:`` line
and exit status 1: the source's guest ran on until it stopped, and a destination never runs
a half-received VM.  One error differs: a connection cut in the hand-over's last round trip
(the destination was told to run the guest but did not confirm it) leaves the source's copy
paused, never resumed, and says so; the command then ends, and that copy with it.  Ctrl-C
stops either side and exits with 130.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any, Literal

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kvmio.cli.common import console, open_kvm, write_json
from kvmio.cli.errors import deferred_interrupt, kick_on_interrupt
from kvmio.cli.params import FiniteFloatRange, OutputFile, RingEntries, Size, format_size
from kvmio.cli.run import MULTIBOOT_MEMORY
from kvmio.errors import MigrationInDoubtError
from kvmio.guests.multiboot import KernelRunner, MultibootMachine
from kvmio.guests.workload import Workload
from kvmio.migration import DEFAULT_DOWNTIME, MigrationError, MigrationReport, PassReport
from kvmio.tracker import DirtyTracker

__all__ = ["migrate", "parse_address"]

#: The most guest memory the built-in workload is offered.
WORKLOAD_MEMORY = Size(min=1 << 20, max=512 << 30, what="memory size")
#: The longest wait for a connection, an answer, or a stalled stream (seconds).
MAX_WAIT = 86400.0


def parse_address(ctx: click.Context, text: str, *, listening: bool) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6) as ``(host, port)``; port 0 only to listen."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", ctx, param_hint="'ADDR'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise click.BadParameter(f"port {port_text!r} is not a number", ctx,
                                 param_hint="'ADDR'") from None
    if not (0 if listening else 1) <= port <= 65535:
        raise click.BadParameter(f"port {port} is out of range", ctx, param_hint="'ADDR'")
    return host, port


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_tls(ctx: click.Context, host: str, tls: bool, plaintext: bool, option: str) -> None:
    """Beyond loopback a migration goes over TLS, unless ``--plaintext`` says otherwise."""
    if tls and plaintext:
        raise click.BadParameter(f"--plaintext contradicts {option}", ctx,
                                 param_hint="'--plaintext'")
    if not tls and not plaintext and not _loopback(host):
        raise click.BadParameter(
            f"{host} is beyond loopback: give {option} (TLS with certificate verification), "
            "or --plaintext to send guest memory unencrypted", ctx, param_hint="'ADDR'")


def _tls_error(e: ssl.SSLError | ssl.CertificateError) -> MigrationError:
    if isinstance(e, ssl.SSLCertVerificationError):
        return MigrationError(f"TLS failed: the certificate did not verify "
                              f"({e.verify_message or e})")
    return MigrationError(f"TLS failed: {e}")


def _stream(data: bytes) -> None:
    click.echo(data, nl=False)  # bytes go to the binary stream, flushed


def _connect(host: str, port: int, address: str, client_tls: ssl.SSLContext | None,
             tls_name: str | None) -> socket.socket:
    try:
        conn = socket.create_connection((host, port), timeout=60)
    except OSError as e:
        raise MigrationError(f"cannot connect to {address}: {e.strerror or e}",
                             errno=e.errno) from e
    if client_tls is not None:
        try:
            conn = client_tls.wrap_socket(conn, server_hostname=tls_name or host)
        except (ssl.SSLError, ssl.CertificateError) as e:
            conn.close()
            raise _tls_error(e) from e
    return conn


def _send_kernel(ctx: click.Context, kernel: str, cmdline: str, mem: int, ring: int | None,
                 host: str, port: int, address: str, client_tls: ssl.SSLContext | None,
                 tls_name: str | None, after: float, downtime: float, timeout: float | None,
                 json_path: str | None, compress: bool) -> None:
    """``send --kernel``: boot it, run it ``after`` seconds, migrate it while it runs."""
    # Dirty logging starts with the kernel, under a tracker that harvests the ring from then
    # on (ring-full exits included), so an overrun (a kernel's ``rep stos`` can overrun a ring
    # on a host that emulates it) is survived: the slot is sent whole.
    with open_kvm(ctx) as kvm, \
            MultibootMachine(kvm, kernel, mem=mem, cmdline=cmdline, ring_entries=ring,
                             log_dirty=False) as m, \
            DirtyTracker(m.vm, "bitmap" if ring is None else "ring",
                         log_slots=[m.ram.slot]) as tracker:
        with KernelRunner(m, on_output=_stream, on_ring_full=None if ring is None
                          else tracker.on_ring_full) as runner:
            report = _migrate_kernel(m, runner, tracker, host, port, address, client_tls,
                                     tls_name, after, downtime, timeout, compress)
        overruns = len(tracker.overrun_events)
    click.echo(f"kvmio: migrated in {report.total_seconds:.2f} s: {len(report.passes)} "
               f"passes, {report.pages_sent:,} pages; downtime {report.downtime * 1e3:.0f} ms "
               f"(estimated {report.estimated_downtime * 1e3:.0f} ms)", err=True)
    if json_path:
        write_json(json_path, {**report.to_json(), "ring_overruns": overruns})


def _migrate_kernel(m: MultibootMachine, runner: KernelRunner, tracker: DirtyTracker,
                    host: str, port: int, address: str, client_tls: ssl.SSLContext | None,
                    tls_name: str | None, after: float, downtime: float,
                    timeout: float | None, compress: bool) -> MigrationReport:
    """Let the kernel run ``after`` seconds, then migrate it under ``tracker``."""
    end = time.monotonic() + after
    while runner.running and time.monotonic() < end:
        time.sleep(0.05)
    if not runner.running:
        runner.stop()  # re-raises what ended the runner's thread, if anything did
        raise MigrationError("the kernel stopped before the migration began: "
                             + (runner.result.summary() if runner.result else "?"))
    with _connect(host, port, address, client_tls, tls_name) as conn, _in_doubt():
        return m.migrate(conn, runner=runner, tracker=tracker, downtime=downtime,
                         timeout=timeout, max_passes=1000 if timeout else 30,
                         on_output=_stream, compress=compress)


@contextlib.contextmanager
def _in_doubt() -> Iterator[None]:
    """A migration in doubt (the destination may be running the guest) ends this command, and
    the source's paused copy with it: say so."""
    try:
        yield
    except MigrationInDoubtError as e:
        raise MigrationInDoubtError(f"{e.message}.  This command ends here and discards the "
                                    "source's paused copy: check whether the destination "
                                    "runs the guest", errno=e.errno) from e


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


@click.group()
def migrate() -> None:
    """Live migration of the built-in workload over TCP."""


@migrate.command("listen")
@click.argument("address", metavar="ADDR")
@click.option("--run", "run_seconds", default=None, type=FiniteFloatRange(0, MAX_WAIT),
              help="Seconds to run the guest on after it arrived (workload default: 2; a "
                   "kernel: until it stops).")
@click.option("--accept-timeout", default=600.0, show_default=True,
              type=FiniteFloatRange(0.1, MAX_WAIT),
              help="Seconds to wait for the source to connect.")
@click.option("--stall-timeout", default=60.0, show_default=True,
              type=FiniteFloatRange(0.1, MAX_WAIT),
              help="Seconds the stream may stall before the migration fails.")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write what arrived and how the guest went on as JSON.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: this listener's certificate chain (PEM), with --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: the private key of --tls-cert (PEM).")
@click.option("--plaintext", is_flag=True,
              help="Accept an unencrypted migration on an address beyond loopback.")
@click.option("--guest", type=click.Choice(["workload", "kernel"]), default="workload",
              show_default=True,
              help="What arrives: the built-in workload, or a Multiboot kernel (whose output "
                   "then goes on on stdout until it stops, or --run seconds if given).")
@click.pass_context
def listen(ctx: click.Context, address: str, run_seconds: float | None,
           accept_timeout: float, stall_timeout: float, json_path: str | None,
           tls_cert: str | None, tls_key: str | None, plaintext: bool, guest: str) -> None:
    """Accept one migration on ADDR (HOST:PORT), run the guest on, report."""
    host, port = parse_address(ctx, address, listening=True)
    if (tls_cert is None) != (tls_key is None):
        raise click.BadParameter("--tls-cert and --tls-key go together", ctx,
                                 param_hint="'--tls-key'")
    _check_tls(ctx, host, tls_cert is not None, plaintext, "--tls-cert/--tls-key")
    server_tls = None
    if tls_cert is not None:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            server_tls.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as e:
            raise click.BadParameter(f"cannot load the certificate and key: {e}", ctx,
                                     param_hint="'--tls-cert'") from None
    with open_kvm(ctx) as kvm:
        try:
            srv = socket.create_server((host, port))
        except OSError as e:
            raise MigrationError(f"cannot listen on {address}: {e.strerror}",
                                 errno=e.errno) from e
        with srv:
            bound = srv.getsockname()
            click.echo(f"listening on {bound[0]}:{bound[1]}")  # (stdout: for scripts)
            srv.settimeout(0.25)  # accept in slices: Ctrl-C is seen between them
            deadline = time.monotonic() + accept_timeout
            while True:
                try:
                    conn, peer = srv.accept()
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise MigrationError(
                            f"no source connected within {accept_timeout:g} s") from None
        conn.settimeout(stall_timeout)
        if server_tls is not None:
            try:
                conn = server_tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, ssl.CertificateError, OSError) as e:
                conn.close()
                if isinstance(e, ssl.SSLError | ssl.CertificateError):
                    raise _tls_error(e) from e
                raise MigrationError(f"TLS failed: {e}") from e
        with conn:  # the listener is closed: one migration only
            t0 = time.monotonic()
            if guest == "kernel":
                # It runs here and is not migrated on: no dirty ring, which nothing would
                # harvest (a kernel's ``rep stos`` could overrun it), and no dirty logging.
                m = MultibootMachine.from_migration(kvm, conn, ring_entries=None,
                                                    log_dirty=False)
            else:
                w = Workload.from_migration(kvm, conn)
            received = time.monotonic() - t0
        if guest == "kernel":
            with m:
                click.echo(f"kvmio: received the kernel from {peer[0]} in {received:.2f} s; "
                           "running it on", err=True)
                with kick_on_interrupt(m.vcpu.kick), \
                        deferred_interrupt(_stream) as interrupt:
                    result = m.run(timeout=run_seconds, on_output=_stream,
                                   on_interrupted=interrupt.check)
                click.echo(f"kvmio: {result.summary()}", err=True)
            if json_path:
                write_json(json_path, {"peer": peer[0], "received_seconds": received,
                                       "guest": "kernel", "stop": result.reason.value,
                                       "exit_code": result.exit_code})
            if result.exit_code is not None:
                ctx.exit(result.exit_code)
            return
        run_seconds = 2.0 if run_seconds is None else run_seconds
        with w:
            before = [w.writes(i) for i in range(len(w.vcpus))]
            click.echo(f"kvmio: received {len(w.vcpus)} vCPU(s), {format_size(w.mem.size)} "
                       f"from {peer[0]} in {received:.2f} s; running it on", err=True)
            if run_seconds > 0:
                with w.runner() as r:
                    r.wait(run_seconds)
            after = [w.writes(i) for i in range(len(w.vcpus))]
            click.echo(f"kvmio: the guest went on: writes {before} -> {after}", err=True)
    if json_path:
        write_json(json_path, {"peer": peer[0], "received_seconds": received,
                               "vcpus": len(before), "writes_on_arrival": before,
                               "writes_after_run": after, "ran_seconds": run_seconds})


@migrate.command("send")
@click.argument("address", metavar="ADDR")
@click.option("--mem", default="256M", show_default=True, metavar="SIZE",
              type=WORKLOAD_MEMORY, help="Guest memory of the workload.")
@click.option("--vcpus", default=1, show_default=True, type=click.IntRange(1, 16))
@click.option("--mode", type=click.Choice(["ring", "bitmap"]), default="ring",
              show_default=True, help="How the source finds dirty pages.")
@click.option("--ring", "ring_entries", default=4096, show_default=True, type=RingEntries(),
              help="Ring entries per vCPU (ring mode).")
@click.option("--after", default=1.0, show_default=True, type=FiniteFloatRange(0, MAX_WAIT),
              help="Seconds the guest dirties memory before the migration starts.")
@click.option("--downtime", default=DEFAULT_DOWNTIME, show_default=True,
              type=FiniteFloatRange(0.001, 60.0), help="Downtime limit (seconds).")
@click.option("--timeout", default=None, type=FiniteFloatRange(0.1, MAX_WAIT),
              help="Give up (the guest runs on) if not switched over after this long.")
@click.option("--auto-converge", is_flag=True,
              help="Slow the guest down (a dirty-rate limit) when passes stop shrinking.")
@click.option("--compress", is_flag=True,
              help="Send page data zstd-compressed where that saves an eighth or more (pays "
                   "on slow links).")
@click.option("--json", "json_path", type=OutputFile(), default=None,
              help="Write the migration report as JSON (with --kernel, also ring_overruns: "
                   "the ring overruns the tracker survived since the kernel started).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: verify the destination's certificate against these CA certificates "
                   "(PEM), and its name against ADDR's host (or --tls-name).")
@click.option("--tls-name", default=None, help="TLS: the name the certificate must have.")
@click.option("--plaintext", is_flag=True,
              help="Send unencrypted to an address beyond loopback.")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Migrate this Multiboot kernel instead of the workload (its output goes "
                   "to stdout; the destination listens with --guest kernel).")
@click.option("--append", "cmdline", default="", metavar="CMDLINE",
              help="Kernel command line (with --kernel).")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.pass_context
def send(ctx: click.Context, address: str, mem: int, vcpus: int,
         mode: Literal["ring", "bitmap"], ring_entries: int, after: float, downtime: float,
         timeout: float | None, auto_converge: bool, compress: bool, json_path: str | None,
         tls_ca: str | None, tls_name: str | None, plaintext: bool, kernel: str | None,
         cmdline: str, quiet: bool) -> None:
    """Boot the workload (or a kernel) and migrate it, live, to ADDR (HOST:PORT)."""
    host, port = parse_address(ctx, address, listening=False)
    if kernel is not None:
        if not MULTIBOOT_MEMORY.min <= mem <= MULTIBOOT_MEMORY.max:
            raise click.BadParameter(f"{format_size(mem)} is out of range for a kernel: it "
                                     f"must be {MULTIBOOT_MEMORY.describe()}", ctx,
                                     param_hint="'--mem'")
        if vcpus != 1 or auto_converge:
            raise click.BadParameter("a kernel has one vCPU and no auto-converge", ctx,
                                     param_hint="'--kernel'")
    _check_tls(ctx, host, tls_ca is not None, plaintext, "--tls-ca")
    client_tls = None
    if tls_ca is not None:
        try:
            client_tls = ssl.create_default_context(cafile=tls_ca)
        except (ssl.SSLError, OSError) as e:
            raise click.BadParameter(f"cannot load the CA certificates: {e}", ctx,
                                     param_hint="'--tls-ca'") from None
    elif tls_name is not None:
        raise click.BadParameter("needs --tls-ca", ctx, param_hint="'--tls-name'")
    ring = mode == "ring"
    if kernel is not None:
        _send_kernel(ctx, kernel, cmdline, mem, ring_entries if ring else None, host, port,
                     address, client_tls, tls_name, after, downtime, timeout, json_path,
                     compress)
        return
    with open_kvm(ctx) as kvm, \
            Workload(kvm, mem_size=mem, vcpus=vcpus, order="sequential", value="count",
                     shared=False, ring_entries=ring_entries if ring else None) as w, \
            DirtyTracker(w.vm, mode) as tracker, \
            w.runner(on_ring_full=tracker.on_ring_full if ring else None) as runner:
        runner.wait(after)  # the guest dirties memory meanwhile
        conn = _connect(host, port, address, client_tls, tls_name)
        console.print(f"migrating to {address} ({_mib(mem)} guest, {vcpus} vCPU"
                      f"{'s' if vcpus > 1 else ''}, {mode} mode)")
        with conn, Progress(TextColumn("{task.description}"), BarColumn(),
                            TimeElapsedColumn(), console=console, disable=quiet) as progress:
            task = progress.add_task("pass 0: every populated page", total=None)

            def on_pass(p: PassReport) -> None:
                what = "final pass (paused)" if p.final else f"pass {p.number}"
                progress.update(task, description=(
                    f"{what}: {p.pages:,} pages, {_mib(p.bytes)} at {_mib(p.bandwidth)}/s; "
                    f"{_mib(p.remaining)} were dirty, downtime estimate "
                    f"{p.estimated_downtime * 1e3:.0f} ms"))
                if not quiet:
                    progress.console.print(f"  {what}: {p.pages:,} pages ({p.zero_pages:,} zero), "
                                           f"{_mib(p.bytes)} in {p.seconds:.2f} s")

            with _in_doubt():
                report = w.migrate(conn, runner=runner, tracker=tracker, downtime=downtime,
                                   timeout=timeout, max_passes=1000 if timeout else 30,
                                   auto_converge=auto_converge, compress=compress,
                                   on_pass=on_pass)
        writes = [w.writes(i) for i in range(vcpus)]
    console.print(
        f"migrated in {report.total_seconds:.2f} s: {len(report.passes)} passes, "
        f"{report.pages_sent:,} pages, {_mib(report.bytes_sent)}; downtime "
        f"{report.downtime * 1e3:.0f} ms (estimated {report.estimated_downtime * 1e3:.0f} ms)"
        + (f"; throttled {len(report.throttle)} time(s)" if report.throttle else ""))
    if json_path:
        data: dict[str, Any] = report.to_json()
        data["writes_at_switch_over"] = writes
        write_json(json_path, data)
        console.print(f"wrote {json_path}")
