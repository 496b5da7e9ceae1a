//! The guest TSC across a live update.
//!
//! Goal: the guest's TSC keeps counting real time across the update, with no
//! jump back and no skipped time, so the gap the guest measures by its own
//! TSC is the real blackout.
//!
//! How: both processes run on the same host and read the same host TSC, so
//! the guest TSC is continuous exactly when the successor's vCPU has the
//! same offset from the host TSC as the predecessor's. KVM exposes that
//! offset as the vCPU device attribute `KVM_VCPU_TSC_CTRL` /
//! `KVM_VCPU_TSC_OFFSET`; the capture reads it and the restore writes it
//! back. Where the attribute is missing, the restore falls back to writing
//! MSR_IA32_TSC with the saved value advanced by the host TSC ticks that
//! passed meanwhile (exact up to the few microseconds between reading the
//! host TSC and the write taking effect). Writing the saved MSR value as is,
//! which a generic "restore all MSRs" does, would move the guest's clock
//! back by the whole blackout; the TSC is therefore kept out of the MSR list.
//!
//! Measured on this machine (KVM PVM on Linux 6.18): RDTSC runs natively in
//! the guest (PVM runs guest user mode at hardware CPL 3, where no offset
//! applies), so the guest TSC *is* the host TSC: MSR_IA32_TSC reads the host
//! TSC, the offset attribute reads 0 and ignores writes (it is accepted and
//! reads back 0), and there is no TSC scaling (`KVM_CAP_TSC_CONTROL` is 0).
//! Continuity across an update is therefore automatic here; the saved offset
//! (0) is still written so the same code is right on a VMX or SVM host. A
//! frequency change cannot be compensated without scaling, so a record whose
//! TSC frequency differs from the new vCPU's is refused.

use std::os::fd::AsRawFd;

use kvm_bindings::{Msrs, kvm_device_attr, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

use crate::error::{Result, VmmError};

/// `KVM_VCPU_TSC_CTRL`: the vCPU attribute group of the TSC.
const KVM_VCPU_TSC_CTRL: u32 = 0;
/// `KVM_VCPU_TSC_OFFSET`: the guest TSC's offset from the host TSC.
const KVM_VCPU_TSC_OFFSET: u64 = 0;
/// MSR_IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;

/// `_IOW(KVMIO, nr, struct kvm_device_attr)`: kvm-ioctls offers the vCPU
/// attribute ioctls only on aarch64.
const fn device_attr_ioctl(number: u64) -> u64 {
    const WRITE: u64 = 1;
    const KVMIO: u64 = 0xae;
    (WRITE << 30) | ((size_of::<kvm_device_attr>() as u64) << 16) | (KVMIO << 8) | number
}
const KVM_SET_DEVICE_ATTR: u64 = device_attr_ioctl(0xe1);
const KVM_GET_DEVICE_ATTR: u64 = device_attr_ioctl(0xe2);
const KVM_HAS_DEVICE_ATTR: u64 = device_attr_ioctl(0xe3);

/// The guest TSC of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TscState {
    /// The vCPU's TSC frequency in kHz (0: KVM could not say).
    pub khz: u32,
    /// Offset of the guest TSC from the host TSC, where KVM exposes it.
    pub offset: Option<u64>,
    /// MSR_IA32_TSC at capture.
    pub guest_tsc: u64,
    /// The host TSC read right after `guest_tsc`.
    pub host_tsc: u64,
}

/// The host's TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl TscState {
    /// Reads the TSC state of a stopped vCPU.
    ///
    /// # Errors
    /// - [`VmmError::VcpuIoctl`]: `KVM_GET_MSRS` or `KVM_GET_DEVICE_ATTR`
    ///   failed (EFAULT, ENXIO).
    pub fn capture(fd: &VcpuFd, vcpu: u32) -> Result<Self> {
        let khz = fd.get_tsc_khz().unwrap_or(0);
        let offset = if has_offset_attribute(fd) {
            let mut value = 0u64;
            offset_attribute(fd, KVM_GET_DEVICE_ATTR, &mut value).map_err(|errno| {
                VmmError::VcpuIoctl {
                    operation: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
                    vcpu,
                    errno,
                }
            })?;
            Some(value)
        } else {
            None
        };
        let guest_tsc = read_tsc_msr(fd, vcpu)?;
        Ok(Self {
            khz,
            offset,
            guest_tsc,
            host_tsc: host_tsc(),
        })
    }

    /// Gives a new vCPU on the same host this TSC state, so the guest TSC
    /// continues from where it was plus the real time that passed.
    ///
    /// # Errors
    /// - [`VmmError::StateMismatch`] (EINVAL): the saved frequency differs
    ///   from the vCPU's (no TSC scaling to compensate).
    /// - [`VmmError::VcpuIoctl`]: `KVM_SET_DEVICE_ATTR` or `KVM_SET_MSRS` failed.
    pub fn restore(&self, fd: &VcpuFd, vcpu: u32) -> Result<()> {
        let khz = fd.get_tsc_khz().unwrap_or(0);
        if self.khz != 0 && khz != 0 && self.khz != khz {
            return Err(VmmError::StateMismatch {
                reason: format!(
                    "vCPU {vcpu}: TSC at {} kHz saved, the new vCPU runs at {khz} kHz and \
                     this KVM cannot scale",
                    self.khz
                ),
            });
        }
        match self.offset {
            Some(offset) if has_offset_attribute(fd) => {
                let mut value = offset;
                offset_attribute(fd, KVM_SET_DEVICE_ATTR, &mut value).map_err(|errno| {
                    VmmError::VcpuIoctl {
                        operation: "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
                        vcpu,
                        errno,
                    }
                })
            }
            _ => {
                let elapsed = host_tsc().wrapping_sub(self.host_tsc);
                write_tsc_msr(fd, vcpu, self.guest_tsc.wrapping_add(elapsed))
            }
        }
    }
}

fn has_offset_attribute(fd: &VcpuFd) -> bool {
    let mut unused = 0u64;
    offset_attribute(fd, KVM_HAS_DEVICE_ATTR, &mut unused).is_ok()
}

/// Runs one of the device-attribute ioctls on the TSC offset attribute.
fn offset_attribute(fd: &VcpuFd, request: u64, value: &mut u64) -> std::result::Result<(), i32> {
    let attribute = kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: KVM_VCPU_TSC_OFFSET,
        addr: value as *mut u64 as u64,
    };
    // SAFETY: `attribute` is a valid kvm_device_attr whose `addr` points at
    // a live u64, the size KVM_VCPU_TSC_OFFSET reads or writes; the request
    // is one of the three device-attribute ioctls, which touch nothing else.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &attribute) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL))
    }
}

fn read_tsc_msr(fd: &VcpuFd, vcpu: u32) -> Result<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| VmmError::VcpuIoctl {
        operation: "KVM_GET_MSRS(IA32_TSC)",
        vcpu,
        errno: libc::E2BIG,
    })?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(VmmError::VcpuIoctl {
            operation: "KVM_GET_MSRS(IA32_TSC)",
            vcpu,
            errno: libc::EINVAL,
        }),
        Err(error) => Err(VmmError::vcpu("KVM_GET_MSRS(IA32_TSC)", vcpu, error)),
    }
}

fn write_tsc_msr(fd: &VcpuFd, vcpu: u32, value: u64) -> Result<()> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: value,
        ..Default::default()
    }])
    .map_err(|_| VmmError::VcpuIoctl {
        operation: "KVM_SET_MSRS(IA32_TSC)",
        vcpu,
        errno: libc::E2BIG,
    })?;
    match fd.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(VmmError::VcpuIoctl {
            operation: "KVM_SET_MSRS(IA32_TSC)",
            vcpu,
            errno: libc::EINVAL,
        }),
        Err(error) => Err(VmmError::vcpu("KVM_SET_MSRS(IA32_TSC)", vcpu, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_attribute_ioctl_numbers_match_the_uapi() {
        // From linux/kvm.h: _IOW(KVMIO, 0xe1..0xe3, struct kvm_device_attr).
        assert_eq!(KVM_SET_DEVICE_ATTR, 0x4018_aee1);
        assert_eq!(KVM_GET_DEVICE_ATTR, 0x4018_aee2);
        assert_eq!(KVM_HAS_DEVICE_ATTR, 0x4018_aee3);
    }
}
