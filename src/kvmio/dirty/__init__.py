"""Dirty page tracking: the per-vCPU dirty-log ring (:mod:`kvmio.dirty.ring`).

The dirty bitmap (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG) is on :class:`kvmio.Vm`, beside
:meth:`kvmio.Vm.collect_dirty_pages`, which works with either.
"""

from kvmio.dirty.ring import DirtyEntries, DirtyRing

__all__ = ["DirtyEntries", "DirtyRing"]
