//! Abort after freeze: the old process carries on unharmed and nothing
//! leaks. One test per binary, because it counts this process's open fds
//! and parallel tests would open their own.

use std::os::fd::OwnedFd;

use liveupdate::handlers::memfd;
use liveupdate::{FileIdentity, HandlerRegistry, LiveUpdate, Token};
use rustix::fs::{FallocateFlags, MemfdFlags};

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn abort_after_freeze_restores_everything_and_leaks_nothing() {
    let files: Vec<OwnedFd> = (0..4)
        .map(|index| {
            let fd =
                rustix::fs::memfd_create(format!("guest{index}"), MemfdFlags::CLOEXEC).unwrap();
            rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
            fd
        })
        .collect();
    let before = open_fd_count();
    for round in 0..3 {
        let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
        let session = live_update.create_session("vm").unwrap();
        for (token, file) in files.iter().enumerate() {
            session.preserve(Token(token as u64), file).unwrap();
        }
        let handover = live_update.freeze().unwrap();
        assert_eq!(handover.fds().len(), 4);
        handover.abort();
        // Still preserved after the abort: sizes stay fixed.
        for file in &files {
            assert_eq!(
                memfd::set_len(file, 2 << 20).unwrap_err().errno(),
                libc::EPERM
            );
        }
        // Freezing again works, and so does closing.
        live_update.freeze().unwrap().abort();
        session.close();
        for file in &files {
            assert!(!liveupdate::preserved::is_preserved(
                FileIdentity::of(file).unwrap()
            ));
            memfd::fallocate(file, FallocateFlags::KEEP_SIZE, 0, 1 << 20).unwrap();
            rustix::io::pwrite(file, &[round as u8 + 1], 4096).unwrap();
        }
        drop(live_update);
        assert_eq!(open_fd_count(), before, "round {round} leaked fds");
    }
}
