# kvmio-guest: base=0x10000 mode=long
# An x87 instruction, which this host's instruction emulator cannot run: used to provoke
# KVM_EXIT_INTERNAL_ERROR (emulation failure) on purpose.
    .code64
    .intel_syntax noprefix
    .globl _start
_start:
    fld1
    hlt
