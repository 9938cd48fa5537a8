"""Checkpoints of a running machine: its state kept in memory, restored, written to bytes.

==================  ==========================================================================
``state``           the machine state apart from guest memory: :class:`MachineState` (the
                    VM's clock, irqchip and PIT, every vCPU's registers, MSRs, LAPIC...,
                    and the port devices), :func:`capture`, :func:`restore`, and its
                    serialized form (:meth:`MachineState.to_bytes`)
``memory``          guest memory kept in memory: :class:`MemoryCheckpoint` (the
                    populated pages copied, reset in O(pages changed since))
``checkpoint``      both bound together: :class:`Checkpoint` (take, reset) and
                    :class:`ResetLoop` (run, reset, run again, with statistics)
``changelog``       the pages a VM changed since the last look (:class:`ChangeLog`: the
                    dirty log, or a tracker's, plus host writes; slots it cannot know named
                    whole), for snapshot diffs and migration passes
``files``           snapshots on disk: full and diff layers (:func:`files.save_snapshot`,
                    :class:`files.Snapshotter`), restored into a new VM lazily or eagerly
                    (:func:`files.restore_snapshot`), merged, inspected; the format
==================  ==========================================================================

The order in which a state is written back, and why, is in :mod:`kvmio.snapshot.state`.
This package sits above the devices, the tracker and the VM, and below the guests: it uses
no cffi of its own (the raw buffers are built by :mod:`kvmio.vcpu` and :mod:`kvmio.vm`).
"""

from kvmio.errors import SnapshotError
from kvmio.snapshot.changelog import ChangeLog, Changes
from kvmio.snapshot.checkpoint import Checkpoint, Iteration, LoopStats, ResetLoop, ResetReport
from kvmio.snapshot.memory import MemoryCheckpoint, ResetStats
from kvmio.snapshot.state import (
    FORMAT_VERSION,
    MachineState,
    Restorer,
    VcpuState,
    VmState,
    capture,
    restore,
)

__all__ = [
    "FORMAT_VERSION",
    "ChangeLog",
    "Changes",
    "Checkpoint",
    "Iteration",
    "LoopStats",
    "MachineState",
    "MemoryCheckpoint",
    "ResetLoop",
    "ResetReport",
    "ResetStats",
    "Restorer",
    "SnapshotError",
    "VcpuState",
    "VmState",
    "capture",
    "restore",
]
