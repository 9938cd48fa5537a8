# kvmio-guest: base=0x10000 mode=long
# A deliberately dense writer (about 1.4 instructions per page write, 8 writes per loop), to
# overrun a dirty ring on purpose: writes rax to every page of [rdi, rdi + rsi * 4096) in a
# tight loop, forever.  rsi must be a multiple of 8.  Position independent.
    .code64
    .intel_syntax noprefix
    .globl _start
_start:
    mov rbx, rdi
    shl rsi, 12
    add rsi, rdi
1:  mov [rbx], rax
    mov [rbx + 0x1000], rax
    mov [rbx + 0x2000], rax
    mov [rbx + 0x3000], rax
    mov [rbx + 0x4000], rax
    mov [rbx + 0x5000], rax
    mov [rbx + 0x6000], rax
    mov [rbx + 0x7000], rax
    add rbx, 0x8000
    cmp rbx, rsi
    jb 1b
    mov rbx, rdi
    jmp 1b
