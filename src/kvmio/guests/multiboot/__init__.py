"""Boot Multiboot (v1) kernels the way QEMU's ``-kernel`` does, on one x86 vCPU.

The pieces, from the bottom up:

- :mod:`.header`: :func:`parse_header` finds and checks the Multiboot header;
- :mod:`.image`: :func:`parse_kernel` turns a kernel file (ELF32 ``EM_386``, or anything with
  the header's a.out kludge) into a :class:`KernelImage`: segments to copy to physical
  addresses, and an entry point;
- :mod:`.bootinfo`: :func:`memory_map` and :func:`write_boot_info` build the Multiboot
  information structure; :func:`parse_memory_size` reads sizes such as ``128M``;
- :mod:`.machine`: :class:`MultibootMachine` creates the VM (one memory slot of guest RAM from
  address 0), loads a kernel, enters it in the state the specification asks for, and runs it
  with the emulated devices of :mod:`kvmio.devices`; :func:`run_multiboot` does it all at once;
- :func:`render_vga_text` (from :mod:`kvmio.devices.vga`) shows the VGA text screen.

Guest physical layout:

==========================  ======================================================
``0x500``                   GDT (flat 4 GiB code and data, written by the mode helper)
below ``0x7000``            initial stack (the spec leaves ESP undefined: kernels set their own)
``0x10000`` .. ``0x9FC00``  free for the kernel
``0x9FC00`` .. ``0x100000`` reserved hole (EBDA, VGA memory at ``0xB8000``, BIOS area)
``0x100000`` .. RAM end     free for the kernel
after the kernel            the boot information block (see below)
==========================  ======================================================

Kernel segments must lie in one of the two "free for the kernel" ranges.  The memory slot covers
the hole too, so the VGA text buffer is ordinary RAM that the host reads back.

The boot information block starts at the first page boundary at or past the end of the
kernel's highest segment (bss included) and holds, in order: the Multiboot information
structure (EBX points here; 128 bytes reserved), the memory map, the boot loader name
``"kvmio"`` and the command line (NUL-terminated, at most 16 KiB).  A block that would reach
into the reserved hole (a kernel in low memory) goes to 1 MiB instead; one that does not fit in
guest RAM is refused.  Nothing is written at a fixed low address a kernel may use for its own
data.  QEMU's ``-kernel`` places its command line and loader name the same way (after the
page-aligned image); it keeps the information structure and memory map at ``0x9000``/``0x9500``
(its option ROM's area), which kvmio does not, so that a kernel owns all of low memory above
``0x10000``.

Devices (:mod:`kvmio.devices`; everything is port I/O except the catch-all MMIO answer):

- port ``0xE9`` (Bochs/QEMU debug console): every byte written is output; reads return
  ``0xE9``, the value kernels test to detect the console (QEMU's ``readback``);
- COM1 (``0x3F8``..``0x3FF``): a small 16550 model.  Bytes written to THR are output (not while
  the divisor latch is selected, nor in loopback mode, where they come back through RBR); LSR
  reads ``0x60`` (transmitter empty), plus data-ready in loopback; the other registers read back
  what was written (IIR reads "no interrupt pending").  It never raises interrupts;
- port ``0xF4`` (QEMU ``isa-debug-exit``): writing *v* ends the run with exit code
  ``(v << 1) | 1``, *v* being the whole value written (byte, word or dword);
- reset requests (``0xFE`` written to the keyboard controller's port ``0x64``, or a write with
  bit 2 set to port ``0xCF9``) and the QEMU/Bochs ACPI power-off (``0x2000`` written to port
  ``0x604`` or ``0xB004``) end the run;
- the VGA CRT controller's index/data ports (``0x3D4``/``0x3D5``) keep their registers (the
  cursor position reads back);
- every other port read, the keyboard controller's ``0x60``/``0x64`` included, returns **0**:
  all-zero is the idle state of the status bits that kernels busy-wait on (KBC "input buffer
  full", CMOS "update in progress"), so such loops end; every other port write is ignored;
- MMIO (guest physical addresses outside RAM): reads return all-ones bytes (``0xFF``...), as
  an empty bus does; writes are ignored.

Interrupts: by default the VM has KVM's in-kernel irqchip (8259 PICs, IOAPIC, local APIC) and
i8254 PIT, so a kernel can program the timer, unmask IRQ0 and wait for it in ``sti; hlt``.  KVM
then handles HLT in the kernel: there is no HLT exit, a HLT with interrupts enabled simply
waits, and a HLT with interrupts disabled (which nothing can end) is found by checking the
vCPU's MP state every :data:`~kvmio.guests.multiboot.machine.HALT_POLL_INTERVAL` seconds and
ends the run as :attr:`StopReason.HALTED`.  With ``irqchip=False`` nothing ever interrupts the
guest and every ``HLT`` exits and ends the run, whatever the interrupt flag;
:attr:`MultibootResult.detail` says which.
"""

from kvmio.devices.vga import render_vga_text
from kvmio.guests.multiboot.bootinfo import (
    DEFAULT_MEMORY,
    MemoryMapEntry,
    memory_map,
    parse_memory_size,
    write_boot_info,
)
from kvmio.guests.multiboot.header import (
    BOOTLOADER_MAGIC,
    HEADER_MAGIC,
    MultibootHeader,
    parse_header,
)
from kvmio.guests.multiboot.image import KernelImage, LoadSegment, parse_kernel
from kvmio.guests.multiboot.machine import (
    KernelRunner,
    MultibootMachine,
    MultibootResult,
    StopReason,
    run_multiboot,
)

__all__ = [
    "BOOTLOADER_MAGIC",
    "DEFAULT_MEMORY",
    "HEADER_MAGIC",
    "KernelImage",
    "KernelRunner",
    "LoadSegment",
    "MemoryMapEntry",
    "MultibootHeader",
    "MultibootMachine",
    "MultibootResult",
    "StopReason",
    "memory_map",
    "parse_header",
    "parse_kernel",
    "parse_memory_size",
    "render_vga_text",
    "run_multiboot",
    "write_boot_info",
]
