"""The KVM system file descriptor (``/dev/kvm``): :class:`Kvm`."""

from __future__ import annotations

import errno as _errno
import os

from kvmio import _abi, _check
from kvmio._abi import IS_X86, FdOwner, ffi, lib
from kvmio.caps import Cap
from kvmio.errors import KvmError, KvmUnavailableError, KvmUnsupportedError
from kvmio.vm import Vm, VmLimits
from kvmio.x86 import CpuidEntry, cpuid_entries

DEFAULT_PATH = "/dev/kvm"
#: The only KVM API version there has ever been (KVM_GET_API_VERSION).
API_VERSION = 12


class Kvm(FdOwner):
    """An open ``/dev/kvm``: capability queries and VM creation.

    >>> with Kvm() as kvm:                                  # doctest: +SKIP
    ...     kvm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL)
    65536
    """

    _what = "Kvm"

    def __init__(self, path: str = DEFAULT_PATH):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailableError(
                f"{path} does not exist: KVM is not available on this machine (is the kvm "
                "module loaded, and is hardware virtualisation enabled?)",
                errno=e.errno, ioctl="open") from e
        except PermissionError as e:
            raise KvmUnavailableError(
                f"permission denied opening {path}: run as root or join the group that owns it "
                "(usually 'kvm')", errno=e.errno, ioctl="open") from e
        except OSError as e:
            raise KvmUnavailableError(f"cannot open {path}: {e.strerror}", errno=e.errno,
                                      ioctl="open") from e
        super().__init__(fd)
        self.path = path
        try:
            version = self._ioctl(lib.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
        except KvmError as e:
            self.close()
            raise KvmUnavailableError(f"{path} is not a KVM device", errno=e.errno,
                                      ioctl="KVM_GET_API_VERSION") from e
        if version != API_VERSION:
            self.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; kvmio supports only {API_VERSION}")
        self.api_version = version
        self._msrs: list[int] | None = None

    def close(self) -> None:
        """Close ``/dev/kvm``.  VMs already created stay usable (they hold their own fds)."""
        self._close_fd()


    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12)."""
        return self._ioctl(lib.KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 if unsupported, else a capability-specific
        value (e.g. the maximum ring size in bytes for the dirty-ring capabilities)."""
        cap = _check.u32("cap", cap)
        return self._ioctl(lib.KVM_CHECK_EXTENSION, int(cap), name="KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of each vCPU's shared ``kvm_run`` area."""
        return self._ioctl(lib.KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")

    def get_nr_vcpus(self) -> int:
        """Recommended maximum vCPUs per VM (KVM_CAP_NR_VCPUS; 4 if not reported)."""
        return self.check_extension(Cap.NR_VCPUS) or 4

    def get_max_vcpus(self) -> int:
        """Hard maximum vCPUs per VM (KVM_CAP_MAX_VCPUS, falling back to NR_VCPUS)."""
        return self.check_extension(Cap.MAX_VCPUS) or self.get_nr_vcpus()

    def get_nr_memslots(self) -> int:
        """Memory slots per address space (KVM_CAP_NR_MEMSLOTS; 32 if not reported)."""
        return self.check_extension(Cap.NR_MEMSLOTS) or 32

    def max_dirty_ring_bytes(self) -> int:
        """The largest dirty ring the kernel allows, in bytes; 0 without dirty-ring support.

        Asks both KVM_CAP_DIRTY_LOG_RING_ACQ_REL and KVM_CAP_DIRTY_LOG_RING, so the answer is
        right on kernels that offer only the ACQ_REL variant (arm64) too.
        """
        return max(self.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL),
                   self.check_extension(Cap.DIRTY_LOG_RING))

    def get_supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID (x86): the CPUID leaves KVM can expose to a guest."""
        _require_x86("KVM_GET_SUPPORTED_CPUID")
        max_entries = _check.integer("max_entries", max_entries, lo=1, hi=1 << 16)
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"entries": max_entries})
            buf.nent = max_entries
            try:
                self._ioctl(lib.KVM_GET_SUPPORTED_CPUID, buf, name="KVM_GET_SUPPORTED_CPUID")
            except KvmError as e:
                if e.errno == _errno.E2BIG and max_entries < 1 << 16:
                    max_entries = min(max_entries * 2, 1 << 16)
                    continue
                raise
            return cpuid_entries(buf)

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST (x86): MSRs that KVM_GET/SET_MSRS support."""
        _require_x86("KVM_GET_MSR_INDEX_LIST")
        return list(self._msr_index_list())

    def _msr_index_list(self) -> list[int]:
        # The list does not change while the kvm module is loaded: asked once per Kvm.
        if self._msrs is None:
            self._msrs = self._read_msr_index_list()
        return self._msrs

    def _read_msr_index_list(self) -> list[int]:
        n = 256
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"indices": n})
            buf.nmsrs = n
            try:
                self._ioctl(lib.KVM_GET_MSR_INDEX_LIST, buf, name="KVM_GET_MSR_INDEX_LIST")
            except KvmError as e:
                if e.errno == _errno.E2BIG and buf.nmsrs > n:
                    n = int(buf.nmsrs)
                    continue
                raise
            return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new, empty virtual machine."""
        vm_type = _check.u32("vm_type", vm_type)
        limits = VmLimits(vcpu_mmap_size=self.get_vcpu_mmap_size(),
                          max_vcpus=self.get_max_vcpus(),
                          max_vcpu_id=self.check_extension(Cap.MAX_VCPU_ID)
                          or self.get_max_vcpus(),
                          max_memslots=self.get_nr_memslots(),
                          msr_index_list=tuple(self._msr_index_list()) if IS_X86 else ())
        fd = self._ioctl(lib.KVM_CREATE_VM, vm_type, name="KVM_CREATE_VM")
        return Vm(fd, limits)


def _require_x86(what: str) -> None:
    if not IS_X86:
        raise KvmUnsupportedError(f"{what} exists only on x86_64 (this is {_abi.ARCH})")
