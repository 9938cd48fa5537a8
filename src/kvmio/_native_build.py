"""cffi (API mode) builder for ``kvmio._native``, the only compiled part of kvmio.

The C compiler, not this file, decides every struct layout and ioctl number: each struct is
declared with ``...;`` (cffi then asks the compiler for sizes and offsets and refuses to build if a
declared field disagrees with <linux/kvm.h>), and each constant with ``...`` (its value comes from
the header).  The module also holds the dirty-ring harvest loop, written with C11 acquire/release
atomics, because that ordering cannot be expressed from Python on weakly ordered CPUs.

Run ``python src/kvmio/_native_build.py`` to build in place; setuptools runs it through
``cffi_modules`` in setup.py.
"""

from __future__ import annotations

import os
import platform

from cffi import FFI

# kvmio's own views of kvm_run's exit union members (declared to cffi and compiled in the
# source alike; the source checks each against <linux/kvm.h> with static asserts).
EXIT_VIEWS = """
struct kvmio_exit_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                       uint64_t data_offset; };
struct kvmio_exit_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
struct kvmio_exit_fail_entry { uint64_t hardware_entry_failure_reason; uint32_t cpu; };
struct kvmio_exit_internal { uint32_t suberror; uint32_t ndata; uint64_t data[16]; };
struct kvmio_exit_system_event { uint32_t type; uint32_t ndata; uint64_t data[16]; };
struct kvmio_exit_hw { uint64_t hardware_exit_reason; };
"""

# The control entry of one ring for kvmio_rings_collect (declared to cffi and compiled alike).
RING_CTL = """
struct kvmio_ring_ctl {
    struct kvm_dirty_gfn *gfns;
    uint32_t *index;
    int *stop;
    uint32_t size;
    uint32_t window;
    uint32_t n;
    uint32_t pad;
};
"""

# What kvmio_rings_collect_reset reports besides its return value (declared and compiled alike).
COLLECT_OUT = """
struct kvmio_collect_out {
    double harvested_at;
    uint64_t reset_ns;
    uint64_t *summary;
    uint32_t summary_cap;
    uint32_t total;
    uint32_t reset;
    int32_t reset_errno;
    int32_t signals;
    uint32_t pad;
};
"""

# One memory slot of a checkpoint's fused reset, kvmio_rings_collect_restore (declared and
# compiled alike).
RESTORE_SLOT = """
struct kvmio_restore_slot {
    uint8_t *dst;
    const uint8_t *store;
    const uint64_t *index;
    const uint64_t *extra;
    uint64_t *bitmap;
    uint64_t bitmap_pages;
    uint64_t dst_pages;
    uint64_t nindex;
    uint64_t nextra;
    uint64_t missing_at;
    uint64_t nmissing;
    uint64_t restored;
    uint64_t logged;
    uint32_t raw_slot;
    uint32_t zero_below;
};
"""

# Declarations every architecture shares.
CDEF_COMMON = """
#define KVM_API_VERSION ...
#define KVMIO ...

#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_ENABLE_CAP ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_CLEAR_DIRTY_LOG ...
#define KVM_RESET_DIRTY_RINGS ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_IRQ_LINE ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_CLOCK_REALTIME ...
#define KVM_CLOCK_HOST_TSC ...

#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_DIRTY_RING_FULL ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_MAX_VCPU_ID ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL ...
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP ...
#define KVM_CAP_INTERNAL_ERROR_DATA ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_SYNC_MMU ...
#define KVM_CAP_MULTI_ADDRESS_SPACE ...

#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_DIRTY_GFN_F_DIRTY ...
#define KVM_DIRTY_GFN_F_RESET ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...

#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...

#define MAP_NORESERVE ...
#define KVMIO_PAGE_SIZE ...

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    unsigned long long args[4];
    ...;
};

struct kvm_dirty_log {
    uint32_t slot;
    void *dirty_bitmap;
    ...;
};

struct kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    void *dirty_bitmap;
    ...;
};

struct kvm_dirty_gfn {
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
    ...;
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint64_t realtime;
    uint64_t host_tsc;
    ...;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_regs { ...; };
struct kvm_sregs { ...; };
struct kvm_fpu { ...; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};

/* kvm_run's exit union, read through accessors so that cffi need not model anonymous unions */
""" + EXIT_VIEWS + """
struct kvmio_exit_io *kvmio_run_io(struct kvm_run *run);
struct kvmio_exit_mmio *kvmio_run_mmio(struct kvm_run *run);
struct kvmio_exit_fail_entry *kvmio_run_fail_entry(struct kvm_run *run);
struct kvmio_exit_internal *kvmio_run_internal(struct kvm_run *run);
struct kvmio_exit_system_event *kvmio_run_system_event(struct kvm_run *run);
struct kvmio_exit_hw *kvmio_run_hw(struct kvm_run *run);
size_t kvmio_run_union_offset(void);

int kvmio_ioctl(int fd, unsigned long request, void *arg);
int kvmio_ioctl_val(int fd, unsigned long request, unsigned long arg);
int kvmio_populate(uint8_t *addr, size_t length);
int kvmio_kick_signal(void);
int kvmio_install_kick_handler(void);
int kvmio_run_bounded(int fd, unsigned long request, struct kvm_run *run, int64_t ns,
                      int *set_exit);
uint32_t kvmio_ioctl_batch(int *fds, uint32_t *ends, uint32_t nseg, unsigned long *requests,
                           void **args, int32_t *expect, uint8_t *skip, uint32_t n,
                           int32_t *result);

/* dirty ring */
#define KVMIO_RING_STOP_EMPTY ...
#define KVMIO_RING_STOP_LIMIT ...
#define KVMIO_RING_STOP_HOLE ...
#define KVMIO_RING_STOP_MASK ...
#define KVMIO_RING_LAPPED ...
uint32_t kvmio_ring_harvest(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index,
                            uint32_t limit, uint32_t *slots, uint64_t *offsets, int *stop,
                            uint32_t window);
uint32_t kvmio_ring_count_dirty(struct kvm_dirty_gfn *ring, uint32_t size);
""" + RING_CTL + """
uint32_t kvmio_ring_skip_hole(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index);
void kvmio_ring_mark_harvested(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index,
                               uint32_t count);
uint32_t kvmio_ring_sweep(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t start,
                          uint32_t count, uint32_t *slots, uint64_t *offsets);
uint32_t kvmio_ring_harvest_reference(struct kvm_dirty_gfn *ring, uint32_t size,
                                      uint32_t *index, uint32_t *slots, uint64_t *offsets);
#define KVMIO_DEDUP_MAX_GROUPS ...
int32_t kvmio_dedup(const uint32_t *slots, const uint64_t *offsets, uint32_t n, uint64_t *pages,
                    uint64_t *scratch, uint32_t *gslot, uint32_t *gstart, uint32_t *glen,
                    uint32_t *gentries);
int32_t kvmio_rings_collect(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                            uint64_t *offsets, int *signals, uint32_t *total, uint64_t *pages,
                            uint64_t *scratch, uint32_t *gslot, uint32_t *gstart,
                            uint32_t *glen, uint32_t *gentries);
#define KVMIO_COLLECT_TOO_MANY_SLOTS ...
#define KVMIO_COLLECT_SIGNALLED ...
#define KVMIO_COLLECT_RESET_FAILED ...
#define KVMIO_COLLECT_RESET_MISMATCH ...
#define KVMIO_COLLECT_NOT_RESET ...
#define KVMIO_COLLECT_NEED_BUFFERS ...
""" + COLLECT_OUT + """
int32_t kvmio_rings_collect_reset(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                                  uint64_t *offsets, uint64_t *pages, uint64_t *scratch,
                                  uint32_t *groups, int vm_fd, unsigned long reset_request,
                                  struct kvmio_collect_out *out);
int32_t kvmio_collect_reference(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index,
                                int vm_fd, unsigned long reset_request, uint32_t *slots,
                                uint64_t *offsets, uint64_t *pages, uint64_t *scratch,
                                uint32_t *harvested);
void kvmio_ring_fill(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t start, uint32_t count,
                     uint32_t slot, uint64_t first_offset);
int64_t kvmio_restore_pages(uint8_t *dst, uint64_t dst_pages, const uint8_t *store,
                            const uint64_t *index, uint64_t nindex, const uint64_t *pages,
                            uint64_t npages, int zero, uint64_t *missing);
""" + RESTORE_SLOT + """
int32_t kvmio_rings_collect_restore(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                                    uint64_t *offsets, uint64_t *pages, uint64_t *scratch,
                                    uint32_t *groups, int vm_fd, unsigned long reset_request,
                                    struct kvmio_collect_out *out,
                                    struct kvmio_restore_slot *table, uint32_t ntable,
                                    uint64_t *missing, uint64_t missing_cap, int32_t *restored);
int32_t kvmio_bitmaps_collect_restore(int vm_fd, unsigned long get_request,
                                      unsigned long clear_request, int manual,
                                      struct kvmio_restore_slot *table, uint32_t ntable,
                                      uint64_t *missing, uint64_t missing_cap,
                                      uint32_t *fetched, uint32_t *failed, int32_t *restored);
"""

# x86_64-only structures and ioctls.
CDEF_X86 = """
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_PIT2 ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_CPUID2 ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_XSAVE ...
#define KVM_GET_XSAVE2 ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_XSAVE2 ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_PIT_SPEAKER_DUMMY ...

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    unsigned long long interrupt_bitmap[...];
};

struct kvm_msr_entry {
    uint32_t index;
    uint64_t data;
    ...;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_xcr {
    uint32_t xcr;
    uint64_t value;
    ...;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[...];
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_fpu { ...; };
struct kvm_lapic_state { ...; };
struct kvm_xsave { ...; };
struct kvm_vcpu_events { ...; };
struct kvm_debugregs { ...; };

struct kvm_pic_state {
    uint8_t last_irr;
    uint8_t irr;
    uint8_t imr;
    uint8_t isr;
    uint8_t priority_add;
    uint8_t irq_base;
    uint8_t read_reg_select;
    uint8_t poll;
    uint8_t special_mask;
    uint8_t init_state;
    uint8_t auto_eoi;
    uint8_t rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode;
    uint8_t init4;
    uint8_t elcr;
    uint8_t elcr_mask;
};

struct kvm_ioapic_state {
    uint64_t base_address;
    uint32_t ioregsel;
    uint32_t id;
    uint32_t irr;
    uint32_t pad;
    ...;
};

/* The chip union (512 bytes: PIC or IOAPIC state) is reached through kvmio_irqchip_data. */
struct kvm_irqchip {
    uint32_t chip_id;
    uint32_t pad;
    ...;
};
void *kvmio_irqchip_data(struct kvm_irqchip *chip);
size_t kvmio_irqchip_data_offset(void);
size_t kvmio_irqchip_data_size(void);

struct kvm_pit_channel_state {
    uint32_t count;
    uint16_t latched_count;
    uint8_t count_latched;
    uint8_t status_latched;
    uint8_t status;
    uint8_t read_state;
    uint8_t write_state;
    uint8_t write_latch;
    uint8_t rw_mode;
    uint8_t mode;
    uint8_t bcd;
    uint8_t gate;
    int64_t count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    uint32_t flags;
    uint32_t reserved[9];
};
"""

SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

/* Guarded fallbacks for constants that older UAPI headers (Debian 12: Linux 6.1) lack. */
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225
#endif
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
#ifndef KVM_RESET_DIRTY_RINGS
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#endif
#ifndef KVM_DIRTY_GFN_F_DIRTY
#define KVM_DIRTY_GFN_F_DIRTY 1
#define KVM_DIRTY_GFN_F_RESET 2
#endif

/* <linux/kvm.h> defaults KVM_DIRTY_LOG_PAGE_OFFSET to 0 when <asm/kvm.h> does not set it. On an
 * architecture that has a dirty ring, 0 would map the vCPU's kvm_run page as if it were the ring,
 * so refuse to build rather than do that. */
#if (defined(__x86_64__) || defined(__aarch64__)) && KVM_DIRTY_LOG_PAGE_OFFSET == 0
#error "<asm/kvm.h> lacks KVM_DIRTY_LOG_PAGE_OFFSET: install newer kernel UAPI headers"
#endif

#define KVMIO_PAGE_SIZE 4096

/* Views of kvm_run's exit union; each matches the corresponding member of <linux/kvm.h>'s
 * union (checked by the layout test, and by the static asserts below). */
""" + EXIT_VIEWS + r"""
_Static_assert(sizeof(struct kvmio_exit_io) == sizeof(((struct kvm_run *)0)->io), "io");
_Static_assert(sizeof(struct kvmio_exit_mmio) == sizeof(((struct kvm_run *)0)->mmio), "mmio");
_Static_assert(offsetof(struct kvm_run, io) == offsetof(struct kvm_run, mmio), "union");
_Static_assert(offsetof(struct kvm_run, io) == offsetof(struct kvm_run, internal), "union");
_Static_assert(offsetof(struct kvm_run, io) == offsetof(struct kvm_run, system_event), "union");
_Static_assert(sizeof(struct kvm_dirty_gfn) == 16, "kvm_dirty_gfn");

#define KVMIO_UNION(run, member) ((void *)&(run)->member)
struct kvmio_exit_io *kvmio_run_io(struct kvm_run *run) { return KVMIO_UNION(run, io); }
struct kvmio_exit_mmio *kvmio_run_mmio(struct kvm_run *run) { return KVMIO_UNION(run, mmio); }
struct kvmio_exit_fail_entry *kvmio_run_fail_entry(struct kvm_run *run)
{ return KVMIO_UNION(run, fail_entry); }
struct kvmio_exit_internal *kvmio_run_internal(struct kvm_run *run)
{ return KVMIO_UNION(run, internal); }
struct kvmio_exit_system_event *kvmio_run_system_event(struct kvm_run *run)
{ return KVMIO_UNION(run, system_event); }
struct kvmio_exit_hw *kvmio_run_hw(struct kvm_run *run) { return KVMIO_UNION(run, hw); }
size_t kvmio_run_union_offset(void) { return offsetof(struct kvm_run, io); }

/* ioctl that returns -errno instead of using the thread's errno, and never retries EINTR: an
 * interrupted KVM_RUN is how a vCPU is kicked, so the caller must see it. */
int kvmio_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int kvmio_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* Fault `length` bytes of a mapping in, writable, without writing them
 * (MADV_POPULATE_WRITE, Linux 5.14; its uapi value, asm-generic/mman-common.h, named here so
 * that the build does not depend on the C library's headers knowing it): 0, or -errno
 * (-EINVAL on an older kernel). */
#define KVMIO_MADV_POPULATE_WRITE 23
int kvmio_populate(uint8_t *addr, size_t length)
{
    return madvise(addr, length, KVMIO_MADV_POPULATE_WRITE) < 0 ? -errno : 0;
}

/* The kick signal: a real-time signal Python leaves alone, with a handler that does nothing and
 * no SA_RESTART, so that its only effect is to make a blocked KVM_RUN return EINTR. */
int kvmio_kick_signal(void) { return SIGRTMIN + 4; }

/* The bounded runs in progress: which thread (kernel tid) runs which kvm_run.  A thread
 * only ever writes its own entry's run (and claims a free entry with a compare-and-swap), so
 * the signal handler, which looks for the entry of the thread it interrupted, sees a stable
 * entry.  (A table rather than thread-local storage: a module loaded at run time has no
 * static TLS room to spare, and other TLS may allocate inside a signal handler.) */
#define KVMIO_BOUNDED_MAX 256
static struct {
    int tid;
    struct kvm_run *volatile run;
    volatile sig_atomic_t set_exit;  /* the handler set immediate_exit (it was 0) */
} kvmio_bounded[KVMIO_BOUNDED_MAX];

/* Also sets immediate_exit of a bounded run in progress in this thread: a kick (or the bound's
 * timer) that lands after kvmio_run_bounded() armed the timer but before KVM_RUN entered the
 * guest then makes KVM_RUN return EINTR at once instead of being lost (the kernel's documented
 * use of immediate_exit).  The kvm_run is mapped for as long as its entry is set: it is set
 * and cleared inside kvmio_run_bounded(), which the vCPU calls from its run(), and close()
 * does not unmap kvm_run while a run() is in flight.  syscall() and one-byte stores are
 * async-signal-safe. */
static void kvmio_kick_handler(int sig)
{
    int tid = (int)syscall(SYS_gettid);
    int i;
    (void)sig;
    for (i = 0; i < KVMIO_BOUNDED_MAX; i++) {
        if (__atomic_load_n(&kvmio_bounded[i].tid, __ATOMIC_ACQUIRE) == tid) {
            struct kvm_run *run = kvmio_bounded[i].run;
            if (run != NULL && !run->immediate_exit) {
                run->immediate_exit = 1;
                kvmio_bounded[i].set_exit = 1;
            }
            return;
        }
    }
}

/* KVM_RUN (request) on fd that lasts at most ns nanoseconds: a one-shot per-thread timer sends
 * the kick signal to the calling thread when the time is up, which makes KVM_RUN return EINTR
 * (with no Python thread involved: precise also while the interpreter is busy).  Returns like
 * kvmio_ioctl_val (-EINTR: the bound or a kick ended the run), or -errno when the timer cannot
 * be made (-EAGAIN: KVMIO_BOUNDED_MAX bounded runs at once).  *set_exit tells whether the
 * handler set immediate_exit during the call (it was clear before): after a real exit (a
 * return >= 0) that is the timer firing late, whose spare kick the caller clears unless a kick
 * of its own came meanwhile.  The caller keeps run mapped until this returns. */
int kvmio_run_bounded(int fd, unsigned long request, struct kvm_run *run, int64_t ns,
                      int *set_exit)
{
    struct sigevent sev;
    struct itimerspec its;
    timer_t timer;
    int r, e;

    int tid = (int)syscall(SYS_gettid);
    int slot;

    for (slot = 0; slot < KVMIO_BOUNDED_MAX; slot++) {
        int free_tid = 0;
        if (__atomic_compare_exchange_n(&kvmio_bounded[slot].tid, &free_tid, tid, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            break;
    }
    if (slot == KVMIO_BOUNDED_MAX)
        return -EAGAIN;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = kvmio_kick_signal();
    sev._sigev_un._tid = (pid_t)tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) < 0) {
        e = errno;
        __atomic_store_n(&kvmio_bounded[slot].tid, 0, __ATOMIC_RELEASE);
        return -e;
    }
    if (ns < 1000)
        ns = 1000;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = (time_t)(ns / 1000000000);
    its.it_value.tv_nsec = (long)(ns % 1000000000);
    kvmio_bounded[slot].set_exit = 0;
    kvmio_bounded[slot].run = run;
    if (timer_settime(timer, 0, &its, NULL) < 0) {
        e = errno;
        r = -1;
    } else {
        r = ioctl(fd, request, 0);
        e = errno;
    }
    timer_delete(timer);  /* a signal it sent already may still set immediate_exit: a spare
                           * kick, which the next run consumes by returning EINTR */
    kvmio_bounded[slot].run = NULL;
    *set_exit = kvmio_bounded[slot].set_exit;
    __atomic_store_n(&kvmio_bounded[slot].tid, 0, __ATOMIC_RELEASE);
    return r < 0 ? -e : r;
}

/* In a child made by fork(), the threads that were in bounded runs do not exist: free their
 * entries (a child's thread could otherwise be given one of their tids). */
static int kvmio_atfork_done;

static void kvmio_bounded_atfork_child(void)
{
    memset((void *)kvmio_bounded, 0, sizeof(kvmio_bounded));
}

int kvmio_install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvmio_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    if (sigaction(kvmio_kick_signal(), &sa, NULL) < 0)
        return -errno;
    if (!kvmio_atfork_done) {
        int r = pthread_atfork(NULL, NULL, kvmio_bounded_atfork_child);
        if (r != 0)
            return -r;
        kvmio_atfork_done = 1;
    }
    return 0;
}

/* n ioctls, in order, stopping at the first that fails: a machine state (the VM's and every
 * vCPU's) is read or written in one call from Python instead of one call per ioctl.  The
 * calls come in nseg segments, one per file descriptor: calls [ends[s-1], ends[s]) go to
 * fds[s].  skip (NULL: none) marks calls not to issue.  A call fails when it returns < 0
 * (EINTR is issued again, as kvmio's other ioctls are) or, where expect[k] >= 0, another value
 * than expect[k] (KVM_GET_MSRS and KVM_SET_MSRS return how many MSRs they handled).
 * Returns how many calls were done or skipped before the one that failed (n if none did);
 * *result is that call's return value (-errno, or the short count), 0 when none failed.  The
 * caller keeps every args[k] alive and sized for its request, and every fd open. */
uint32_t kvmio_ioctl_batch(int *fds, uint32_t *ends, uint32_t nseg, unsigned long *requests,
                           void **args, int32_t *expect, uint8_t *skip, uint32_t n,
                           int32_t *result)
{
    uint32_t s = 0;
    for (uint32_t k = 0; k < n; k++) {
        int r;
        while (s < nseg && k >= ends[s])
            s++;
        if (s == nseg) {  /* the segments end before the calls do */
            *result = -EINVAL;
            return k;
        }
        if (skip && skip[k])
            continue;
        do {
            r = ioctl(fds[s], requests[k], args[k]);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            *result = -errno;
            return k;
        }
        if (expect[k] >= 0 && r != expect[k]) {
            *result = r;
            return k;
        }
    }
    *result = 0;
    return n;
}

#if defined(__x86_64__)
/* struct kvm_irqchip's chip union, which cffi is not asked to model (the layout test checks
 * the offset and size against the header). */
void *kvmio_irqchip_data(struct kvm_irqchip *chip) { return (void *)&chip->chip; }
size_t kvmio_irqchip_data_offset(void) { return offsetof(struct kvm_irqchip, chip); }
size_t kvmio_irqchip_data_size(void) { return sizeof(((struct kvm_irqchip *)0)->chip); }
#endif

/* ---------------------------------------------------------------------------------------------
 * Dirty ring harvesting (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING").
 * KVM writes slot/offset, then store-releases flags = DIRTY.  We load-acquire flags, read
 * slot/offset, then store-release flags = RESET (a plain replacement).  Entries are taken in
 * order, never skipping one; *index is the free-running harvest index (masked by size-1).
 * ------------------------------------------------------------------------------------------- */
#define KVMIO_RING_STOP_EMPTY 0  /* stopped at an entry that is not dirty: all caught up */
#define KVMIO_RING_STOP_LIMIT 1  /* stopped because `limit` entries were taken */
#define KVMIO_RING_STOP_HOLE  2  /* entry at the index is not dirty but a later one is */
#define KVMIO_RING_STOP_MASK  3  /* the bits of *stop that say why the harvest stopped */
#define KVMIO_RING_LAPPED     4  /* flag in *stop: the kernel published a whole ring or more
                                  * past the index (the entry just before it was dirty) */

static inline int kvmio_gfn_dirty(struct kvm_dirty_gfn *e)
{
    return __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) == KVM_DIRTY_GFN_F_DIRTY;
}

/* Take one entry found dirty (by a load-acquire of its flags): copy slot and offset, then
 * store-release RESET, so that KVM sees the copy done before the entry is handed back. */
static inline void kvmio_take(struct kvm_dirty_gfn *e, uint32_t *slot, uint64_t *offset)
{
    *slot = e->slot;
    *offset = e->offset;
    __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
}

/* Why holes need no scan while no overrun was seen (the caller passes window 0 then, and the
 * whole ring, size - 1, once one was): KVM pushes entries in order, one position after the
 * other, and only KVM makes an entry dirty.  The entry just before the index, at position
 * (index - 1), was harvested by us (or never written); it is dirty again only once KVM has
 * published index + size - 1, i.e. a whole ring past the index, which is checked first, in
 * O(1), as KVMIO_RING_LAPPED.  An overrun loses an entry only by writing over one; over one
 * not yet harvested, it first publishes that whole ring (LAPPED at the next harvest); over
 * one harvested but not yet recycled, it stops KVM_RESET_DIRTY_RINGS short (a count that
 * does not match the harvest).  So a hole cannot form without one of those two signals. */
uint32_t kvmio_ring_harvest(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index,
                            uint32_t limit, uint32_t *slots, uint64_t *offsets, int *stop,
                            uint32_t window)
{
    const uint32_t mask = size - 1;
    uint32_t i = *index, n = 0;
    const int lapped = kvmio_gfn_dirty(&ring[(i - 1) & mask]) ? KVMIO_RING_LAPPED : 0;

    while (n < limit) {
        struct kvm_dirty_gfn *e = &ring[i & mask];
        if (!kvmio_gfn_dirty(e))
            break;
        kvmio_take(e, &slots[n], &offsets[n]);
        i++;
        n++;
    }
    *index = i;
    if (n == limit) {
        *stop = KVMIO_RING_STOP_LIMIT | lapped;
        return n;
    }
    *stop = KVMIO_RING_STOP_EMPTY | lapped;
    /* Hole check: KVM publishes entries in order with release semantics, so if a later entry is
     * dirty (acquire), every earlier one of the same lap must be too.  Re-read the index entry
     * after seeing a dirty later one, so that an entry published meanwhile is no false alarm. */
    if (window > size - 1)
        window = size - 1;
    for (uint32_t k = 1; k <= window; k++) {
        if (kvmio_gfn_dirty(&ring[(i + k) & mask])) {
            if (!kvmio_gfn_dirty(&ring[i & mask]))
                *stop = KVMIO_RING_STOP_HOLE | lapped;
            break;
        }
    }
    return n;
}

/* Every ring of a VM in one call: ring k is harvested whole (limit = its size) into slots/
 * offsets right after ring k-1's entries, with its own index, stop and hole window; ctl[k].n
 * says how many it took.  The caller guarantees the arrays hold the sum of the sizes and every
 * ring pointer is mapped.  Returns the total; *signals is the OR of every ring's stop bits
 * beyond KVMIO_RING_STOP_EMPTY (a hole, a limit, a lapped ring), 0 when all were simply
 * caught up. */
""" + RING_CTL + COLLECT_OUT + RESTORE_SLOT + r"""

static uint32_t kvmio_rings_harvest(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                                    uint64_t *offsets, int *signals)
{
    uint32_t total = 0;
    int sig = 0;
    for (uint32_t k = 0; k < count; k++) {
        struct kvmio_ring_ctl *c = &ctl[k];
        c->n = kvmio_ring_harvest(c->gfns, c->size, c->index, c->size, slots + total,
                                  offsets + total, c->stop, c->window);
        total += c->n;
        sig |= *c->stop;
    }
    *signals = sig;
    return total;
}

uint32_t kvmio_ring_count_dirty(struct kvm_dirty_gfn *ring, uint32_t size)
{
    uint32_t n = 0;
    for (uint32_t k = 0; k < size; k++)
        n += kvmio_gfn_dirty(&ring[k]);
    return n;
}

/* Overrun recovery (only with the ring's vCPU outside KVM_RUN): mark the hole entries from
 * *index up to the first dirty entry as harvested, so that the kernel's reset index can catch
 * up with ours.  Returns how many entries were skipped (the length of the hole). */
uint32_t kvmio_ring_skip_hole(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index)
{
    const uint32_t mask = size - 1;
    uint32_t i = *index, n = 0;
    uint32_t window = size - 1;
    uint32_t k;

    for (k = 0; k <= window; k++)
        if (kvmio_gfn_dirty(&ring[(i + k) & mask]))
            break;
    if (k > window)
        return 0;
    for (n = 0; n < k; n++)
        __atomic_store_n(&ring[(i + n) & mask].flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
    *index = i + n;
    return n;
}

/* Stuck-ring recovery (only with the ring's vCPU outside KVM_RUN, right after a ring-full exit
 * that found nothing to harvest, so that the kernel's count of used entries is at least the
 * soft limit): mark `count` (<= that limit) entries from *index as harvested, without
 * reading them, so that the next reset advances the kernel's reset index by `count`. */
void kvmio_ring_mark_harvested(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index,
                               uint32_t count)
{
    const uint32_t mask = size - 1;
    uint32_t i = *index;
    for (uint32_t n = 0; n < count; n++)
        __atomic_store_n(&ring[(i + n) & mask].flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
    *index = i + count;
}

/* Resynchronisation after a reset the kernel cut short (only with the ring's vCPU outside
 * KVM_RUN): the `count` entries from `start` are ours, harvested but not recycled, because the
 * kernel overwrote some of them (DIRTY again) before its reset reached them.  Take those
 * (acquire), mark them harvested (release), and leave the others, so that the next reset
 * walks all `count`.  Returns how many were taken. */
uint32_t kvmio_ring_sweep(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t start,
                          uint32_t count, uint32_t *slots, uint64_t *offsets)
{
    const uint32_t mask = size - 1;
    uint32_t n = 0;
    for (uint32_t k = 0; k < count; k++) {
        struct kvm_dirty_gfn *e = &ring[(start + k) & mask];
        if (!kvmio_gfn_dirty(e))
            continue;
        kvmio_take(e, &slots[n], &offsets[n]);
        n++;
    }
    return n;
}

/* Reference loop for the benchmark: the minimal correct C harvester (acquire, copy, release),
 * with none of kvmio's bookkeeping. */
uint32_t kvmio_ring_harvest_reference(struct kvm_dirty_gfn *ring, uint32_t size,
                                      uint32_t *index, uint32_t *slots, uint64_t *offsets)
{
    const uint32_t mask = size - 1;
    uint32_t i = *index, n = 0;
    for (;;) {
        struct kvm_dirty_gfn *e = &ring[i & mask];
        if (n == size || __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) != KVM_DIRTY_GFN_F_DIRTY)
            break;
        slots[n] = e->slot;
        offsets[n] = e->offset;
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        i++;
        n++;
    }
    *index = i;
    return n;
}

/* Test and benchmark helper: publish `count` dirty entries as KVM would (slot/offset, then a
 * release store of DIRTY), starting at free-running index `start`. */
/* ---------------------------------------------------------------------------------------------
 * Page sets from ring entries: group by slot, then sorted distinct offsets per slot.
 * ------------------------------------------------------------------------------------------- */
#define KVMIO_DEDUP_MAX_GROUPS 64
#define KVMIO_RADIX_BITS 13
#define KVMIO_RADIX (1u << KVMIO_RADIX_BITS)

/* Sort a[0..n) (values v - lo fit in `bits` bits) with an LSD radix sort through tmp[0..n);
 * the result ends in a[].  The passes split `bits` evenly, each at most as wide as n needs
 * (2^width counters near n, from 8 to KVMIO_RADIX_BITS bits): for 8,192 items or more, a slot
 * of up to 256 GiB (26 bits of pages) takes two passes however its pages spread, as 1 GiB
 * does; few items take narrow passes, where the counters would cost more than the items. */
static void kvmio_radix_sort(uint64_t *a, uint64_t *tmp, uint32_t n, uint64_t lo, unsigned bits)
{
    static __thread uint32_t count[KVMIO_RADIX];
    uint64_t *src = a, *dst = tmp;
    unsigned most = 8;
    while (most < KVMIO_RADIX_BITS && (1u << most) < n)
        most++;
    const unsigned passes = (bits + most - 1) / most;
    const unsigned width = passes ? (bits + passes - 1) / passes : 0;
    const uint32_t radix = 1u << width, mask = radix - 1;
    for (unsigned shift = 0; shift < bits; shift += width) {
        memset(count, 0, radix * sizeof(*count));
        for (uint32_t k = 0; k < n; k++)
            count[((src[k] - lo) >> shift) & mask]++;
        uint32_t sum = 0;
        for (uint32_t d = 0; d < radix; d++) {
            uint32_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (uint32_t k = 0; k < n; k++)
            dst[count[((src[k] - lo) >> shift) & mask]++] = src[k];
        uint64_t *t = src; src = dst; dst = t;
    }
    if (src != a)
        memcpy(a, src, (size_t)n * sizeof(*a));
}

/* Sort a[0..n) ascending and drop repeats, in place; returns the new length.  Already strictly
 * increasing data (a sequential writer) is detected in one pass and left alone. */
static uint32_t kvmio_sort_unique(uint64_t *a, uint64_t *tmp, uint32_t n)
{
    if (n < 2)
        return n;
    uint32_t k = 1;
    while (k < n && a[k] > a[k - 1])
        k++;
    if (k < n) {
        uint64_t lo = a[0], hi = a[0];
        for (uint32_t m = 1; m < n; m++) {
            if (a[m] < lo) lo = a[m];
            if (a[m] > hi) hi = a[m];
        }
        if (n <= 32) {  /* insertion sort: fewer steps than a radix pass on tiny inputs */
            for (uint32_t m = 1; m < n; m++) {
                uint64_t v = a[m];
                uint32_t j = m;
                while (j > 0 && a[j - 1] > v) {
                    a[j] = a[j - 1];
                    j--;
                }
                a[j] = v;
            }
        } else {
            unsigned bits = 0;
            for (uint64_t span = hi - lo; span; span >>= 1)
                bits++;
            kvmio_radix_sort(a, tmp, n, lo, bits);
        }
    }
    uint32_t out = 1;
    for (uint32_t m = 1; m < n; m++)
        if (a[m] != a[out - 1])
            a[out++] = a[m];
    return out;
}

/* Group n entries by slot (raw slot values, in order of first appearance) and reduce each group
 * to its sorted distinct offsets.  Group g's pages are pages[gstart[g] .. gstart[g] + glen[g]);
 * gentries[g] counts its entries.  pages and scratch hold n items each; the group arrays hold
 * KVMIO_DEDUP_MAX_GROUPS.  Returns the number of groups, or -1 if the entries name more slots
 * than that (the caller then groups another way). */
int32_t kvmio_dedup(const uint32_t *slots, const uint64_t *offsets, uint32_t n, uint64_t *pages,
                    uint64_t *scratch, uint32_t *gslot, uint32_t *gstart, uint32_t *glen,
                    uint32_t *gentries)
{
    uint32_t groups = 0, g = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t s = slots[k];
        if (groups == 0 || gslot[g] != s) {  /* runs of one slot are the common case */
            for (g = 0; g < groups && gslot[g] != s; g++)
                ;
            if (g == groups) {
                if (groups == KVMIO_DEDUP_MAX_GROUPS)
                    return -1;
                gslot[groups] = s;
                gentries[groups] = 0;
                groups++;
            }
        }
        gentries[g]++;
    }
    uint32_t at = 0;
    for (g = 0; g < groups; g++) {
        gstart[g] = at;
        at += gentries[g];
    }
    if (groups == 1) {
        memcpy(pages, offsets, (size_t)n * sizeof(*pages));
    } else {
        for (g = 0; g < groups; g++)
            glen[g] = gstart[g];  /* fill cursors */
        g = 0;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t s = slots[k];
            if (gslot[g] != s)
                for (g = 0; gslot[g] != s; g++)
                    ;
            pages[glen[g]++] = offsets[k];
        }
    }
    for (g = 0; g < groups; g++)
        glen[g] = kvmio_sort_unique(pages + gstart[g], scratch, gentries[g]);
    return (int32_t)groups;
}

/* The compiled part of a whole collection: every ring harvested (kvmio_rings_harvest), then,
 * if no ring signalled anything, the entries grouped by slot and reduced to sorted distinct
 * pages (kvmio_dedup; pages and scratch hold *total items, i.e. the sum of the ring sizes).
 * Returns the number of groups (0: nothing harvested), -1 when the entries name more slots than
 * the grouping holds, -2 when a ring signalled (a hole, a limit, a lapped ring): the caller
 * then accounts ring by ring and groups the entries itself. */
int32_t kvmio_rings_collect(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                            uint64_t *offsets, int *signals, uint32_t *total, uint64_t *pages,
                            uint64_t *scratch, uint32_t *gslot, uint32_t *gstart,
                            uint32_t *glen, uint32_t *gentries)
{
    uint32_t n = kvmio_rings_harvest(ctl, count, slots, offsets, signals);
    *total = n;
    if (*signals)
        return -2;
    if (n == 0)
        return 0;
    return kvmio_dedup(slots, offsets, n, pages, scratch, gslot, gstart, glen, gentries);
}

/* A whole collection in one call, for a ring set whose accounting is clean (nothing pending,
 * stashed or suspect: see RingSet.collect_quick): every ring harvested as kvmio_rings_collect
 * does, the harvest time taken (CLOCK_MONOTONIC, as Python's time.monotonic()), then, if no
 * ring signalled anything and something was harvested, KVM_RESET_DIRTY_RINGS on vm_fd repeated
 * only while the sum of its counts is short of the harvest (a pending signal cuts it short;
 * it returns 0 once nothing is left), and only when the sum matches, the grouping and dedup.
 * vm_fd < 0 skips the reset (for a caller that resets itself).  With slots == NULL (and the
 * other buffers unused) it only probes: KVMIO_COLLECT_NEED_BUFFERS if a harvest could take or
 * signal anything, else 0 exactly as an empty harvest.  `groups` holds
 * 4 * KVMIO_DEDUP_MAX_GROUPS cells: slot, start, length, entries per group.  out->reset_ns is
 * the time the reset calls took.  With groups and out->summary (out->summary_cap items, room
 * for 1 + count + 5 * groups), the summary gets the harvest's total, every ring's count, and
 * per group its slot, start, length, entries and last (largest) page.
 * Returns the number of groups (0: nothing harvested), or
 *   KVMIO_COLLECT_TOO_MANY_SLOTS  reset matched, but too many slots for the grouping;
 *   KVMIO_COLLECT_SIGNALLED       a ring signalled (hole, full, lapped): nothing reset;
 *   KVMIO_COLLECT_RESET_FAILED    a reset call failed (out->reset_errno), after out->reset;
 *   KVMIO_COLLECT_RESET_MISMATCH  the resets' sum (out->reset) differs from the harvest;
 *   KVMIO_COLLECT_NOT_RESET       vm_fd < 0: harvested, nothing reset, not grouped;
 *   KVMIO_COLLECT_NEED_BUFFERS    the probe found something: call again with buffers.
 * In every case ctl[k].n and out->total say what was harvested, and the caller accounts. */
#define KVMIO_COLLECT_TOO_MANY_SLOTS (-1)
#define KVMIO_COLLECT_SIGNALLED (-2)
#define KVMIO_COLLECT_RESET_FAILED (-3)
#define KVMIO_COLLECT_RESET_MISMATCH (-4)
#define KVMIO_COLLECT_NOT_RESET (-5)
#define KVMIO_COLLECT_NEED_BUFFERS (-6)
#define KVMIO_COLLECT_MAX_RESETS (1u << 20)

/* Nanoseconds of CLOCK_MONOTONIC since *t0. */
static uint64_t kvmio_ns_since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)((int64_t)(t.tv_sec - t0->tv_sec) * 1000000000 + (t.tv_nsec - t0->tv_nsec));
}

int32_t kvmio_rings_collect_reset(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                                  uint64_t *offsets, uint64_t *pages, uint64_t *scratch,
                                  uint32_t *groups, int vm_fd, unsigned long reset_request,
                                  struct kvmio_collect_out *out)
{
    struct timespec ts;
    int signals = 0;
    uint32_t n, sum = 0;

    if (slots == NULL) {
        /* The probe: if no ring has an entry at its index (nor just before it: a lapped ring)
         * and none scans for holes, a harvest would take nothing and signal nothing. */
        for (uint32_t k = 0; k < count; k++) {
            const struct kvmio_ring_ctl *c = &ctl[k];
            const uint32_t i = *c->index, mask = c->size - 1;
            if (c->window || kvmio_gfn_dirty(&c->gfns[i & mask])
                    || kvmio_gfn_dirty(&c->gfns[(i - 1) & mask]))
                return KVMIO_COLLECT_NEED_BUFFERS;
        }
        for (uint32_t k = 0; k < count; k++) {
            ctl[k].n = 0;
            *ctl[k].stop = KVMIO_RING_STOP_EMPTY;
        }
        n = 0;
    } else {
        n = kvmio_rings_harvest(ctl, count, slots, offsets, &signals);
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    out->harvested_at = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    out->total = n;
    out->reset = 0;
    out->reset_errno = 0;
    out->reset_ns = 0;
    out->signals = signals;
    if (signals)
        return KVMIO_COLLECT_SIGNALLED;
    if (n == 0)
        return 0;
    if (vm_fd < 0)
        return KVMIO_COLLECT_NOT_RESET;
    for (uint32_t calls = 0; calls < KVMIO_COLLECT_MAX_RESETS && sum < n; calls++) {
        int r = ioctl(vm_fd, reset_request, 0);
        if (r < 0) {
            out->reset = sum;
            out->reset_errno = errno;
            out->reset_ns = kvmio_ns_since(&ts);
            return KVMIO_COLLECT_RESET_FAILED;
        }
        if (r == 0)
            break;
        sum += (uint32_t)r;
    }
    out->reset = sum;
    out->reset_ns = kvmio_ns_since(&ts);
    if (sum != n)
        return KVMIO_COLLECT_RESET_MISMATCH;
    int32_t ngroups = kvmio_dedup(slots, offsets, n, pages, scratch, groups,
                                  groups + KVMIO_DEDUP_MAX_GROUPS,
                                  groups + 2 * KVMIO_DEDUP_MAX_GROUPS,
                                  groups + 3 * KVMIO_DEDUP_MAX_GROUPS);
    if (ngroups > 0 && out->summary
            && 1 + count + 5 * (uint64_t)ngroups <= out->summary_cap) {
        /* The summary: what the caller reads in one go instead of cell by cell. */
        uint64_t *m = out->summary;
        *m++ = n;
        for (uint32_t k = 0; k < count; k++)
            *m++ = ctl[k].n;
        for (int32_t g = 0; g < ngroups; g++) {
            const uint32_t start = groups[KVMIO_DEDUP_MAX_GROUPS + g];
            const uint32_t len = groups[2 * KVMIO_DEDUP_MAX_GROUPS + g];
            *m++ = groups[g];
            *m++ = start;
            *m++ = len;
            *m++ = groups[3 * KVMIO_DEDUP_MAX_GROUPS + g];
            *m++ = pages[start + len - 1];  /* a group has one page at least */
        }
    }
    return ngroups;
}

/* Reference for the benchmark: the minimal C collection of one ring, as a C program would
 * write it: harvest (acquire, copy, release), KVM_RESET_DIRTY_RINGS until the kernel has
 * recycled what was harvested, then the same grouping and dedup.  Returns the number of groups
 * (or -errno of a failed reset); *harvested is the number of entries. */
int32_t kvmio_collect_reference(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t *index,
                                int vm_fd, unsigned long reset_request, uint32_t *slots,
                                uint64_t *offsets, uint64_t *pages, uint64_t *scratch,
                                uint32_t *harvested)
{
    uint32_t gslot[KVMIO_DEDUP_MAX_GROUPS], gstart[KVMIO_DEDUP_MAX_GROUPS];
    uint32_t glen[KVMIO_DEDUP_MAX_GROUPS], gentries[KVMIO_DEDUP_MAX_GROUPS];
    uint32_t n = kvmio_ring_harvest_reference(ring, size, index, slots, offsets);
    uint32_t done = 0;
    *harvested = n;
    while (done < n) {
        int r = ioctl(vm_fd, reset_request, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        done += (uint32_t)r;
    }
    return kvmio_dedup(slots, offsets, n, pages, scratch, gslot, gstart, glen, gentries);
}

/* Whether `n` page indices are strictly increasing and below `limit`. */
static int kvmio_pages_ok(const uint64_t *pages, uint64_t n, uint64_t limit)
{
    for (uint64_t k = 0; k < n; k++)
        if (pages[k] >= limit || (k && pages[k] <= pages[k - 1]))
            return 0;
    return 1;
}

/* One slot of a fused reset, after every check: copy back the stored page of every page of
 * `logged` (sorted, distinct; or, with `use_bitmap`, every set bit of t->bitmap) and of
 * t->extra, merged; the pages without a stored copy are zero-filled if
 * fewer than t->zero_below, else listed in `missing` (t->nmissing).  Sets t->restored and
 * t->logged. */
static void kvmio_restore_walk(struct kvmio_restore_slot *t, const uint64_t *logged,
                               uint64_t nlogged, int use_bitmap, uint64_t *missing)
{
    const uint64_t words = use_bitmap && t->bitmap ? (t->bitmap_pages + 63) / 64 : 0;
    uint64_t a = 0, b = 0, q = 0, done = 0, m = 0, w = 0, bits = words ? t->bitmap[0] : 0;
    uint64_t nbits = 0;
    for (;;) {
        /* The next logged page: from the list, or the next set bit of the bitmap. */
        int have = 0;
        uint64_t lp = 0;
        if (!words) {
            if (a < nlogged) {
                lp = logged[a];
                have = 1;
            }
        } else {
            while (!bits && w + 1 < words)
                bits = t->bitmap[++w];
            if (bits) {
                lp = w * 64 + (uint64_t)__builtin_ctzll(bits);
                have = 1;
            }
        }
        const int hx = b < t->nextra;
        if (!have && !hx)
            break;
        uint64_t p;
        int take_logged = 0, take_extra = 0;
        if (have && (!hx || lp <= t->extra[b])) {
            p = lp;
            take_logged = 1;
            take_extra = hx && t->extra[b] == lp;
        } else {
            p = t->extra[b];
            take_extra = 1;
        }
        if (take_logged) {
            nbits++;
            if (!words)
                a++;
            else
                bits &= bits - 1;
        }
        if (take_extra)
            b++;
        while (q < t->nindex && t->index[q] < p)
            q++;
        if (q < t->nindex && t->index[q] == p)
            memcpy(t->dst + p * 4096, t->store + q * 4096, 4096);
        else
            missing[m++] = p;
        done++;
    }
    if (m && m < t->zero_below) {
        for (uint64_t i = 0; i < m; i++)
            memset(t->dst + missing[i] * 4096, 0, 4096);
        m = 0;
    }
    t->nmissing = m;
    t->restored = done;
    t->logged = nbits;
}

/* A checkpoint's page restore: for each of `npages` sorted, distinct page indices, copy the
 * stored page back into guest memory at `dst` (`dst_pages` pages), if the checkpoint stored
 * it (`index`: the sorted indices of the `nindex` pages in `store`, 4096 bytes each), else
 * zero it (`zero`) or list it in `missing` (room for npages items, used either way) for the
 * caller to discard: the fused reset's walk, over one list.  Returns how many are in
 * `missing`, or -1 (nothing done) if a page lies beyond `dst_pages` or `pages` is not
 * strictly increasing. */
int64_t kvmio_restore_pages(uint8_t *dst, uint64_t dst_pages, const uint8_t *store,
                            const uint64_t *index, uint64_t nindex, const uint64_t *pages,
                            uint64_t npages, int zero, uint64_t *missing)
{
    struct kvmio_restore_slot t;
    if (!kvmio_pages_ok(pages, npages, dst_pages))  /* every page in range and in order, first */
        return -1;
    memset(&t, 0, sizeof t);
    t.dst = dst;
    t.dst_pages = dst_pages;
    t.store = store;
    t.index = index;
    t.nindex = nindex;
    t.zero_below = zero ? UINT32_MAX : 0;
    kvmio_restore_walk(&t, pages, npages, 0, missing);
    return (int64_t)t.nmissing;
}

/* A checkpoint's fused reset: kvmio_rings_collect_reset (same arguments, same result, same
 * accounting for the caller), then, only if that collection was clean (a result >= 0; with
 * slots == NULL a probe that found nothing), the pages restored in the same call: for each
 * slot of `table`, every page of its group (the ring entries' distinct pages) and of its
 * `extra` list (pages the host wrote; sorted, distinct) gets its stored copy back (a merge
 * walk of both lists against the sorted `index` of `store`).  A page the checkpoint holds
 * none of is zero-filled if the slot has fewer than `zero_below` such pages, else listed in
 * `missing` (from `missing_at`, `nmissing` items) for the caller, with nothing written.
 * `restored` / `logged` count the distinct pages of both lists / of the group.
 * Everything is checked before anything is written: a group whose slot is not in the table,
 * a page at or beyond `dst_pages`, an `extra` list out of order, or more pages than
 * `missing_cap` leave guest memory untouched and *restored = 0 (the caller restores the
 * collected pages itself); else *restored = 1. */
int32_t kvmio_rings_collect_restore(struct kvmio_ring_ctl *ctl, uint32_t count, uint32_t *slots,
                                    uint64_t *offsets, uint64_t *pages, uint64_t *scratch,
                                    uint32_t *groups, int vm_fd, unsigned long reset_request,
                                    struct kvmio_collect_out *out,
                                    struct kvmio_restore_slot *table, uint32_t ntable,
                                    uint64_t *missing, uint64_t missing_cap, int32_t *restored)
{
    const uint32_t *gslot = groups, *gstart = groups + KVMIO_DEDUP_MAX_GROUPS;
    const uint32_t *glen = groups + 2 * KVMIO_DEDUP_MAX_GROUPS;
    int32_t r = kvmio_rings_collect_reset(ctl, count, slots, offsets, pages, scratch, groups,
                                          vm_fd, reset_request, out);
    uint64_t total = 0, at = 0;

    *restored = 0;
    if (r < 0)
        return r;
    /* Every group must belong to a slot of the table, in range (the dedup sorted it). */
    for (int32_t g = 0; g < r; g++) {
        uint32_t k = 0;
        while (k < ntable && table[k].raw_slot != gslot[g])
            k++;
        if (k == ntable || (glen[g] && pages[gstart[g] + glen[g] - 1] >= table[k].dst_pages))
            return r;
        total += glen[g];
    }
    for (uint32_t k = 0; k < ntable; k++) {
        if (!kvmio_pages_ok(table[k].extra, table[k].nextra, table[k].dst_pages))
            return r;
        total += table[k].nextra;
    }
    if (total > missing_cap)
        return r;
    for (uint32_t k = 0; k < ntable; k++) {
        struct kvmio_restore_slot *t = &table[k];
        const uint64_t *logged = NULL;
        uint64_t nlogged = 0;
        for (int32_t g = 0; g < r; g++)
            if (gslot[g] == t->raw_slot) {
                logged = pages + gstart[g];
                nlogged = glen[g];
                break;
            }
        t->missing_at = at;
        kvmio_restore_walk(t, logged, nlogged, 0, missing ? missing + at : NULL);
        at += t->nmissing;
    }
    *restored = 1;
    return r;
}

/* The same in bitmap mode: for each slot of `table` with a bitmap (t->bitmap, room for
 * t->bitmap_pages bits: the slot's pages, which the caller checked against the VM), in
 * table order, KVM_GET_DIRTY_LOG into it and, with `manual` protect, KVM_CLEAR_DIRTY_LOG of
 * the same bits, over the span of words that have any (a failed clear leaves them set in
 * the kernel: nothing is lost; an empty bitmap is not cleared).  A failed call returns
 * -errno, *failed says which (1: the get, 2: the clear), and *fetched the number of table
 * entries done before it (their bits are in their bitmaps, and the kernel's are clear: the
 * caller keeps them); else 0 with
 * *fetched = ntable, and then, only if every check passes (no bit at or beyond dst_pages,
 * which must equal bitmap_pages; every extra list in order and in range; at most
 * missing_cap pages in all), the pages restored as kvmio_rings_collect_restore does
 * (*restored = 1). */
int32_t kvmio_bitmaps_collect_restore(int vm_fd, unsigned long get_request,
                                      unsigned long clear_request, int manual,
                                      struct kvmio_restore_slot *table, uint32_t ntable,
                                      uint64_t *missing, uint64_t missing_cap,
                                      uint32_t *fetched, uint32_t *failed, int32_t *restored)
{
    uint64_t total = 0, at = 0;

    *restored = 0;
    *fetched = 0;
    *failed = 0;
    for (uint32_t k = 0; k < ntable; k++) {
        struct kvmio_restore_slot *t = &table[k];
        if (t->bitmap) {
            struct kvm_dirty_log log;
            memset(&log, 0, sizeof log);
            log.slot = t->raw_slot;
            log.dirty_bitmap = t->bitmap;
            int r;
            do
                r = ioctl(vm_fd, get_request, &log);
            while (r < 0 && errno == EINTR);
            if (r < 0) {
                *failed = 1;
                return -errno;
            }
            /* Under manual protect, clear the span of words that have a bit set (the kernel
             * copies in and walks what it is given): it starts at a multiple of 64 pages and
             * is a multiple of 64 long or ends at the slot's end, as KVM requires.  An empty
             * bitmap needs no clear. */
            const uint64_t words = (t->bitmap_pages + 63) / 64;
            uint64_t lo = 0, hi = words;
            while (lo < words && !t->bitmap[lo])
                lo++;
            while (hi > lo && !t->bitmap[hi - 1])
                hi--;
            if (manual && lo < hi) {
                const uint64_t first = lo * 64;
                const uint64_t end = hi * 64 < t->bitmap_pages ? hi * 64 : t->bitmap_pages;
                struct kvm_clear_dirty_log clear;
                memset(&clear, 0, sizeof clear);
                clear.slot = t->raw_slot;
                clear.first_page = first;
                clear.num_pages = (uint32_t)(end - first);
                clear.dirty_bitmap = t->bitmap + lo;
                do
                    r = ioctl(vm_fd, clear_request, &clear);
                while (r < 0 && errno == EINTR);
                if (r < 0) {
                    *failed = 2;
                    return -errno;
                }
            }
        }
        *fetched = k + 1;
    }
    for (uint32_t k = 0; k < ntable; k++) {
        const struct kvmio_restore_slot *t = &table[k];
        if (t->bitmap) {
            const uint64_t words = (t->bitmap_pages + 63) / 64;
            if (t->bitmap_pages != t->dst_pages)
                return 0;
            for (uint64_t w = 0; w < words; w++)
                total += (uint64_t)__builtin_popcountll(t->bitmap[w]);
            if (t->bitmap_pages % 64 && t->bitmap[words - 1] >> (t->bitmap_pages % 64))
                return 0;
        }
        if (!kvmio_pages_ok(t->extra, t->nextra, t->dst_pages))
            return 0;
        total += t->nextra;
    }
    if (total > missing_cap)
        return 0;
    for (uint32_t k = 0; k < ntable; k++) {
        struct kvmio_restore_slot *t = &table[k];
        t->missing_at = at;
        kvmio_restore_walk(t, NULL, 0, 1, missing ? missing + at : NULL);
        at += t->nmissing;
    }
    *restored = 1;
    return 0;
}

void kvmio_ring_fill(struct kvm_dirty_gfn *ring, uint32_t size, uint32_t start, uint32_t count,
                     uint32_t slot, uint64_t first_offset)
{
    const uint32_t mask = size - 1;
    for (uint32_t k = 0; k < count; k++) {
        struct kvm_dirty_gfn *e = &ring[(start + k) & mask];
        e->slot = slot;
        e->offset = first_offset + k;
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_DIRTY, __ATOMIC_RELEASE);
    }
}
"""


def is_x86_64(machine: str | None = None) -> bool:
    """Whether the target machine is x86_64 (the architecture with the full binding)."""
    m = (machine or os.environ.get("KVMIO_TARGET_ARCH") or platform.machine()).lower()
    return m in ("x86_64", "amd64")


def cdef_for(machine: str | None = None) -> str:
    """The declarations for one architecture."""
    if is_x86_64(machine):
        return CDEF_COMMON + CDEF_X86
    return CDEF_COMMON


def make_builder(machine: str | None = None) -> FFI:
    """A configured FFI builder for ``kvmio._native``."""
    ffi = FFI()
    cdef = cdef_for(machine)
    if is_x86_64(machine):
        # Drop the generic placeholders that the x86 block declares in full.
        for opaque in ("struct kvm_regs { ...; };", "struct kvm_sregs { ...; };",
                       "struct kvm_fpu { ...; };"):
            cdef = cdef.replace(opaque, "", 1)
    ffi.cdef(cdef)
    # -Werror=incompatible-pointer-types: cffi only warns when a declared pointer or array field
    # disagrees with the header; make that a build failure.
    ffi.set_source("kvmio._native", SOURCE,
                   extra_compile_args=["-O2", "-std=gnu11", "-Werror=incompatible-pointer-types"])
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(os.path.dirname(__file__), "..", "..", "build",
                                           "cffi"), verbose=False)
