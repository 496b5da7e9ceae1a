//! The guest-memory-file handler this VMM registers: liveupdate's gmem
//! handler (same data format, same preserve, unpreserve, unfreeze and
//! finish) with the two walks of the page index moved out of the blackout.
//!
//! Why: the builtin handler describes the file at the handover moment
//! (`freeze`) by walking its page index folio by folio, and a successor that
//! built the file object ahead (transfer mode) has it walked again at
//! `retrieve` to check it against the record. Each walk costs 3.9 ms at
//! 2 GiB and 15.7 ms at 8 GiB of 4 KiB folios here, both inside the
//! blackout, which a sub-millisecond transfer cannot afford and which
//! grows with guest size.
//!
//! What changes:
//! 1. `preserve` (guest running) freezes the file, then describes it once
//!    and keeps the bytes; `freeze` returns them. Invariant that makes this
//!    right: a preserved file is frozen, so its index cannot change unless
//!    someone unfreezes it; in this VMM only the explicit parked-vCPU step
//!    does, and it calls [`note_index_changed`], after which `freeze`
//!    describes the file again. A file found unfrozen at `freeze` is
//!    refused with EBUSY, as by the builtin handler.
//! 2. A successor that rebuilt the object ahead from an offer records the
//!    bytes it used ([`note_built_ahead`]); `retrieve` returns that object
//!    when the final record carries the same bytes (a comparison of the
//!    runs, not a walk of the index), and otherwise lets the builtin handler
//!    decide (its full check, or a restore when there is no object).
//!
//! Failure paths are the builtin handler's; the handler's compatible string
//! differs ("vmm-gmem"), so both ends of an update must register it
//! ([`registry`]).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use gmem::GuestMemFile;
use liveupdate::handler::PreservedState;
use liveupdate::handlers::gmem::{GmemHandler, describe};
use liveupdate::handlers::memfd::MemfdHandler;
use liveupdate::{
    Compatible, FileHandler, FileIdentity, HandlerError, HandlerRegistry, RetrievedObject,
};

/// The handler's compatible string.
pub const COMPATIBLE: &str = "vmm-gmem";
/// The version of its data (the builtin gmem handler's data, version 1).
pub const VERSION: u32 = 1;

/// Which guest-memory handler both ends of an update use.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum HandlerChoice {
    /// [`CachedGmemHandler`]: no walk of the page index in the blackout.
    #[default]
    Cached,
    /// liveupdate's builtin gmem handler (for comparison).
    Builtin,
}

/// The handlers of an update: guest memory files first (a memfd-backed
/// guest memory file is also a memfd), then memfds (the state slot).
///
/// # Errors
/// EINVAL ([`liveupdate::LuError::InvalidCompatible`]) if [`COMPATIBLE`]
/// were not a valid compatible string (a unit test pins that it is).
pub fn registry(choice: HandlerChoice) -> Result<HandlerRegistry, liveupdate::LuError> {
    match choice {
        HandlerChoice::Builtin => Ok(HandlerRegistry::with_builtin_handlers()),
        HandlerChoice::Cached => {
            let mut registry = HandlerRegistry::new();
            registry.register(Arc::new(CachedGmemHandler::new()?))?;
            registry.register(Arc::new(MemfdHandler::new()))?;
            Ok(registry)
        }
    }
}

/// Files whose page index the VMM changed while they were preserved.
static CHANGED: Mutex<Vec<FileIdentity>> = Mutex::new(Vec::new());
/// Objects a successor built ahead, with the handler data they came from.
static BUILT_AHEAD: Mutex<Vec<(FileIdentity, Vec<u8>)>> = Mutex::new(Vec::new());

fn identity(file: &GuestMemFile) -> Option<FileIdentity> {
    FileIdentity::of(file.as_fd()).ok()
}

/// Says that `file`'s page index changed while it was preserved (the
/// explicit parked step unfroze it): its next `freeze` describes it again.
pub fn note_index_changed(file: &GuestMemFile) {
    if let Some(identity) = identity(file) {
        CHANGED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(identity);
    }
}

/// Says that this process built `file` ahead from handler data `data` (a
/// transfer offer).
pub fn note_built_ahead(file: &GuestMemFile, data: &[u8]) {
    if let Some(identity) = identity(file) {
        let mut built = BUILT_AHEAD.lock().unwrap_or_else(PoisonError::into_inner);
        built.retain(|(known, _)| *known != identity);
        built.push((identity, data.to_vec()));
    }
}

fn take_changed(identity: FileIdentity) -> bool {
    let mut changed = CHANGED.lock().unwrap_or_else(PoisonError::into_inner);
    let before = changed.len();
    changed.retain(|known| *known != identity);
    changed.len() != before
}

fn built_ahead_from(identity: FileIdentity, data: &[u8]) -> bool {
    BUILT_AHEAD
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|(known, bytes)| *known == identity && bytes == data)
}

/// The cached handler; see the module documentation.
#[derive(Debug)]
pub struct CachedGmemHandler {
    inner: GmemHandler,
    compatible: Compatible,
}

impl CachedGmemHandler {
    /// The handler.
    ///
    /// # Errors
    /// As [`registry`].
    pub fn new() -> Result<Self, liveupdate::LuError> {
        Ok(Self {
            inner: GmemHandler::new(),
            compatible: Compatible::new(COMPATIBLE, VERSION)?,
        })
    }
}

/// The handler's state for one preserved file.
struct Cached {
    inner: PreservedState,
    file: Arc<GuestMemFile>,
    identity: FileIdentity,
    data: Vec<u8>,
}

fn cached(state: &mut PreservedState) -> Result<&mut Cached, HandlerError> {
    state
        .downcast_mut::<Cached>()
        .ok_or_else(|| HandlerError::new(libc::EINVAL, "vmm-gmem handler given a foreign state"))
}

fn described(file: &GuestMemFile) -> Result<Vec<u8>, HandlerError> {
    describe(file)
        .map(|data| data.encode())
        .map_err(|error| HandlerError::new(error.errno(), error.to_string()))
}

impl FileHandler for CachedGmemHandler {
    fn compatible(&self) -> &Compatible {
        &self.compatible
    }

    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        self.inner.can_preserve(file)
    }

    fn preserve(&self, file: BorrowedFd<'_>) -> Result<PreservedState, HandlerError> {
        let inner = self.inner.preserve(file)?;
        let found = gmem::lookup(file)
            .and_then(|object| identity(&object).map(|identity| (object, identity)));
        let Some((object, identity)) = found else {
            self.inner.unpreserve(file, inner);
            return Err(HandlerError::new(
                libc::ENOENT,
                "the fd has no guest memory file in this process",
            ));
        };
        // Frozen by the builtin preserve: the walk sees a stable index.
        match described(&object) {
            Ok(data) => {
                take_changed(identity);
                Ok(Box::new(Cached {
                    inner,
                    file: object,
                    identity,
                    data,
                }))
            }
            Err(error) => {
                self.inner.unpreserve(file, inner);
                Err(error)
            }
        }
    }

    fn unpreserve(&self, file: BorrowedFd<'_>, state: PreservedState) {
        match state.downcast::<Cached>() {
            Ok(cached) => self.inner.unpreserve(file, cached.inner),
            Err(state) => self.inner.unpreserve(file, state),
        }
    }

    fn freeze(
        &self,
        _file: BorrowedFd<'_>,
        state: &mut PreservedState,
    ) -> Result<Vec<u8>, HandlerError> {
        let cached = cached(state)?;
        if !cached.file.is_frozen() {
            return Err(HandlerError::new(
                libc::EBUSY,
                "the guest memory file is not frozen at the handover: its page index is not stable",
            ));
        }
        if take_changed(cached.identity) {
            cached.data = described(&cached.file)?;
        }
        Ok(cached.data.clone())
    }

    fn unfreeze(&self, file: BorrowedFd<'_>, state: &mut PreservedState) {
        if let Ok(cached) = cached(state) {
            self.inner.unfreeze(file, &mut cached.inner);
        }
    }

    fn retrieve(
        &self,
        file: OwnedFd,
        data: &[u8],
    ) -> Result<Arc<dyn RetrievedObject>, HandlerError> {
        let fd = std::os::fd::AsFd::as_fd(&file);
        if let Some(existing) = gmem::lookup(fd)
            && identity(&existing).is_some_and(|identity| built_ahead_from(identity, data))
        {
            return Ok(existing);
        }
        self.inner.retrieve(file, data)
    }

    fn can_finish(&self, retrieved: Option<&Arc<dyn RetrievedObject>>, data: &[u8]) -> bool {
        self.inner.can_finish(retrieved, data)
    }

    fn finish(&self, retrieved: Option<&Arc<dyn RetrievedObject>>, data: &[u8]) {
        self.inner.finish(retrieved, data);
        if let Some(retrieved) = retrieved
            && let Ok(identity) = FileIdentity::of(retrieved.as_fd())
        {
            BUILT_AHEAD
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(known, _)| *known != identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use gmem::{Backend, FallocMode, GmemFlags};
    use liveupdate::{Incoming, LiveUpdate, Token};

    use super::*;

    fn file_with(pages: i64) -> Arc<GuestMemFile> {
        let file =
            GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).unwrap();
        file.fallocate(FallocMode::ALLOCATE, 0, pages * 4096)
            .unwrap();
        file
    }

    #[test]
    fn freeze_hands_over_the_index_described_at_preserve_unless_told_it_changed() {
        let file = file_with(3);
        let live_update = LiveUpdate::new(registry(HandlerChoice::Cached).unwrap());
        let session = live_update.create_session("cached").unwrap();
        session.preserve(Token(0), file.as_fd()).unwrap();
        assert!(file.is_frozen(), "preserve froze the file");
        // The VMM's explicit step: unfreeze, allocate, freeze again.
        file.freeze(false);
        file.fallocate(FallocMode::ALLOCATE, 4096 * 3, 4096)
            .unwrap();
        file.freeze(true);
        let stale = live_update.preview().unwrap().0;
        let (_, record) = stale.files().next().unwrap();
        let data = liveupdate::handlers::gmem_data::GmemData::decode(&record.data).unwrap();
        assert_eq!(data.folio_count(), 3, "the cached description, as designed");
        note_index_changed(&file);
        let handover = live_update.freeze().unwrap();
        let (_, record) = handover.record().files().next().unwrap();
        let data = liveupdate::handlers::gmem_data::GmemData::decode(&record.data).unwrap();
        assert_eq!(data.folio_count(), 4, "described again after the change");
        handover.abort();
        // Unfrozen at freeze: refused, as the builtin handler does.
        file.freeze(false);
        assert_eq!(live_update.freeze().unwrap_err().errno(), libc::EBUSY);
        drop(session);
        assert!(!file.is_frozen());
    }

    #[test]
    fn retrieve_reuses_an_object_built_ahead_from_the_same_data_only() {
        let file = file_with(2);
        let live_update = LiveUpdate::new(registry(HandlerChoice::Cached).unwrap());
        let session = live_update.create_session("ahead").unwrap();
        session.preserve(Token(0), file.as_fd()).unwrap();
        let handover = live_update.freeze().unwrap();
        let bytes = handover.bytes().to_vec();
        let fd = || handover.fds()[0].try_clone_to_owned().unwrap();
        let (_, record) = handover.record().files().next().unwrap();
        // The same process plays the successor: its object is `file`.
        note_built_ahead(&file, &record.data);
        let mut incoming = Incoming::decode(
            &registry(HandlerChoice::Cached).unwrap(),
            &bytes,
            vec![fd()],
        )
        .unwrap();
        let mut ahead = incoming.retrieve_session("ahead").unwrap();
        let retrieved = ahead.retrieve(Token(0)).unwrap();
        let object = retrieved.downcast::<GuestMemFile>().unwrap();
        assert!(Arc::ptr_eq(&object, &file));
        ahead.finish().unwrap();
        assert!(!file.is_frozen(), "finish unfroze the file");
        // Data that differs from what the object was built from goes to the
        // builtin handler's full check.
        note_built_ahead(&file, b"other bytes");
        file.freeze(true);
        let mut incoming = Incoming::decode(
            &registry(HandlerChoice::Cached).unwrap(),
            &bytes,
            vec![fd()],
        )
        .unwrap();
        let mut again = incoming.retrieve_session("ahead").unwrap();
        let checked = again.retrieve(Token(0)).unwrap();
        assert!(Arc::ptr_eq(
            &checked.downcast::<GuestMemFile>().unwrap(),
            &file
        ));
        handover.complete();
    }
}
