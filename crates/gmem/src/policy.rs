//! The shared NUMA policy of a file: which nodes its folios come from.
//!
//! Model: as guest_memfd and shmem do it, the policy belongs to the file
//! (the kernel's shared policy, `mpol_shared_policy`), set per page range
//! with mbind(2) on a mapping of the file and read back per page with
//! get_mempolicy(2, MPOL_F_ADDR). The kernel then allocates by it, also on
//! fallocate (shmem and guest_memfd look the shared policy up by index).
//! hugetlbfs keeps no shared policy: mbind sets the mapping's (VMA) policy,
//! which faults through the mapping obey but fallocate does not, so on that
//! backend the crate sets the allocating thread's policy around each
//! fallocate (see `file`).
//!
//! Nodes are checked against /sys/devices/system/node/online before the
//! kernel sees them, so a missing node is EINVAL with a message naming it.

use std::ops::Range;

use rustix::io::Errno;

use crate::types::PageIndex;

/// `MPOL_DEFAULT`, `MPOL_PREFERRED`, `MPOL_BIND`, `MPOL_INTERLEAVE`
/// (include/uapi/linux/mempolicy.h).
const MPOL_DEFAULT: i32 = 0;
const MPOL_PREFERRED: i32 = 1;
const MPOL_BIND: i32 = 2;
const MPOL_INTERLEAVE: i32 = 3;
/// `MPOL_F_ADDR`: get_mempolicy reports the policy at an address.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
/// Bits in a node mask: nodes 0..63 (this crate's limit; the machine has 1).
const MAX_NODES: libc::c_ulong = 64;

/// A set of NUMA nodes (bit n = node n), nodes 0 to 63.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeMask(pub u64);

impl NodeMask {
    /// The set holding only `node` (nodes past 63 give an empty set, which
    /// every policy that needs nodes rejects).
    pub fn single(node: u32) -> NodeMask {
        NodeMask(1u64.checked_shl(node).unwrap_or(0))
    }
}

/// A NUMA memory policy (`set_mempolicy(2)` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MemPolicy {
    /// Allocate on the node of the allocating CPU (the task's policy).
    #[default]
    Default,
    /// Prefer this node, fall back to others.
    Preferred(u32),
    /// Allocate only on these nodes.
    Bind(NodeMask),
    /// Spread pages round-robin over these nodes.
    Interleave(NodeMask),
}

impl MemPolicy {
    /// The mode and node mask for mbind / set_mempolicy.
    fn to_raw(self) -> (i32, u64) {
        match self {
            MemPolicy::Default => (MPOL_DEFAULT, 0),
            MemPolicy::Preferred(node) => (MPOL_PREFERRED, NodeMask::single(node).0),
            MemPolicy::Bind(mask) => (MPOL_BIND, mask.0),
            MemPolicy::Interleave(mask) => (MPOL_INTERLEAVE, mask.0),
        }
    }

    /// The policy get_mempolicy reported (mode flags in the high bits are
    /// dropped).
    fn from_raw(mode: i32, mask: u64) -> Option<MemPolicy> {
        let mode = mode & 0xffff;
        Some(match mode {
            MPOL_DEFAULT => MemPolicy::Default,
            MPOL_PREFERRED => MemPolicy::Preferred(mask.trailing_zeros()),
            MPOL_BIND => MemPolicy::Bind(NodeMask(mask)),
            MPOL_INTERLEAVE => MemPolicy::Interleave(NodeMask(mask)),
            _ => return None,
        })
    }

    /// Checks the nodes against the online ones; `Err` names the problem.
    pub(crate) fn check_nodes(self) -> Result<(), String> {
        let online = online_nodes();
        let wanted = match self {
            MemPolicy::Default => return Ok(()),
            MemPolicy::Preferred(node) => {
                if node >= 64 {
                    return Err(format!("node {node} does not exist (online: {online:#b})"));
                }
                NodeMask::single(node).0
            }
            MemPolicy::Bind(mask) | MemPolicy::Interleave(mask) => mask.0,
        };
        if wanted == 0 {
            return Err("the node mask is empty".to_owned());
        }
        let missing = wanted & !online;
        if missing != 0 {
            return Err(format!(
                "node {} does not exist (online nodes mask {online:#b})",
                missing.trailing_zeros()
            ));
        }
        Ok(())
    }
}

/// The online NUMA nodes as a mask; node 0 alone where sysfs cannot be read
/// (a machine without NUMA support still has node 0).
pub fn online_nodes() -> u64 {
    std::fs::read_to_string("/sys/devices/system/node/online")
        .map(|text| parse_node_list(text.trim()))
        .unwrap_or(1)
}

/// Parses a kernel node list such as "0", "0-3" or "0,2-3" (nodes >= 64 are
/// ignored).
fn parse_node_list(text: &str) -> u64 {
    let mut mask = 0u64;
    for part in text.split(',').filter(|part| !part.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (first.parse::<u32>(), last.parse::<u32>()),
            None => (part.parse::<u32>(), part.parse::<u32>()),
        };
        if let (Ok(first), Ok(last)) = (first, last) {
            for node in first..=last.min(63) {
                mask |= 1 << node;
            }
        }
    }
    mask
}

/// Applies `policy` to `len` bytes of a mapping at `address` (mbind).
pub(crate) fn mbind(address: usize, len: usize, policy: MemPolicy) -> Result<(), Errno> {
    let (mode, mask) = policy.to_raw();
    let mask_pointer: *const u64 = if mode == MPOL_DEFAULT {
        std::ptr::null()
    } else {
        &mask
    };
    let max_node = if mode == MPOL_DEFAULT { 0 } else { MAX_NODES };
    // SAFETY: mbind reads `max_node` bits from `mask_pointer` (a live u64, or
    // null with 0 bits) and changes only policy metadata of the range, which
    // the caller owns (a mapping of the file that lives as long as the file).
    let result = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            address,
            len,
            mode,
            mask_pointer,
            max_node,
            0 as libc::c_uint,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(last_errno()))
    }
}

/// The policy in force at `address` (get_mempolicy with MPOL_F_ADDR).
pub(crate) fn policy_at_address(address: usize) -> Result<MemPolicy, Errno> {
    let mut mode: libc::c_int = 0;
    let mut mask: u64 = 0;
    // SAFETY: get_mempolicy writes one int to `mode` and MAX_NODES bits (one
    // u64) to `mask`, both live locals; `address` is only looked up.
    let result = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            &mut mask as *mut u64,
            MAX_NODES,
            address,
            MPOL_F_ADDR,
        )
    };
    if result != 0 {
        return Err(Errno::from_raw_os_error(last_errno()));
    }
    MemPolicy::from_raw(mode, mask).ok_or(Errno::INVAL)
}

/// Sets the calling thread's policy (set_mempolicy); returns the old one.
pub(crate) fn set_thread_policy(policy: MemPolicy) -> Result<MemPolicy, Errno> {
    let mut old_mode: libc::c_int = 0;
    let mut old_mask: u64 = 0;
    // SAFETY: as in `policy_at_address`, without MPOL_F_ADDR: reads the
    // thread's own policy into live locals.
    let result = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut old_mode as *mut libc::c_int,
            &mut old_mask as *mut u64,
            MAX_NODES,
            0usize,
            0 as libc::c_ulong,
        )
    };
    if result != 0 {
        return Err(Errno::from_raw_os_error(last_errno()));
    }
    let (mode, mask) = policy.to_raw();
    let mask_pointer: *const u64 = if mode == MPOL_DEFAULT {
        std::ptr::null()
    } else {
        &mask
    };
    // SAFETY: set_mempolicy reads MAX_NODES bits from a live u64 (or nothing
    // from null) and changes only this thread's policy.
    let result = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            mode,
            mask_pointer,
            if mode == MPOL_DEFAULT { 0 } else { MAX_NODES },
        )
    };
    if result != 0 {
        return Err(Errno::from_raw_os_error(last_errno()));
    }
    Ok(MemPolicy::from_raw(old_mode, old_mask).unwrap_or_default())
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The policy ranges a file was given, kept for its descriptor (what a
/// successor re-applies). Sorted, non-overlapping, Default never stored.
#[derive(Debug, Default)]
pub(crate) struct PolicyRanges {
    ranges: Vec<(Range<PageIndex>, MemPolicy)>,
}

impl PolicyRanges {
    /// Records `policy` over `range`, replacing what overlapped it.
    pub(crate) fn set(&mut self, range: Range<PageIndex>, policy: MemPolicy) {
        let mut kept = Vec::with_capacity(self.ranges.len() + 2);
        for (existing, existing_policy) in self.ranges.drain(..) {
            if existing.end <= range.start || existing.start >= range.end {
                kept.push((existing, existing_policy));
                continue;
            }
            if existing.start < range.start {
                kept.push((existing.start..range.start, existing_policy));
            }
            if existing.end > range.end {
                kept.push((range.end..existing.end, existing_policy));
            }
        }
        if policy != MemPolicy::Default {
            kept.push((range, policy));
        }
        kept.sort_by_key(|(range, _)| range.start);
        self.ranges = kept;
    }

    /// The recorded ranges, in order.
    pub(crate) fn ranges(&self) -> &[(Range<PageIndex>, MemPolicy)] {
        &self.ranges
    }

    /// The recorded policy at `index` (Default where none was set).
    pub(crate) fn at(&self, index: PageIndex) -> MemPolicy {
        self.ranges
            .iter()
            .find(|(range, _)| range.contains(&index))
            .map_or(MemPolicy::Default, |(_, policy)| *policy)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn node_lists_parse() {
        assert_eq!(parse_node_list("0"), 1);
        assert_eq!(parse_node_list("0-2,5"), 0b100111);
        assert_eq!(parse_node_list(""), 0);
    }

    #[test]
    fn ranges_split_and_replace() {
        let mut ranges = PolicyRanges::default();
        let bind = MemPolicy::Bind(NodeMask(1));
        ranges.set(PageIndex(0)..PageIndex(10), bind);
        ranges.set(PageIndex(3)..PageIndex(5), MemPolicy::Preferred(0));
        ranges.set(PageIndex(8)..PageIndex(9), MemPolicy::Default);
        assert_eq!(
            ranges.ranges(),
            &[
                (PageIndex(0)..PageIndex(3), bind),
                (PageIndex(3)..PageIndex(5), MemPolicy::Preferred(0)),
                (PageIndex(5)..PageIndex(8), bind),
                (PageIndex(9)..PageIndex(10), bind),
            ]
        );
        assert_eq!(ranges.at(PageIndex(8)), MemPolicy::Default);
    }

    #[test]
    fn missing_nodes_are_named() {
        let error = MemPolicy::Bind(NodeMask(1 << 40)).check_nodes();
        assert!(error.is_err_and(|message| message.contains("node 40")));
        assert!(MemPolicy::Preferred(0).check_nodes().is_ok());
    }
}
