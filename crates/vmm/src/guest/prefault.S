# gmem-lu prefault program: touches one byte in every page of a range, then
# reports through the MMIO doorbell and spins. It runs in a *new* VM before
# the saved guest state is restored into it, with the guest's own page
# tables and mode (user mode, the guest's CR3), so that KVM builds the
# shadow page tables the guest will use, while the old VM still runs the
# guest. Contract: crates/vmm/src/prefault.rs.
#
# Entry: rdi = first byte to touch, rsi = end (exclusive), rcx = stride,
# rdx = the doorbell address to report on. Loads only: guest memory is the
# running guest's and is never written.
#
# Rebuild the bytes after editing: crates/vmm/guest-build.sh

        .intel_syntax noprefix
        .code64
        .text
        .globl _start

_start:
        cmp     rdi, rsi
        jae     2f
1:      mov     al, [rdi]
        add     rdi, rcx
        cmp     rdi, rsi
        jb      1b
2:      mov     [rdx], eax
3:      pause
        jmp     3b
