//! The guest-memory-file handler this VMM registers: liveupdate's gmem
//! handler (same data format, same preserve, unpreserve, unfreeze and
//! finish) with the two walks of the page index moved out of the blackout.
//!
//! Why: the builtin handler describes the file at the handover moment
//! (`freeze`) by walking its page index, and a successor that built the
//! file object ahead (transfer mode) has it walked again at `retrieve` to
//! check it against the record. Both walks go a word of 64 folios at a
//! time (about 40 µs at 8 GiB of 4 KiB folios here), but they are inside
//! the blackout, and this handler does them while the guest runs instead.
//!
//! What changes:
//! 1. `preserve` (guest running) freezes the file, then describes it once
//!    and keeps the bytes with the file's index generation; `freeze`
//!    returns them when the generation is unchanged and describes the file
//!    again when it changed (the explicit parked-vCPU step unfroze the file
//!    and allocated pages meanwhile). Invariant that makes this right: the
//!    generation changes with every change of the index, and at `freeze`
//!    the file is frozen, so no change is in flight. A file found unfrozen
//!    at `freeze` is refused with EBUSY, as by the builtin handler.
//! 2. A successor that rebuilt the object ahead from an offer records the
//!    bytes it used and the object's generation ([`note_built_ahead`]);
//!    `retrieve` returns that object when the final record carries the same
//!    bytes and the object is unchanged (a comparison of the runs, not a
//!    walk of the index), and otherwise lets the builtin handler decide (its
//!    full check, which brings an object behind the record up to date, or a
//!    restore when there is no object).
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

/// Objects a successor built ahead: the file, the handler data they came
/// from, and the object's index generation then.
static BUILT_AHEAD: Mutex<Vec<(FileIdentity, Vec<u8>, u64)>> = Mutex::new(Vec::new());

fn identity(file: &GuestMemFile) -> Option<FileIdentity> {
    FileIdentity::of(file.as_fd()).ok()
}

/// Says that this process built `file` ahead from handler data `data` (a
/// transfer offer).
pub fn note_built_ahead(file: &GuestMemFile, data: &[u8]) {
    if let Some(identity) = identity(file) {
        let mut built = BUILT_AHEAD.lock().unwrap_or_else(PoisonError::into_inner);
        built.retain(|(known, _, _)| *known != identity);
        built.push((identity, data.to_vec(), file.index_generation()));
    }
}

/// Whether `file` was built ahead from exactly `data` and has not changed
/// since.
fn built_ahead_from(file: &GuestMemFile, data: &[u8]) -> bool {
    let Some(identity) = identity(file) else {
        return false;
    };
    let generation = file.index_generation();
    BUILT_AHEAD
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|(known, bytes, built)| *known == identity && bytes == data && *built == generation)
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
    /// The description, and the index generation it describes.
    data: Vec<u8>,
    generation: u64,
}

fn cached(state: &mut PreservedState) -> Result<&mut Cached, HandlerError> {
    state
        .downcast_mut::<Cached>()
        .ok_or_else(|| HandlerError::new(libc::EINVAL, "vmm-gmem handler given a foreign state"))
}

/// The file's description and the index generation it describes (read
/// before the walk: a change racing the walk shows as a newer generation
/// later, never as a stale description under a current generation).
fn described(file: &GuestMemFile) -> Result<(Vec<u8>, u64), HandlerError> {
    let generation = file.index_generation();
    describe(file)
        .map(|data| (data.encode(), generation))
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
        let Some(object) = gmem::lookup(file) else {
            self.inner.unpreserve(file, inner);
            return Err(HandlerError::new(
                libc::ENOENT,
                "the fd has no guest memory file in this process",
            ));
        };
        // Frozen by the builtin preserve: the walk sees a stable index.
        match described(&object) {
            Ok((data, generation)) => Ok(Box::new(Cached {
                inner,
                file: object,
                data,
                generation,
            })),
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
        // Frozen: no change is in flight, so an equal generation means the
        // index is the one described.
        if cached.file.index_generation() != cached.generation {
            (cached.data, cached.generation) = described(&cached.file)?;
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
            && built_ahead_from(&existing, data)
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
                .retain(|(known, _, _)| *known != identity);
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

    fn folios_in(record: &liveupdate::Record) -> u64 {
        let (_, file) = record.files().next().unwrap();
        liveupdate::handlers::gmem_data::GmemData::decode(&file.data)
            .unwrap()
            .folio_count()
    }

    #[test]
    fn freeze_hands_over_the_index_described_at_preserve_until_it_changes() {
        let file = file_with(3);
        let live_update = LiveUpdate::new(registry(HandlerChoice::Cached).unwrap());
        let session = live_update.create_session("cached").unwrap();
        session.preserve(Token(0), file.as_fd()).unwrap();
        assert!(file.is_frozen(), "preserve froze the file");
        let unchanged = live_update.preview().unwrap().0;
        assert_eq!(folios_in(&unchanged), 3);
        // The VMM's explicit step: unfreeze, allocate, freeze again. The
        // index generation tells the handler to describe the file again.
        file.freeze(false);
        file.fallocate(FallocMode::ALLOCATE, 4096 * 3, 4096)
            .unwrap();
        file.freeze(true);
        let handover = live_update.freeze().unwrap();
        assert_eq!(folios_in(handover.record()), 4, "described again");
        handover.abort();
        // An allocation of a folio already present changes nothing: the
        // description stays.
        file.freeze(false);
        file.fallocate(FallocMode::ALLOCATE, 0, 4096).unwrap();
        file.freeze(true);
        let again = live_update.freeze().unwrap();
        assert_eq!(folios_in(again.record()), 4);
        again.abort();
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
        // Data that differs from what the object was built from, or an
        // object changed since it was built, goes to the builtin handler's
        // full check.
        note_built_ahead(&file, b"other bytes");
        file.freeze(true);
        assert!(!built_ahead_from(&file, &record.data));
        note_built_ahead(&file, &record.data);
        assert!(built_ahead_from(&file, &record.data));
        file.freeze(false);
        file.fallocate(FallocMode::ALLOCATE, 0, 4096).unwrap();
        assert!(built_ahead_from(&file, &record.data), "no change");
        file.fallocate(FallocMode::ALLOCATE, 4096 * 9, 4096)
            .unwrap();
        assert!(!built_ahead_from(&file, &record.data), "the index changed");
        file.fallocate(FallocMode::PUNCH, 4096 * 9, 4096).unwrap();
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
