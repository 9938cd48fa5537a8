"""Helpers for tests that run the built-in guests."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmio import DirtyRingFull, IoOut, Kvm, Vcpu, Vm
from kvmio.exits import VcpuExit
from kvmio.guests.modes import setup_long_mode, setup_protected_mode, setup_real_mode
from kvmio.guests.programs import program
from kvmio.guests.workload import MEM_BASE, Workload


def boot(kvm: Kvm, name: str, mem: int = 4 << 20, **regs: int) -> tuple[Vm, Vcpu]:
    """A VM with ``mem`` bytes at GPA 0 running built-in program ``name`` in its CPU mode."""
    vm = kvm.create_vm()
    vm.add_memory_region(0, mem)
    prog = program(name)
    at = prog.load(vm, 0x10000)
    vcpu = vm.create_vcpu()
    if prog.mode == "real":
        setup_real_mode(vcpu, at)
    elif prog.mode == "protected":
        setup_protected_mode(vcpu, vm, at)
    else:
        setup_long_mode(vcpu, vm, at)
    if regs:
        r = vcpu.get_regs()
        for k, v in regs.items():
            setattr(r, k, v)
        vcpu.set_regs(r)
    return vm, vcpu


#: Entries KVM keeps free at the end of a dirty ring (KVM_DIRTY_RING_RSVD_ENTRIES, plus the
#: CPU's own dirty-log buffer, which this host does not have: it emulates every instruction).
RING_RESERVED = 64


def soft_limit(size: int) -> int:
    """A ring's soft limit: once this many entries are used, KVM_RUN exits ring-full (the
    kernel checks it before entering the guest, so a ring-full exit finds at least this many
    dirty entries)."""
    return size - RING_RESERVED


def run_collecting(vcpu: Vcpu, limit: int = 10_000) -> tuple[dict[int, list[bytes]], VcpuExit]:
    """Run until an exit other than port output; return output by port and that exit."""
    out: dict[int, list[bytes]] = {}
    for _ in range(limit):
        ex = vcpu.run()
        if isinstance(ex, IoOut):
            out.setdefault(ex.port, []).append(ex.data)
            continue
        return out, ex
    raise AssertionError("guest did not stop")


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Wait for a condition (never a fixed sleep): poll ``predicate`` until it holds, or fail
    after ``timeout`` seconds (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.001)


def burst(w: Workload, vcpu: int = 0, pages: int = 8192) -> None:
    """Point a workload's vCPU at the dense 'burst' writer (8 page writes per 11 instructions,
    so one emulation batch pushes ~745 ring entries: it overruns a ring on purpose)."""
    code = program("burst")
    w.vm.write_memory(0x30000, code.code)  # position independent
    v = w.vcpus[vcpu]
    r = v.get_regs()
    r.rip, r.rdi, r.rsi, r.rax = 0x30000, MEM_BASE, pages, 0xAA
    v.set_regs(r)


def overrun_ring(v: Vcpu) -> None:
    """Run a vCPU pointed at the burst writer until a ring-full exit finds its ring completely
    full (overrun).  A host interrupt can end a batch below the ring's end; then drain and go
    again: the next batches overrun it, by construction."""
    ring = v.dirty_ring
    for _ in range(100):
        assert isinstance(v.run(), DirtyRingFull)
        if ring.count_dirty() == ring.size:
            return
        ring.drain()
    raise AssertionError("the burst guest never overran the ring")
