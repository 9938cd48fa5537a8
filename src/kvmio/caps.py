"""KVM capabilities (``KVM_CAP_*``), as an enum whose values come from <linux/kvm.h>."""

from __future__ import annotations

import enum

from kvmio._abi import lib


class Cap(enum.IntEnum):
    """Capabilities kvmio knows by name; any int can still be passed to ``check_extension``."""

    IRQCHIP = lib.KVM_CAP_IRQCHIP
    HLT = lib.KVM_CAP_HLT
    USER_MEMORY = lib.KVM_CAP_USER_MEMORY
    NR_VCPUS = lib.KVM_CAP_NR_VCPUS
    MAX_VCPUS = lib.KVM_CAP_MAX_VCPUS
    MAX_VCPU_ID = lib.KVM_CAP_MAX_VCPU_ID
    NR_MEMSLOTS = lib.KVM_CAP_NR_MEMSLOTS
    READONLY_MEM = lib.KVM_CAP_READONLY_MEM
    IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
    INTERNAL_ERROR_DATA = lib.KVM_CAP_INTERNAL_ERROR_DATA
    ADJUST_CLOCK = lib.KVM_CAP_ADJUST_CLOCK
    SYNC_MMU = lib.KVM_CAP_SYNC_MMU
    MULTI_ADDRESS_SPACE = lib.KVM_CAP_MULTI_ADDRESS_SPACE
    MANUAL_DIRTY_LOG_PROTECT2 = lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    DIRTY_LOG_RING = lib.KVM_CAP_DIRTY_LOG_RING
    DIRTY_LOG_RING_ACQ_REL = lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    DIRTY_LOG_RING_WITH_BITMAP = lib.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
    # x86 capabilities (only x86's headers define them).
    if hasattr(lib, "KVM_CAP_PIT2"):
        PIT2 = lib.KVM_CAP_PIT2
        SET_TSS_ADDR = lib.KVM_CAP_SET_TSS_ADDR
        SET_IDENTITY_MAP_ADDR = lib.KVM_CAP_SET_IDENTITY_MAP_ADDR
        XSAVE = lib.KVM_CAP_XSAVE
        XSAVE2 = lib.KVM_CAP_XSAVE2
        XCRS = lib.KVM_CAP_XCRS
        VCPU_EVENTS = lib.KVM_CAP_VCPU_EVENTS
        DEBUGREGS = lib.KVM_CAP_DEBUGREGS
        EXT_CPUID = lib.KVM_CAP_EXT_CPUID
