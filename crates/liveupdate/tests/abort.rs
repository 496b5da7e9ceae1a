//! Abort after freeze: the old process carries on unharmed and nothing
//! leaks. One test per binary, because it counts this process's open fds
//! and parallel tests would open their own.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile, PageIndex};
use liveupdate::handlers::memfd;
use liveupdate::{FileIdentity, HandlerRegistry, LiveUpdate, Token};
use rustix::fs::{FallocateFlags, MemfdFlags};

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn abort_after_freeze_restores_everything_and_leaks_nothing() {
    let memfds: Vec<OwnedFd> = (0..2)
        .map(|index| {
            let fd =
                rustix::fs::memfd_create(format!("state{index}"), MemfdFlags::CLOEXEC).unwrap();
            rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
            fd
        })
        .collect();
    let guests: Vec<Arc<GuestMemFile>> = (0..2)
        .map(|_| {
            let file =
                GuestMemFile::create(4 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).unwrap();
            file.fallocate(FallocMode::ALLOCATE, 0, 64 * 4096).unwrap();
            file.mapping().unwrap();
            file
        })
        .collect();
    let before = open_fd_count();
    for round in 0..3u64 {
        let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
        let session = live_update.create_session("vm").unwrap();
        for (token, file) in memfds.iter().enumerate() {
            session.preserve(Token(token as u64), file).unwrap();
        }
        for (token, guest) in guests.iter().enumerate() {
            session
                .preserve(Token(10 + token as u64), guest.as_fd())
                .unwrap();
        }
        let handover = live_update.freeze().unwrap();
        assert_eq!(handover.fds().len(), 4);
        handover.abort();
        // Still preserved after the abort: sizes fixed, guest memory frozen
        // (present pages are served, new ones are not).
        for file in &memfds {
            assert_eq!(
                memfd::set_len(file, 2 << 20).unwrap_err().errno(),
                libc::EPERM
            );
        }
        for guest in &guests {
            assert!(guest.is_frozen());
            assert!(guest.get_folio(PageIndex(1)).is_ok());
            assert_eq!(
                guest.get_folio(PageIndex(900)).unwrap_err().errno(),
                libc::EPERM
            );
        }
        // Freezing again works, and so does closing: the old process carries
        // on as if nothing happened.
        live_update.freeze().unwrap().abort();
        session.close();
        for file in &memfds {
            assert!(!liveupdate::preserved::is_preserved(
                FileIdentity::of(file).unwrap()
            ));
            memfd::fallocate(file, FallocateFlags::KEEP_SIZE, 0, 1 << 20).unwrap();
        }
        for guest in &guests {
            assert!(!guest.is_frozen());
            // A fault on a missing page allocates it; fallocate works.
            let page = PageIndex(500 + round);
            guest.get_folio(page).unwrap();
            assert!(guest.is_present(page));
            guest
                .fallocate(FallocMode::ALLOCATE, (600 + round as i64) * 4096, 4096)
                .unwrap();
            guest
                .fallocate(FallocMode::PUNCH, (600 + round as i64) * 4096, 4096)
                .unwrap();
        }
        drop(live_update);
        assert_eq!(open_fd_count(), before, "round {round} leaked fds");
    }
}
