//! The shared NUMA policy: set with mbind on the file's mapping, reported
//! back by the kernel's get_mempolicy, obeyed by allocation. This machine has
//! one node, so the plumbing is tested on node 0 and a missing node must be
//! refused with EINVAL.

mod common;

use common::backends;
use gmem::{Backend, GmemFlags, GuestMemFile, MemPolicy, NodeMask, PageIndex};

#[test]
fn policies_round_trip_through_the_kernel() {
    let node0 = NodeMask::single(0);
    for backend in backends() {
        let file =
            GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, backend).expect("create");
        assert_eq!(
            file.policy_at(PageIndex(3)).expect("policy"),
            MemPolicy::Default
        );
        for policy in [
            MemPolicy::Bind(node0),
            MemPolicy::Preferred(0),
            MemPolicy::Interleave(node0),
        ] {
            file.set_policy(PageIndex(0)..PageIndex(16), policy)
                .expect("set_policy");
            assert_eq!(
                file.policy_at(PageIndex(3)).expect("policy"),
                policy,
                "{backend}"
            );
            assert_eq!(
                file.policy_at(PageIndex(16)).expect("policy"),
                MemPolicy::Default,
                "{backend}"
            );
        }
        // Allocation under the policy works and is recorded.
        file.get_folio(PageIndex(5)).expect("fault under policy");
        assert!(file.is_present(PageIndex(5)));
        assert_eq!(
            file.descriptor().policies,
            vec![(PageIndex(0)..PageIndex(16), MemPolicy::Interleave(node0))]
        );
        file.set_policy(PageIndex(0)..PageIndex(16), MemPolicy::Default)
            .expect("reset");
        assert_eq!(
            file.policy_at(PageIndex(3)).expect("policy"),
            MemPolicy::Default
        );
        assert!(file.descriptor().policies.is_empty());
    }
}

#[test]
fn missing_nodes_and_bad_ranges_are_einval() {
    let file =
        GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).expect("create");
    let online = gmem::policy::online_nodes();
    let missing = (0..64)
        .find(|node| online & (1u64 << node) == 0)
        .expect("a missing node");
    for policy in [
        MemPolicy::Bind(NodeMask::single(missing)),
        MemPolicy::Preferred(missing),
        MemPolicy::Interleave(NodeMask(0)),
    ] {
        let error = file
            .set_policy(PageIndex(0)..PageIndex(1), policy)
            .expect_err("missing node");
        assert_eq!(error.errno(), libc::EINVAL, "{policy:?}: {error}");
    }
    let node0 = MemPolicy::Bind(NodeMask::single(0));
    for range in [PageIndex(4)..PageIndex(4), PageIndex(250)..PageIndex(257)] {
        let error = file
            .set_policy(range.clone(), node0)
            .expect_err("bad range");
        assert_eq!(error.errno(), libc::EINVAL, "{range:?}");
    }
    assert_eq!(
        file.policy_at(PageIndex(256))
            .expect_err("past the end")
            .errno(),
        libc::EINVAL
    );
}

#[test]
fn restore_reapplies_policies() {
    let file =
        GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).expect("create");
    let policy = MemPolicy::Preferred(0);
    file.set_policy(PageIndex(8)..PageIndex(12), policy)
        .expect("set_policy");
    let descriptor = file.descriptor();
    let fd = file.as_fd().try_clone_to_owned().expect("dup");
    drop(file);
    let restored = GuestMemFile::restore(fd, &descriptor, []).expect("restore");
    assert_eq!(restored.policy_at(PageIndex(9)).expect("policy"), policy);
    assert_eq!(restored.descriptor().policies, descriptor.policies);
}
