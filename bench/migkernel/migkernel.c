/* The migration benchmark's guest: a Multiboot kernel that both kvmio and QEMU boot.

   It increments the first 32-bit word of every page of an area, in ascending order, over and
   over (QEMU's own migration test does this with a byte): at any moment the pages before the
   current one hold n + 1 and the rest n, so after a migration the destination's area must
   show exactly that shape, and any page that missed an update breaks it.

   Command line (key=value, space separated):
     load=idle|wset|paced|dense   idle: write the area once, then spin without writing;
                                  wset / paced: the pattern at `rate` pages per second;
                                  dense: the pattern unpaced, 8 pages per loop iteration
     pages=N                      the area's size in pages (from 16 MiB up)
     rate=N                       pages per second (wset, paced)
     tsc_khz=N                    the TSC's frequency, for pacing (the host passes it)
   The word at 0x8000 counts passes over the area (the host reads it as progress).
   Built with -mgeneral-regs-only: the emulator here runs no x87/SSE. */

typedef unsigned int u32;
typedef unsigned long long u64;

#define AREA ((volatile u32 *)0x1000000)   /* 16 MiB */
#define PASSES ((volatile u32 *)0x8000)
#define WORDS_PER_PAGE 1024

struct mb_info { u32 flags, mem_lower, mem_upper, boot_device, cmdline; };

static u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static int starts(const char *s, const char *p) {
    while (*p) if (*s++ != *p++) return 0;
    return 1;
}

static u32 number(const char *s) {
    u32 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u32)(*s++ - '0');
    return v;
}

/* The value of key=... in the command line, or 0. */
static const char *arg(const char *cmd, const char *key) {
    const char *s = cmd;
    while (s && *s) {
        while (*s == ' ') s++;
        if (starts(s, key)) return s;
        while (*s && *s != ' ') s++;
    }
    return 0;
}

static u32 num_arg(const char *cmd, const char *key, u32 dflt) {
    const char *s = arg(cmd, key);
    if (!s) return dflt;
    while (*s && *s != '=') s++;
    return *s ? number(s + 1) : dflt;
}

void kmain(u32 magic, struct mb_info *mb) {
    const char *cmd = (magic == 0x2BADB002 && (mb->flags & 4)) ? (const char *)mb->cmdline : "";
    u32 pages = num_arg(cmd, "pages=", 4096);
    u32 rate = num_arg(cmd, "rate=", 0);
    u32 khz = num_arg(cmd, "tsc_khz=", 0);
    int idle = arg(cmd, "load=idle") != 0;
    int dense = arg(cmd, "load=dense") != 0;
    u32 p;

    *PASSES = 0;
    if (idle) {
        for (p = 0; p < pages; p++) AREA[p * WORDS_PER_PAGE] += 1;
        *PASSES = 1;
        for (;;) __asm__ volatile("pause");
    }
    if (dense) {
        for (;;) {
            for (p = 0; p + 8 <= pages; p += 8) {
                volatile u32 *a = AREA + p * WORDS_PER_PAGE;
                a[0] += 1; a[1024] += 1; a[2048] += 1; a[3072] += 1;
                a[4096] += 1; a[5120] += 1; a[6144] += 1; a[7168] += 1;
            }
            for (; p < pages; p++) AREA[p * WORDS_PER_PAGE] += 1;
            *PASSES += 1;
        }
    }
    /* Paced: page k of the run is written no earlier than start + k / rate seconds, in
       ticks of 64 pages (a TSC read per page would cost more than the write). */
    {
        /* (32-bit division only: no libgcc here.) */
        u64 per64 = (rate && khz) ? (u64)((khz * 64u) / rate) * 1000u : 0;
        u64 due = rdtsc();
        for (;;) {
            for (p = 0; p < pages; p++) {
                if ((p & 63) == 0 && per64) {
                    due += per64;
                    while (rdtsc() < due) __asm__ volatile("pause");
                }
                AREA[p * WORDS_PER_PAGE] += 1;
            }
            *PASSES += 1;
        }
    }
}
