"""Benchmark: capture and restore of a machine state (``kvmio.snapshot.state``) per vCPU.

Reference, measured in the same run on the same vCPU: one KVM_GET_REGS ioctl issued from
Python straight to the native ioctl wrapper (the cheapest vCPU ioctl there is, ~4 us of
kernel time on this project's nested CI host).  Floor: the restore's own ioctls issued by the
one native call with nothing around it (``MachineState.plan().run``), i.e. what the kernel
costs.  Times are CPU time of the calling thread (``time.thread_time_ns``; an ioctl's kernel
time counts), medians over rounds.

Rows, for a long-mode guest with 1 and 2 vCPUs, without and with the in-kernel irqchip and
PIT: the reference; each SET ioctl of the restore alone (which ones dominate); the floor;
``restore()``; ``Restorer.restore()`` (bound once: a reset loop); ``capture()``; and a reset
as a fuzzer does it: the guest runs to its exit, then ``Restorer.restore()`` is timed (the
caches are cold then).  Per vCPU: the 2-vCPU time minus the 1-vCPU time.

Usage: python bench/state.py [--rounds N] [--calls N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from kvmio import Kvm, Vcpu, Vm
from kvmio._abi import ffi, lib
from kvmio.guests.modes import setup_long_mode
from kvmio.snapshot import MachineState, capture, restore
from kvmio.snapshot.state import finish_pending_exits

clock = time.thread_time_ns

#: inc dword [rdi]; out 0xe9, eax; jmp back: one I/O exit per loop.
GUEST = bytes([0xFF, 0x07, 0x8B, 0x07, 0xE7, 0xE9, 0xEB, 0xF8])
MEM = 4 << 20


def machine(kvm: Kvm, vcpus: int, irqchip: bool) -> tuple[Vm, list[Vcpu]]:
    vm = kvm.create_vm()
    vm.set_tss_address()
    if irqchip:
        vm.create_irqchip()
        vm.create_pit2()
    vm.add_memory_region(0, MEM)
    vm.write_memory(0x10000, GUEST)
    cpuid = kvm.get_supported_cpuid()
    out = []
    for i in range(vcpus):
        v = vm.create_vcpu(i)
        v.set_cpuid2(cpuid)
        setup_long_mode(v, vm, 0x10000, write_tables=i == 0)
        r = v.get_regs()
        r.rdi = 0x20000 + 64 * i
        v.set_regs(r)
        if irqchip and i:  # an AP waits for INIT/SIPI under the in-kernel LAPIC: not here
            v.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        out.append(v)
    for v in out:  # each vCPU to a settled exit
        v.run()
        v.complete_pending_exit()
    return vm, out


def per_call(f: Callable[[], Any], calls: int, rounds: int) -> float:
    """Median CPU ns of one call of ``f``."""
    f()
    results = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(calls):
            f()
        results.append((clock() - t0) / calls)
    return statistics.median(results)


def cold_reset(vm: Vm, vcpus: list[Vcpu], state: MachineState, calls: int,
               rounds: int) -> tuple[float, float]:
    """Median CPU ns of a restore right after the guest ran (the vCPUs to their next exit),
    and of its first step alone (finishing the exits the guest stopped at)."""
    r = state.restorer(vm, vcpus)
    results, finishing = [], []
    for _ in range(rounds):
        total = 0
        for _ in range(calls):
            for v in vcpus:
                v.run()
            t0 = clock()
            r.restore()  # finishes the pending exits too, as a reset must
            total += clock() - t0
        results.append(total / calls)
        total = 0
        for _ in range(calls):
            for v in vcpus:
                v.run()
            t0 = clock()
            finish_pending_exits(vcpus)
            total += clock() - t0
            r.restore()
        finishing.append(total / calls)
    return statistics.median(results), statistics.median(finishing)


def ioctl_costs(vm: Vm, vcpu: Vcpu, state: MachineState, calls: int,
                rounds: int) -> dict[str, float]:
    """Each SET ioctl of the restore alone, from the state's own prepared buffers."""
    plan = state.plan()
    vm_batch, vcpu_batch = plan.parts[0], plan.parts[1]
    out: dict[str, float] = {}
    for batch, fd in ((vm_batch, vm.fd), (vcpu_batch, vcpu.fd)):
        for k, name in enumerate(batch.names):
            arg = ffi.cast("void *", batch.arg(k))
            req = getattr(lib, name)
            label = name if name != "KVM_SET_IRQCHIP" else \
                f"{name}({int(batch.arg(k).chip_id)})"
            out[label] = per_call(lambda a=arg, r=req, f=fd: lib.kvmio_ioctl(f, r, a),
                                  calls, rounds)
    return out


def measure(kvm: Kvm, vcpus: int, irqchip: bool, calls: int, rounds: int) -> dict[str, Any]:
    vm, vs = machine(kvm, vcpus, irqchip)
    try:
        state = capture(vm, vs)
        restore(state, vm, vs)  # builds the buffers, installs what is skipped later
        regs = ffi.new("struct kvm_regs *")
        fd0 = vs[0].fd
        ref = per_call(lambda: lib.kvmio_ioctl(fd0, lib.KVM_GET_REGS, regs), calls, rounds)
        plan = state.plan()
        fds = [vm.fd] + [v.fd for v in vs]
        skip = tuple(plan.starts[1:])  # the CPUIDs: installed, restore() skips them too
        assert all(plan.names[k] == "KVM_SET_CPUID2" for k in skip)
        floor = per_call(lambda: plan.run(fds, skip), calls, rounds)
        restorer = state.restorer(vm, vs)
        return {
            "ref": ref, "floor": floor,
            "restore": per_call(lambda: restore(state, vm, vs), calls, rounds),
            "restorer": per_call(restorer.restore, calls, rounds),
            "capture": per_call(lambda: capture(vm, vs), max(calls // 10, 10), rounds),
            **dict(zip(("cold", "finish"), cold_reset(vm, vs, state, max(calls // 4, 10),
                                                      rounds), strict=True)),
            "ioctls": ioctl_costs(vm, vs[0], state, calls, rounds) if vcpus == 1 else {},
            "cpuid": per_call(lambda: lib.kvmio_ioctl(fd0, lib.KVM_SET_CPUID2,
                                                      ffi.cast("void *", plan.arg(skip[0]))),
                              max(calls // 10, 10), rounds),
        }
    finally:
        vm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    args = ap.parse_args()
    calls, rounds = (60, 3) if args.quick else (args.calls, args.rounds)
    with Kvm() as kvm:
        for irqchip in (False, True):
            one = measure(kvm, 1, irqchip, calls, rounds)
            two = measure(kvm, 2, irqchip, calls, rounds)
            ref = one["ref"]
            title = "with the in-kernel irqchip and PIT" if irqchip else "without irqchip"
            print(f"\n## long-mode guest, {title}\n")
            print(f"reference: one KVM_GET_REGS ioctl = {ref / 1e3:.2f} us\n")
            print("| case | 1 vCPU us | x KVM_GET_REGS | x floor | 2 vCPUs us | per vCPU us |")
            print("|---|---|---|---|---|---|")
            for key, name in (("floor", "floor: the restore's ioctls, one native call"),
                              ("restore", "restore()"),
                              ("restorer", "Restorer.restore() (bound once)"),
                              ("cold", "reset right after the guest ran (Restorer)"),
                              ("finish", "of which: finishing the exit the guest stopped at"),
                              ("capture", "capture()")):
                a, b = one[key], two[key]
                print(f"| {name} | {a / 1e3:.1f} | {a / ref:.1f}x | {a / one['floor']:.2f}x "
                      f"| {b / 1e3:.1f} | {(b - a) / 1e3:.1f} |")
            print(f"\nKVM_SET_CPUID2 (skipped when installed): {one['cpuid'] / 1e3:.1f} us "
                  f"({one['cpuid'] / ref:.1f}x)\n")
            print("| SET ioctl (1 vCPU), in restore order | us | x KVM_GET_REGS |")
            print("|---|---|---|")
            costs = one["ioctls"]
            for name, ns in costs.items():
                print(f"| {name} | {ns / 1e3:.2f} | {ns / ref:.1f}x |")


if __name__ == "__main__":
    main()
