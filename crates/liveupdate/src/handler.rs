//! The file-handler trait and the registry of handlers.
//!
//! Model (upstream `kernel/liveupdate/luo_file.c`, "LUO File Descriptors"):
//! a handler knows one kind of file and how to carry it across a handover.
//! The orchestrator calls it at each step of a preserved file's life:
//!
//! 1. `can_preserve` — cheap: is this file mine? The registry asks the
//!    handlers in registration order; the first that says yes owns the file.
//! 2. `preserve` — the file joins a session while the workload runs. Returns
//!    the handler's private state for this file. (The gmem handler freezes
//!    the guest memory file here.)
//! 3. `freeze` — the handover moment: returns the bytes that go into the
//!    record for this file (the handler's data), computed from the state that
//!    is now stable.
//! 4. `retrieve` — in the successor: rebuild the file object from the fd
//!    that travelled and the handler's data.
//! 5. `can_finish` / `finish` — the successor is done; the handler lets go
//!    (the gmem handler unfreezes).
//!
//! Failure paths: `unfreeze` undoes `freeze` when the handover is aborted
//! after it (the file stays preserved); `unpreserve` undoes `preserve` when
//! the session is closed before any handover.
//!
//! A handler's data format is its own; it must validate every byte in
//! `retrieve` (the data crossed a process boundary) and refuse bad data with
//! an errno, never panic.

use std::any::Any;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::io::Errno;

use crate::error::{ErrnoName, LuError};
use crate::names::{Compatible, Token};

/// A handler's private state for one preserved file (what upstream keeps in
/// `private_data`); created by `preserve`, handed back to every later call.
pub type PreservedState = Box<dyn Any + Send>;

/// A file handler's error: an errno (passed through to the caller unchanged)
/// and a message for a human.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({})", ErrnoName(*errno))]
pub struct HandlerError {
    errno: i32,
    message: String,
}

impl HandlerError {
    /// An error with `errno` and a message.
    pub fn new(errno: i32, message: impl Into<String>) -> HandlerError {
        HandlerError {
            errno,
            message: message.into(),
        }
    }

    /// A failed system call.
    pub fn system(operation: &str, errno: Errno) -> HandlerError {
        HandlerError::new(errno.raw_os_error(), format!("{operation} failed: {errno}"))
    }

    /// The errno.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// What a handler's `retrieve` rebuilds: an object owning the file (the
/// memfd handler's [`crate::handlers::memfd::MemfdFile`], the gmem
/// handler's guest memory file).
pub trait RetrievedObject: Any + Send + Sync + fmt::Debug {
    /// The file.
    fn as_fd(&self) -> BorrowedFd<'_>;
}

/// A file retrieved from an incoming session. Cloning it is cheap; every
/// clone, and every later retrieve of the same token, is the same object.
#[derive(Clone, Debug)]
pub struct RetrievedFile {
    token: Token,
    compatible: Compatible,
    object: Arc<dyn RetrievedObject>,
}

impl RetrievedFile {
    pub(crate) fn new(
        token: Token,
        compatible: Compatible,
        object: Arc<dyn RetrievedObject>,
    ) -> RetrievedFile {
        RetrievedFile {
            token,
            compatible,
            object,
        }
    }

    /// The token it was preserved under.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The handler that retrieved it.
    pub fn compatible(&self) -> &Compatible {
        &self.compatible
    }

    /// The handler's object.
    pub fn object(&self) -> &Arc<dyn RetrievedObject> {
        &self.object
    }

    /// The handler's object as its concrete type, if it is a `T`.
    pub fn downcast<T: RetrievedObject>(&self) -> Option<Arc<T>> {
        let any: Arc<dyn Any + Send + Sync> = self.object.clone();
        any.downcast::<T>().ok()
    }

    /// Whether `self` and `other` are the same retrieved object.
    pub fn same_object(&self, other: &RetrievedFile) -> bool {
        Arc::ptr_eq(&self.object, &other.object)
    }
}

impl AsFd for RetrievedFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.object.as_fd()
    }
}

/// A file handler (upstream's `struct liveupdate_file_handler` with its
/// `liveupdate_file_ops`). See the module documentation for the lifecycle.
pub trait FileHandler: Send + Sync {
    /// The handler's compatible string and data version.
    fn compatible(&self) -> &Compatible;

    /// Whether this handler can preserve `file`. Must be cheap and must not
    /// change anything.
    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool;

    /// Starts preserving `file`.
    ///
    /// # Errors
    /// Any errno; the orchestrator passes it through and rolls back.
    fn preserve(&self, file: BorrowedFd<'_>) -> Result<PreservedState, HandlerError>;

    /// Stops preserving `file` (its session was closed before a handover).
    fn unpreserve(&self, file: BorrowedFd<'_>, state: PreservedState);

    /// The handover moment: returns this file's data for the record.
    ///
    /// # Errors
    /// Any errno; the orchestrator unfreezes the files frozen before this
    /// one and aborts the handover.
    fn freeze(
        &self,
        file: BorrowedFd<'_>,
        state: &mut PreservedState,
    ) -> Result<Vec<u8>, HandlerError>;

    /// Undoes `freeze`: the handover was aborted; the file stays preserved.
    fn unfreeze(&self, file: BorrowedFd<'_>, state: &mut PreservedState);

    /// Rebuilds the file in the successor from the fd that travelled and the
    /// data `freeze` returned.
    ///
    /// # Errors
    /// Any errno; the orchestrator keeps it and returns it to every later
    /// retrieve of this file (sticky).
    fn retrieve(
        &self,
        file: OwnedFd,
        data: &[u8],
    ) -> Result<Arc<dyn RetrievedObject>, HandlerError>;

    /// Whether the file may be finished now. `retrieved` is `None` for a
    /// file that was never retrieved.
    fn can_finish(&self, retrieved: Option<&Arc<dyn RetrievedObject>>, data: &[u8]) -> bool;

    /// The successor is done with the file: let go of it. `retrieved` is
    /// `None` for a file that was never retrieved (it is being released).
    fn finish(&self, retrieved: Option<&Arc<dyn RetrievedObject>>, data: &[u8]);
}

/// The registered handlers, in registration order, keyed by compatible
/// string.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: Vec<Arc<dyn FileHandler>>,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_list()
            .entries(self.handlers.iter().map(|handler| handler.compatible()))
            .finish()
    }
}

impl HandlerRegistry {
    /// A registry without handlers.
    pub fn new() -> HandlerRegistry {
        HandlerRegistry::default()
    }

    /// A registry with the handlers this crate ships: guest memory files
    /// first (a memfd-backed guest memory file is also a memfd, and must be
    /// preserved as guest memory), then memfds.
    pub fn with_builtin_handlers() -> HandlerRegistry {
        let mut registry = HandlerRegistry::new();
        // Two different compatible strings into an empty registry: these
        // registrations cannot clash.
        let _ = registry.register(Arc::new(crate::handlers::gmem::GmemHandler::new()));
        let _ = registry.register(Arc::new(crate::handlers::memfd::MemfdHandler::new()));
        registry
    }

    /// Adds a handler after those registered before.
    ///
    /// # Errors
    /// - `EEXIST` ([`LuError::HandlerExists`]): a handler with the same
    ///   compatible string (any version) is registered.
    pub fn register(&mut self, handler: Arc<dyn FileHandler>) -> Result<(), LuError> {
        let name = handler.compatible().name();
        if self.by_compatible(name).is_some() {
            return Err(LuError::HandlerExists {
                compatible: name.to_owned(),
            });
        }
        self.handlers.push(handler);
        Ok(())
    }

    /// The first handler, in registration order, that can preserve `file`.
    pub fn find_for(&self, file: BorrowedFd<'_>) -> Option<&Arc<dyn FileHandler>> {
        self.handlers
            .iter()
            .find(|handler| handler.can_preserve(file))
    }

    /// The handler registered under compatible string `name`.
    pub fn by_compatible(&self, name: &str) -> Option<&Arc<dyn FileHandler>> {
        self.handlers
            .iter()
            .find(|handler| handler.compatible().name() == name)
    }

    /// The registered handlers' identities, in registration order.
    pub fn compatibles(&self) -> Vec<Compatible> {
        self.handlers
            .iter()
            .map(|handler| handler.compatible().clone())
            .collect()
    }
}
