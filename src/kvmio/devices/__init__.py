"""Emulated devices for small machines, apart from any boot code.

==================  ==========================================================================
``base``            the :class:`PortDevice` interface, the events a write reports
                    (:class:`Output`, :class:`DebugExit`, :class:`ResetRequest`,
                    :class:`PowerOff`), and the checking of saved state
``bus``             :class:`IoBus`: routes port accesses; unclaimed ports read 0
``uart``            :class:`Uart16550` (COM1)
``debugcon``        :class:`DebugConsole` (port 0xE9) and :class:`DebugExitPort` (0xF4)
``vga``             :func:`render_vga_text` and :class:`VgaText` (CRT controller registers)
``power``           :class:`PowerControl`: reset (0x64, 0xCF9) and ACPI power-off ports
==================  ==========================================================================

Every device has ``state()`` (plain ints and bytes) and ``restore(state)`` (checked: a state
the device cannot have raises :class:`~kvmio.errors.KvmInvalidArgumentError` and changes
nothing), so that a snapshot can carry them.  This package imports only :mod:`kvmio.errors`,
:mod:`kvmio.exits` and :mod:`kvmio._abi`: it sits below the VM, vCPU and guest code.
"""

from kvmio.devices.base import (
    DebugExit,
    DeviceEvent,
    DeviceState,
    Output,
    PortDevice,
    PowerOff,
    ResetRequest,
)
from kvmio.devices.bus import IoBus
from kvmio.devices.debugcon import DebugConsole, DebugExitPort
from kvmio.devices.power import PowerControl
from kvmio.devices.uart import Uart16550
from kvmio.devices.vga import VgaText, render_vga_text

__all__ = [
    "DebugConsole",
    "DebugExit",
    "DebugExitPort",
    "DeviceEvent",
    "DeviceState",
    "IoBus",
    "Output",
    "PortDevice",
    "PowerControl",
    "PowerOff",
    "ResetRequest",
    "Uart16550",
    "VgaText",
    "render_vga_text",
]
