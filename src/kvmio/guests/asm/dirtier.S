# kvmio-guest: base=0x10000 mode=long
# The page-dirtying workload.  rdi points at a parameter block (see kvmio.guests.workload):
#   +0 base GPA   +8 pages   +16 stride (pages)   +24 order (0 sequential, 1 random)
#   +32 value (0 generation word, 1 write count, 2 constant)   +40 pace (delay loops/write)
#   +48 xorshift seed   +56 report_every   +64 writes done (out)   +72 generation (in)
#   +80 max_writes (0 = forever)   +88 byte offset in page   +96 constant   +104 port
#   +112 sequential cursor (out)
# Each iteration makes exactly one tracked write (8 bytes) and bumps the write count.  Every
# `report_every` writes it reports the count (low 32 bits) on `port`; after `max_writes` it
# reports on `port + 1` and halts.  Between gen_loaded and tracked_write (inclusive) rdx holds
# the value about to be written: the host updates it there when it changes the generation.
    .code64
    .intel_syntax noprefix
    .globl _start, gen_loaded, tracked_write
_start:
    mov r8,  [rdi+0]
    mov r9,  [rdi+8]
    mov r10, [rdi+16]
    mov r11, [rdi+48]
    mov r12, [rdi+112]
    mov r13, [rdi+64]
next:
    cmp qword ptr [rdi+24], 0
    jne random
    mov rax, r12
    add r12, r10
    cmp r12, r9
    jb 1f
    sub r12, r9
1:  mov [rdi+112], r12
    jmp addr
random:
    mov rax, r11
    shl rax, 13
    xor r11, rax
    mov rax, r11
    shr rax, 7
    xor r11, rax
    mov rax, r11
    shl rax, 17
    xor r11, rax
    mov rax, r11
    xor edx, edx
    div r9
    mov rax, rdx
addr:
    shl rax, 12
    add rax, r8
    add rax, [rdi+88]
    mov rcx, [rdi+32]
    mov rdx, [rdi+72]
gen_loaded:
    cmp rcx, 1
    jne 2f
    lea rdx, [r13+1]
2:  cmp rcx, 2
    jne 3f
    mov rdx, [rdi+96]
3:
tracked_write:
    mov [rax], rdx
    inc r13
    mov [rdi+64], r13
    mov rcx, [rdi+40]
    test rcx, rcx
    jz 5f
4:  dec rcx
    jnz 4b
5:  mov rcx, [rdi+56]
    test rcx, rcx
    jz 6f
    mov rax, r13
    xor edx, edx
    div rcx
    test rdx, rdx
    jnz 6f
    mov dx, [rdi+104]
    mov eax, r13d
    out dx, eax
6:  mov rcx, [rdi+80]
    test rcx, rcx
    jz next
    cmp r13, rcx
    jb next
    mov dx, [rdi+104]
    inc dx
    mov eax, r13d
    out dx, eax
    hlt
    jmp next
