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
    # x86-only capabilities (their numbers are fixed across architectures).
    PIT2 = 33
    SET_TSS_ADDR = 4
    SET_IDENTITY_MAP_ADDR = 37
    XSAVE = 55
    XCRS = 56
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    EXT_CPUID = 7
