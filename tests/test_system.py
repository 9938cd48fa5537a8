"""Kvm (the system fd): opening, capabilities, CPUID/MSR lists, bad device paths."""

from __future__ import annotations

import errno
import os

import pytest

from kvmio import API_VERSION, Cap, Hlt, IoOut, Kvm, KvmClosedError, KvmUnavailableError


def test_api_version_and_sizes(kvm: Kvm) -> None:
    assert kvm.api_version == API_VERSION == 12
    assert kvm.get_api_version() == 12
    # kvm_run plus the pages behind it (coalesced MMIO etc.): at least one page.
    assert kvm.get_vcpu_mmap_size() >= 4096
    assert kvm.get_nr_vcpus() >= 1
    assert kvm.get_max_vcpus() >= kvm.get_nr_vcpus()
    assert kvm.get_nr_memslots() >= 32


def test_dirty_ring_capabilities(kvm: Kvm) -> None:
    acq = kvm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL)
    legacy = kvm.check_extension(Cap.DIRTY_LOG_RING)
    assert kvm.max_dirty_ring_bytes() == max(acq, legacy)
    assert kvm.max_dirty_ring_bytes() in (0,) or kvm.max_dirty_ring_bytes() & (
        kvm.max_dirty_ring_bytes() - 1) == 0
    # x86 offers no backup bitmap.
    assert kvm.check_extension(Cap.DIRTY_LOG_RING_WITH_BITMAP) == 0


def test_unknown_capability_is_zero(kvm: Kvm) -> None:
    assert kvm.check_extension(100000) == 0


def test_supported_cpuid_and_msrs(kvm: Kvm) -> None:
    cpuid = kvm.get_supported_cpuid()
    leaves = {e.function for e in cpuid}
    assert 0 in leaves and 1 in leaves and 0x80000001 in leaves
    leaf0 = next(e for e in cpuid if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine")
    msrs = kvm.get_msr_index_list()
    assert 0x174 in msrs  # IA32_SYSENTER_CS
    assert len(set(msrs)) == len(msrs)


def test_missing_device_is_clear_error(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist") as ei:
        Kvm(os.path.join(tmp_path, "nokvm"))
    assert ei.value.errno == errno.ENOENT
    assert isinstance(ei.value, OSError)


def test_not_a_kvm_device(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(KvmUnavailableError, match="not a KVM device") as ei:
        Kvm("/dev/null")
    assert ei.value.errno == errno.ENOTTY


@pytest.mark.kvm
def test_permission_denied(tmp_path: os.PathLike[str]) -> None:
    if os.geteuid() == 0:
        # root bypasses file modes; drop to an unprivileged user in a child to check the path.
        import subprocess
        import sys

        code = ("import os, kvmio\nos.setgid(65534); os.setuid(65534)\n"
                "try:\n    kvmio.Kvm()\nexcept kvmio.KvmUnavailableError as e:\n"
                "    print(type(e).__name__, e.errno, 'permission denied' in str(e))\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
        assert p.stdout.split() == ["KvmUnavailableError", str(errno.EACCES), "True"]
    else:  # pragma: no cover - depends on who runs the suite
        with pytest.raises(KvmUnavailableError, match="permission denied") as ei:
            Kvm()
        assert ei.value.errno == errno.EACCES


@pytest.mark.kvm
def test_close_is_idempotent_and_use_after_close_raises() -> None:
    k = Kvm()
    k.close()
    k.close()
    assert k.closed
    for call in (lambda: k.check_extension(Cap.IRQCHIP), k.create_vm):
        with pytest.raises(KvmClosedError, match="this Kvm is closed") as ei:
            call()
        assert ei.value.errno is None  # refused by kvmio: the fd number is not used again


@pytest.mark.kvm
def test_vm_outlives_system_fd() -> None:
    """A VM holds its own fd: closing /dev/kvm leaves it fully usable (a guest runs)."""
    k = Kvm()
    vm = k.create_vm()
    k.close()
    assert k.closed
    with vm:
        vm.add_memory_region(0, 1 << 20)
        vm.write_memory(0x1000, bytes([0xB0, 0x41, 0xE6, 0xE9, 0xF4]))  # out 0xE9 'A'; hlt
        vcpu = vm.create_vcpu()
        s = vcpu.get_sregs()
        s.cs.base = s.cs.selector = 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip = 0x1000
        vcpu.set_regs(r)
        assert vcpu.run() == IoOut(0xE9, 1, 1, b"A")
        assert vcpu.run() == Hlt()


def test_fds_are_close_on_exec(kvm: Kvm) -> None:
    import fcntl

    assert fcntl.fcntl(kvm.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        # KVM creates VM and vCPU fds with O_CLOEXEC itself.
        assert fcntl.fcntl(vm.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(v.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
