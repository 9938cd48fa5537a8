/* Multiboot (v1) entry: a stack, then kmain(magic, info). */
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

    .section .bss
    .align 16
    .skip 16384
stack_top:

    .section .text
    .globl _start
_start:
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
1:  cli
    hlt
    jmp 1b
    .section .note.GNU-stack, "", @progbits
