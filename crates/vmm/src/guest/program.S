# gmem-lu guest program: a memory walker that checks itself.
#
# Contract (the host side is crates/vmm/src/guest/mod.rs, whose constants
# must match the .set lines below; a test checks that they do):
#
# Entry: 64-bit long mode at CPL 3 (user mode: this machine's KVM, PVM, runs
# only user mode natively and emulates supervisor mode instruction by
# instruction), paging on with an identity map of guest memory, flat
# segments, rsp = top of this vCPU's stack, rdi = guest-physical address of
# this vCPU's control block. The program never takes an exception: there is
# no IDT, so one would be a triple fault, which the host reports.
#
# Reports: channel k (PROGRESS, GAP, ...) is either an `out` to port
# PORT_BASE + k (IOPL 3 lets user mode do port I/O on a standard KVM) or a
# store to the MMIO doorbell + 8 k (PVM does not honour IOPL, so there the
# host asks for MMIO). Either way the vCPU exits to the host.
#
# Each vCPU owns a partition of data pages [data_base, data_base + count*4K).
# One loop iteration:
#   1. reads the TSC; the time since the previous iteration is the "gap";
#      the largest gap is kept, a gap above the host's threshold is
#      reported at once (channel GAP), and if the host armed the gap probe
#      (while the vCPU was stopped) the gap that spans the stop is stored in
#      PROBED_GAP and the probe disarmed: that is the gap the guest saw
#      across a live update (the stop may fall between the TSC read and the
#      probe check, so the check takes the larger of this gap and a fresh
#      read less this iteration's TSC);
#   2. writes the next page of its partition in full: q[0] = the page's
#      address, q[1] = its sequence number (generation * count + index + 1),
#      q[2..511] = seq * golden + k, q[511] = the sum of q[0..511]. Pages are
#      written in order, so in generation 0 every iteration touches a page
#      never touched before; after the last page the next generation begins;
#   3. verifies one page written earlier (round robin): address, expected
#      sequence number and checksum; a mismatch is counted, its address
#      recorded and reported at once (port MISMATCH);
#   4. adds 1.0 to every lane of a vector register (ymm0 with AVX, else xmm0)
#      and, at each progress report, checks that lane against the iteration
#      count: lost FPU/XSAVE state across a save/restore shows up as a
#      register mismatch (port REGISTER_MISMATCH);
#   5. every (trace_mask + 1) iterations appends (tsc, iterations) to its
#      trace ring; every (report_mask + 1) iterations reports progress
#      (port PROGRESS);
#   6. when the host sets the command word, verifies every page it has
#      written, reports DONE and spins (hlt is privileged).
# All counters live in the control block, so they survive a live update
# with the memory. Registers hold the loop state and are saved and
# restored by the host like any guest's.
#
# Rebuild the bytes after editing: crates/vmm/guest-build.sh

        .intel_syntax noprefix
        .code64
        .text
        .globl _start

# Control block, written by the host before the first entry.
        .set CB_CPU_INDEX,          0x08
        .set CB_DATA_BASE,          0x10
        .set CB_PAGE_COUNT,         0x18
        .set CB_REPORT_MASK,        0x20
        .set CB_TRACE_MASK,         0x28
        .set CB_TRACE_BASE,         0x30
        .set CB_TRACE_CAPACITY_MASK, 0x38
        .set CB_GAP_THRESHOLD,      0x40
        .set CB_DOORBELL,           0x48
        .set CB_USE_AVX,            0x50
        .set CB_COMMAND,            0x58
        .set CB_ONES,               0x60
        .set CB_REPORT_VIA_PORT,    0x80
        .set CB_GAP_PROBE,          0x88
# Control block, written by the guest.
        .set CB_ITERATIONS,         0x100
        .set CB_PAGES_WRITTEN,      0x108
        .set CB_PAGES_VERIFIED,     0x110
        .set CB_MISMATCHES,         0x118
        .set CB_MISMATCH_ADDRESS,   0x120
        .set CB_MISMATCH_EXPECTED,  0x128
        .set CB_MAX_GAP,            0x130
        .set CB_BIG_GAP,            0x138
        .set CB_BIG_GAP_END_TSC,    0x140
        .set CB_BIG_GAP_COUNT,      0x148
        .set CB_LAST_TSC,           0x150
        .set CB_WRITE_CURSOR,       0x158
        .set CB_GENERATION,         0x160
        .set CB_TRACE_NEXT,         0x168
        .set CB_REGISTER_MISMATCHES, 0x170
        .set CB_FINAL_VERIFIED,     0x178
        .set CB_DONE,               0x180
        .set CB_PROBED_GAP,         0x188

        .set PORT_BASE,              0x3f0
        .set CH_PROGRESS,            0
        .set CH_GAP,                 1
        .set CH_MISMATCH,            2
        .set CH_REGISTER_MISMATCH,   3
        .set CH_DONE,                4
        .set CH_HELLO,               5

        .set PAGE_QWORDS,            512
        .set CHECKSUM_QWORD,         511

# Register use for the whole run:
#   rbx control block    r12 data_base        r13 page count
#   r14 write cursor     r15 generation       rbp verify cursor
#   r8  previous TSC     r9  iterations
_start:
        mov     rbx, rdi
        mov     r12, [rbx + CB_DATA_BASE]
        mov     r13, [rbx + CB_PAGE_COUNT]
        xor     r14d, r14d
        xor     r15d, r15d
        xor     ebp, ebp
        xor     r9d, r9d
        call    vector_init
        # Hello: the host learns this vCPU reached its program.
        mov     edx, CH_HELLO
        call    report
        call    read_tsc
        mov     r8, rax

main_loop:
        call    read_tsc
        mov     rcx, rax
        sub     rcx, r8
        mov     r8, rax
        mov     [rbx + CB_LAST_TSC], rax
        cmp     rcx, [rbx + CB_MAX_GAP]
        jbe     1f
        mov     [rbx + CB_MAX_GAP], rcx
1:      cmp     qword ptr [rbx + CB_GAP_PROBE], 0
        je      1f
        # Armed while this vCPU was stopped. The stop came either before
        # this iteration's TSC read (then rcx spans it) or after it (then
        # rcx is the ordinary gap before the stop, and only a fresh read
        # less r8 spans it): the larger of the two is the gap across it.
        push    rax
        push    rcx
        call    read_tsc
        sub     rax, r8
        pop     rcx
        cmp     rax, rcx
        cmovb   rax, rcx
        mov     [rbx + CB_PROBED_GAP], rax
        mov     qword ptr [rbx + CB_GAP_PROBE], 0
        pop     rax
1:      cmp     rcx, [rbx + CB_GAP_THRESHOLD]
        jbe     2f
        mov     [rbx + CB_BIG_GAP], rcx
        mov     [rbx + CB_BIG_GAP_END_TSC], rax
        inc     qword ptr [rbx + CB_BIG_GAP_COUNT]
        mov     edx, CH_GAP
        call    report
2:      call    write_page
        inc     r14
        cmp     r14, r13
        jb      3f
        xor     r14d, r14d
        inc     r15
3:      mov     [rbx + CB_WRITE_CURSOR], r14
        mov     [rbx + CB_GENERATION], r15
        call    verify_page
        call    vector_step
        inc     r9
        mov     [rbx + CB_ITERATIONS], r9
        test    r9, [rbx + CB_TRACE_MASK]
        jnz     4f
        call    trace_append
4:      test    r9, [rbx + CB_REPORT_MASK]
        jnz     5f
        call    vector_check
        mov     edx, CH_PROGRESS
        call    report
5:      cmp     qword ptr [rbx + CB_COMMAND], 0
        je      main_loop

# The host asked for the final check: verify every page written so far.
final_check:
        mov     rcx, r13
        test    r15, r15
        cmovz   rcx, r14
        xor     ebp, ebp
6:      test    rcx, rcx
        jz      7f
        push    rcx
        call    verify_page
        pop     rcx
        inc     qword ptr [rbx + CB_FINAL_VERIFIED]
        dec     rcx
        jmp     6b
7:      call    vector_check
        mov     qword ptr [rbx + CB_DONE], 1
        mov     edx, CH_DONE
        call    report
8:      pause
        jmp     8b

# Reports on channel edx (see the header). Clobbers rax, rdx.
report:
        cmp     qword ptr [rbx + CB_REPORT_VIA_PORT], 0
        je      1f
        add     edx, PORT_BASE
        out     dx, al
        ret
1:      mov     rax, [rbx + CB_DOORBELL]
        mov     [rax + rdx * 8], edx
        ret

# rax = TSC. Clobbers rdx.
read_tsc:
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        ret

# Writes page r14 of generation r15. Clobbers rax, rcx, rdx, rdi, r10, r11.
write_page:
        mov     rax, r15
        imul    rax, r13
        lea     rax, [rax + r14 + 1]
        mov     rdi, r14
        shl     rdi, 12
        add     rdi, r12
        mov     [rdi], rdi
        mov     [rdi + 8], rax
        lea     rdx, [rdi + rax]
        movabs  r10, 0x9e3779b97f4a7c15
        imul    r10, rax
        mov     ecx, 2
1:      lea     r11, [r10 + rcx]
        mov     [rdi + rcx * 8], r11
        add     rdx, r11
        inc     ecx
        cmp     ecx, CHECKSUM_QWORD
        jb      1b
        mov     [rdi + CHECKSUM_QWORD * 8], rdx
        inc     qword ptr [rbx + CB_PAGES_WRITTEN]
        ret

# Verifies page rbp (wrapping at the number of pages written so far) and
# advances rbp. Clobbers rax, rcx, rdx, rdi.
verify_page:
        mov     rcx, r13
        test    r15, r15
        cmovz   rcx, r14
        test    rcx, rcx
        jz      4f
        cmp     rbp, rcx
        jb      1f
        xor     ebp, ebp
1:      mov     rax, r15
        cmp     rbp, r14
        jb      2f
        dec     rax
2:      imul    rax, r13
        lea     rax, [rax + rbp + 1]
        mov     rdi, rbp
        shl     rdi, 12
        add     rdi, r12
        inc     rbp
        cmp     [rdi], rdi
        jne     5f
        cmp     [rdi + 8], rax
        jne     5f
        xor     edx, edx
        xor     ecx, ecx
3:      add     rdx, [rdi + rcx * 8]
        inc     ecx
        cmp     ecx, CHECKSUM_QWORD
        jb      3b
        cmp     rdx, [rdi + CHECKSUM_QWORD * 8]
        jne     5f
        inc     qword ptr [rbx + CB_PAGES_VERIFIED]
4:      ret
5:      inc     qword ptr [rbx + CB_MISMATCHES]
        mov     [rbx + CB_MISMATCH_ADDRESS], rdi
        mov     [rbx + CB_MISMATCH_EXPECTED], rax
        mov     edx, CH_MISMATCH
        call    report
        ret

# Appends (r8 = this iteration's TSC, r9 = iterations) to the trace ring.
# Clobbers rax, rcx.
trace_append:
        mov     rax, [rbx + CB_TRACE_NEXT]
        mov     rcx, rax
        and     rcx, [rbx + CB_TRACE_CAPACITY_MASK]
        shl     rcx, 4
        add     rcx, [rbx + CB_TRACE_BASE]
        mov     [rcx], r8
        mov     [rcx + 8], r9
        inc     rax
        mov     [rbx + CB_TRACE_NEXT], rax
        ret

# Zeroes the counter lanes: with AVX (the host set CR4.OSXSAVE and XCR0 =
# x87 | SSE | AVX; this machine's KVM cannot emulate xsetbv in the guest),
# ymm0 = 0 and ymm1 = 1.0 in every lane; else xmm0 = 0, xmm1 = 1.0.
vector_init:
        cmp     qword ptr [rbx + CB_USE_AVX], 0
        je      1f
        vxorpd  ymm0, ymm0, ymm0
        vmovupd ymm1, [rbx + CB_ONES]
        ret
1:      xorpd   xmm0, xmm0
        movupd  xmm1, [rbx + CB_ONES]
        ret

vector_step:
        cmp     qword ptr [rbx + CB_USE_AVX], 0
        je      1f
        vaddpd  ymm0, ymm0, ymm1
        ret
1:      addpd   xmm0, xmm1
        ret

# Checks the highest vector lane against r9. Clobbers rax, rdx, xmm2.
vector_check:
        cmp     qword ptr [rbx + CB_USE_AVX], 0
        je      1f
        vextractf128 xmm2, ymm0, 1
        vunpckhpd xmm2, xmm2, xmm2
        vcvttsd2si rax, xmm2
        jmp     2f
1:      movapd  xmm2, xmm0
        unpckhpd xmm2, xmm2
        cvttsd2si rax, xmm2
2:      cmp     rax, r9
        je      3f
        inc     qword ptr [rbx + CB_REGISTER_MISMATCHES]
        mov     edx, CH_REGISTER_MISMATCH
        call    report
3:      ret
