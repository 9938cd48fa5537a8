# kvmio-guest: base=0x10000 mode=long
# Long-mode probe: reports EFER's low half (LMA set) on port 0x10, writes the 64-bit value in
# rsi at [rdi] (both set by the host; rdi may be far above 4 GiB), reads it back and reports
# its two halves on ports 0x11 (low) and 0x12 (high); halts.
    .code64
    .intel_syntax noprefix
    .globl _start
_start:
    mov ecx, 0xC0000080
    rdmsr
    out 0x10, eax
    mov [rdi], rsi
    mov rbx, [rdi]
    mov eax, ebx
    out 0x11, eax
    shr rbx, 32
    mov eax, ebx
    out 0x12, eax
    hlt
    jmp _start
