# kvmio-guest: base=0x10000 mode=long
# A deliberately dense writer (about 4 instructions per page write), to overrun a dirty ring on
# purpose: writes rax to every page of [rdi, rdi + rsi * 4096) in a tight loop, forever.
    .code64
    .intel_syntax noprefix
    .globl _start
_start:
    mov rbx, rdi
    shl rsi, 12
    add rsi, rdi
1:  mov [rbx], rax
    add rbx, 4096
    cmp rbx, rsi
    jb 1b
    mov rbx, rdi
    jmp 1b
