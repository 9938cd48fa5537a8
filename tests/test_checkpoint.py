"""kvmio.snapshot.checkpoint: a whole machine checkpointed in memory and reset, on the real
kernel.  A reset must bring back memory byte for byte and a machine that makes the same exits
with the same registers, in real, protected and long mode, in ring and bitmap mode, and for a
Multiboot kernel that runs on the in-kernel PIT and irqchip; the loop API runs, resets and
reports each reset.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from kvmio import (
    Interrupted,
    IoOut,
    Kvm,
    KvmClosedError,
    KvmInvalidArgumentError,
    KvmStateError,
    SnapshotError,
    Vcpu,
    Vm,
)
from kvmio.exits import VcpuExit
from kvmio.guests.modes import setup_real_mode
from kvmio.guests.multiboot import MultibootMachine, StopReason
from kvmio.snapshot import Checkpoint, ResetLoop
from test_state import CODE, COUNTER, DONE_PORT, MEM, _trace
from test_state import _machine as state_machine

from test_multiboot import kernels  # noqa: F401  (the session's test kernels, a fixture)

pytestmark = pytest.mark.kvm

#: A second slot far above 4 GiB, large and sparse: a reset must not care about its size.
HIGH_GPA = 8 << 30
HIGH_SIZE = 4 << 30


def _machine(kvm: Kvm, mode: str, ring: bool, *, high: bool = False) -> tuple[Vm, Vcpu]:
    """The state tests' loop guest, in dirty-logged memory (ring or bitmap)."""

    def memory(vm: Vm) -> None:
        if ring:
            vm.enable_dirty_ring(4096)
        vm.add_memory_region(0, MEM, log_dirty=True)
        if high:
            vm.add_memory_region(HIGH_GPA, HIGH_SIZE, log_dirty=True, noreserve=True)

    return state_machine(kvm, mode, memory=memory)


def _digest(vm: Vm) -> str:
    """A hash of every slot's content: each page that holds data (found through the
    memory's populated pages, so that a sparse 4 GiB slot costs what it holds) and is not
    all zero, with its index; every other page reads as zero."""
    h = hashlib.sha256()
    for slot, region in sorted(vm.regions.items()):
        words = region.array(np.uint64).reshape(-1, 512)  # pages as rows (no copy)
        pages = region.memory.populated_pages()
        nonzero = pages[words[pages].any(axis=1)] if len(pages) else pages
        h.update(slot.to_bytes(4, "little"))
        h.update(nonzero.tobytes())
        h.update(words[nonzero].tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "bitmap"])
def test_a_reset_machine_makes_the_same_exits_with_the_same_memory(
        kvm: Kvm, mode: str, ring: bool) -> None:
    vm, vcpu = _machine(kvm, mode, ring)
    with vm:
        for _ in range(9):  # the middle of the loop, stopped at an exit KVM has not finished
            assert isinstance(vcpu.run(), IoOut)
        assert vcpu.exit_pending
        with Checkpoint.take(vm) as ck:
            at = vcpu.get_regs()
            digest = _digest(vm)
            first = _trace(vcpu)
            assert _digest(vm) != digest
            for cycle in range(3):
                if cycle == 1:
                    vm.write_memory(COUNTER + 0x100, b"host")  # host writes are undone too
                report = ck.reset()
                assert report.path == ("ring" if ring else "bitmap")
                assert report.pages >= 1 and report.ns >= report.state_ns > 0
                assert _digest(vm) == digest
                assert vcpu.get_regs() == at
                assert _trace(vcpu) == first


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "bitmap"])
def test_random_guest_and_host_writes_over_two_slots_reset_exactly(kvm: Kvm, ring: bool) -> None:
    """Cycles of: the guest runs its loop (writing its counter page), the host writes random
    values over random pages of both slots (some twice, some in the sparse slot above 4 GiB),
    reset: memory is hashed against the checkpoint after every reset."""
    rng = random.Random(1234)
    vm, vcpu = _machine(kvm, "long", ring, high=True)
    with vm:
        vm.write_memory(HIGH_GPA + 123 * 4096, b"populated at the checkpoint")
        with Checkpoint.take(vm) as ck:
            digest = _digest(vm)
            for _ in range(25):
                _trace(vcpu)
                for _ in range(rng.randrange(1, 12)):
                    base, size = rng.choice([(0, MEM), (HIGH_GPA, HIGH_SIZE)])
                    page = rng.randrange(size // 4096)
                    data = rng.randbytes(rng.randrange(1, 64))
                    for _ in range(rng.choice([1, 1, 2])):
                        vm.write_memory(base + page * 4096 + rng.randrange(4096 - 64), data)
                report = ck.reset()
                assert report.path in ("ring", "bitmap")
                assert _digest(vm) == digest


def test_a_multiboot_kernel_on_the_pit_goes_on_the_same_after_each_reset(
        kvm: Kvm, kernels: dict[str, Path]) -> None:  # noqa: F811
    """The timer kernel programs the PIC and the PIT and prints "tick " from its IRQ0 handler
    three times: checkpointed at its first output, inside the first handler (IRQ0 in service,
    the PIT counting),
    every reset gives the same rest of the run."""
    with MultibootMachine(kvm, kernels["timer"], mem=MEM, ring_entries=1024) as m:

        def stop_at_first_tick(data: bytes) -> None:
            raise _FirstTick

        with pytest.raises(_FirstTick):
            m.run(timeout=20, on_output=stop_at_first_tick)
        with m.checkpoint() as ck:
            rest = m.run(timeout=20)
            assert rest.reason is StopReason.DEBUG_EXIT and rest.output.endswith(b"tick tick \n")
            for _ in range(2):
                report = ck.reset()
                assert report.path == "ring"
                again = m.run(timeout=20)
                assert (again.reason, again.exit_code, again.output) == (
                    rest.reason, rest.exit_code, rest.output)


class _FirstTick(Exception):
    pass


def test_checkpoint_refuses_unlogged_memory_and_a_closed_checkpoint_refuses_reset(
        kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.add_memory_region(0, MEM)
        vm.create_vcpu()
        with pytest.raises(SnapshotError):
            Checkpoint.take(vm)
    vm, _ = _machine(kvm, "real", ring=False)
    with vm:
        ck = Checkpoint.take(vm)
        ck.close()
        ck.close()  # idempotent
        assert ck.closed
        with pytest.raises(KvmClosedError):
            ck.reset()


def _spin(kvm: Kvm) -> tuple[Vm, Vcpu]:
    """A guest that increments a counter for ever (no exit)."""
    vm = kvm.create_vm()
    vm.set_tss_address()
    vm.add_memory_region(0, MEM, log_dirty=True)
    vm.write_memory(CODE, bytes([0xFF, 0x07, 0xEB, 0xFC]))  # inc [bx]; jmp -4
    vcpu = vm.create_vcpu()
    setup_real_mode(vcpu, CODE)
    r = vcpu.get_regs()
    r.rbx = COUNTER - CODE
    vcpu.set_regs(r)
    return vm, vcpu


def test_the_loop_ends_a_run_at_its_budget_and_resets(kvm: Kvm) -> None:
    vm, _vcpu = _spin(kvm)
    with vm, Checkpoint.take(vm) as ck, ResetLoop(ck, budget=0.01) as loop:
        digest = _digest(vm)
        stats = loop.run(5)
        assert len(stats.iterations) == 5
        for it in stats.iterations:
            assert it.timed_out and isinstance(it.exit, Interrupted)
            assert it.run_ns >= 10_000_000
            assert it.reset.pages >= 1  # the counter page
        assert _digest(vm) == digest
        assert stats.paths() == {"bitmap": 5}
        assert stats.resets_per_second > 0 and stats.reset_ns() > 0


def test_the_loop_runs_to_the_handler_s_exit_with_prepared_inputs(kvm: Kvm) -> None:
    vm, _vcpu = _machine(kvm, "protected", ring=True)

    def until_done(v: Vcpu, ex: VcpuExit) -> bool:
        return not (isinstance(ex, IoOut) and ex.port == DONE_PORT)

    seen: list[int] = []

    def prepare(vm_: Vm, i: int) -> None:
        vm_.write_memory(COUNTER, (i % 5).to_bytes(4, "little"))  # the loop's start
        seen.append(i)

    with vm, Checkpoint.take(vm) as ck, ResetLoop(ck, handler=until_done, budget=30) as loop:
        digest = _digest(vm)
        stats = loop.run(6, prepare)
        assert seen == list(range(6))
        assert all(isinstance(it.exit, IoOut) and it.exit.port == DONE_PORT and not it.timed_out
                   for it in stats.iterations)
        assert _digest(vm) == digest  # the prepared input was undone too
        assert stats.paths() == {"ring": 6}


def test_loop_arguments_are_checked(kvm: Kvm) -> None:
    vm, vcpu = _machine(kvm, "real", ring=False)
    with vm, Checkpoint.take(vm) as ck:
        with pytest.raises(KvmInvalidArgumentError):
            ResetLoop(ck, budget=0)
        with pytest.raises(KvmInvalidArgumentError):
            ResetLoop(ck, handler=42)  # type: ignore[arg-type]
        other = vm.create_vcpu()
        with pytest.raises(KvmInvalidArgumentError, match="not in the checkpoint"):
            ResetLoop(ck, other)
        with pytest.raises(KvmInvalidArgumentError):
            ResetLoop("checkpoint")  # type: ignore[arg-type]
        with ResetLoop(ck, vcpu) as loop, pytest.raises(KvmInvalidArgumentError):
            loop.run(-1)


def test_checkpoint_refuses_a_running_vcpu(kvm: Kvm) -> None:
    import threading

    from guests import wait_until

    vm, vcpu = _spin(kvm)
    with vm:
        t = threading.Thread(target=vcpu.run)
        t.start()
        try:
            wait_until(lambda: vcpu.running, what="the vCPU to enter KVM_RUN")
            with pytest.raises(KvmStateError):
                Checkpoint.take(vm)
        finally:
            vcpu.kick()
            t.join()


def test_reset_refuses_a_running_vcpu_and_touches_nothing(kvm: Kvm) -> None:
    import threading

    from guests import wait_until

    vm, vcpu = _spin(kvm)
    with vm, Checkpoint.take(vm) as ck:
        vcpu.run(max_time=0.01)  # counts a while: memory differs from the checkpoint
        vm.write_memory(COUNTER + 0x100, b"host")  # where the guest never writes
        t = threading.Thread(target=vcpu.run)
        t.start()
        try:
            wait_until(lambda: vcpu.running, what="the vCPU to enter KVM_RUN")
            with pytest.raises(KvmStateError, match=r"vCPU 0 is (running|inside run)"):
                ck.reset()
        finally:
            vcpu.kick()
            t.join()
        assert vm.read_memory(COUNTER + 0x100, 4) == b"host"  # memory was not touched
        ck.reset()  # stopped now: it goes through
        assert vm.read_memory(COUNTER + 0x100, 4) == bytes(4)
        assert int.from_bytes(vm.read_memory(COUNTER, 2), "little") == 0


def test_reset_holds_the_vcpus_until_it_ends(kvm: Kvm) -> None:
    """A thread that calls ``run()`` while a reset is under way waits for the reset to end:
    it cannot run the guest on half-restored memory or state."""
    import threading

    vm, vcpu = _spin(kvm)
    seen: list[bool] = []
    started = threading.Event()

    def during_reset() -> None:  # the last step inside the reset
        t = threading.Thread(target=lambda: (started.set(), vcpu.run(max_time=0.05)))
        t.start()
        started.wait()
        entered = False
        for _ in range(200):
            entered = entered or vcpu.running
            time.sleep(0.001)
        seen.append(entered)
        threads.append(t)

    threads: list[threading.Thread] = []
    with vm, Checkpoint.take(vm, on_reset=during_reset) as ck:
        ck.reset()
        for t in threads:
            t.join()
    assert seen == [False]  # 0.2 s inside the reset, and the vCPU never entered KVM_RUN


def test_a_multiboot_kernel_that_crashed_runs_again_after_a_reset(kvm: Kvm) -> None:
    """A harness's guest crashes (here: ``hlt`` then ``ud2`` with no IDT, a triple fault):
    the machine refuses to run on after such a stop, but a reset to a checkpoint taken before
    the crash brings the machine back whole, its stop flag included."""
    load = 0x100000
    magic, flags = 0x1BADB002, 0x00010000  # a.out kludge: the address fields follow
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                         load, load, 0, 0, load + 32)
    kernel = header + bytes([0xF4, 0x0F, 0x0B])  # hlt; ud2
    with MultibootMachine(kvm, kernel, mem=32 << 20, log_dirty=True, irqchip=False) as m:
        assert m.run(timeout=5).reason is StopReason.HALTED
        with m.checkpoint() as ck:
            assert m.run(timeout=5).reason is StopReason.SHUTDOWN
            with pytest.raises(KvmStateError):
                m.run(timeout=5)
            for _ in range(2):
                ck.reset()
                assert m.run(timeout=5).reason is StopReason.SHUTDOWN
