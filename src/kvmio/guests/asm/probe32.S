# kvmio-guest: base=0x10000 mode=protected
# Protected-mode probe: reports CR0 on port 0x10, then writes 0xC0FFEE11 at [edi] (set by the
# host), reads it back through another register and reports it on port 0x11; halts.
    .code32
    .intel_syntax noprefix
    .globl _start
_start:
    mov eax, cr0
    out 0x10, eax
    mov dword ptr [edi], 0xC0FFEE11
    mov ebx, [edi]
    mov eax, ebx
    out 0x11, eax
    hlt
    jmp _start
