# kvmio-guest: base=0x0 mode=real
# Hello over port I/O, in 16-bit real mode: prints a line on the debug port (0xE9), then
# reports the byte count on port 0x501 and halts.  Position independent: DS is set from CS.
    .code16
    .intel_syntax noprefix
    .globl _start
_start:
    push cs
    pop ds
    lea si, [msg]
    mov cx, msg_end - msg
    mov dx, 0xE9
1:  lodsb
    out dx, al
    loop 1b
    mov ax, msg_end - msg
    mov dx, 0x501
    out dx, ax
    hlt
    jmp _start
msg:
    .ascii "Hello from a kvmio guest!\n"
msg_end:
