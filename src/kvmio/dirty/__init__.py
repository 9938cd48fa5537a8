"""Dirty page tracking below the VM object: the per-vCPU ring (:mod:`kvmio.dirty.ring`), the
rings of one VM and their shared accounting (:mod:`kvmio.dirty.ringset`), and the page-set type
every collection returns (:mod:`kvmio.dirty.pages`).

The dirty bitmap (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG) is a VM ioctl, on :class:`kvmio.Vm`,
beside :meth:`kvmio.Vm.collect_dirty_pages`, which works with either.  Nothing here imports the
vCPU or VM modules.
"""

from kvmio.dirty.pages import PageSet, bitmap_to_pages, coalesce
from kvmio.dirty.ring import DirtyEntries, DirtyRing
from kvmio.dirty.ringset import Harvest, RingSet

__all__ = ["DirtyEntries", "DirtyRing", "Harvest", "PageSet", "RingSet", "bitmap_to_pages",
           "coalesce"]
