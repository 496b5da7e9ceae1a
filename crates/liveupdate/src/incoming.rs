//! Incoming sessions: what a successor receives (upstream `luo_session.c`
//! and `luo_file.c`, new-kernel side).
//!
//! Model: an [`Incoming`] is built from a validated record and the fds that
//! travelled with it. Each session can be retrieved once; each file of a
//! retrieved session is rebuilt by its handler on first retrieve; `finish`
//! ends the session's life under LUO.
//!
//! Success path:
//! 1. [`Incoming::from_parts`]: the record is full, one fd per file, each fd
//!    is the file (device, inode) the record names, every handler is
//!    registered with the record's version.
//! 2. [`Incoming::retrieve_session`] by name, once.
//! 3. [`IncomingSession::retrieve`] by token, in any order: the handler's
//!    `retrieve` runs once; later calls return the same object.
//! 4. [`IncomingSession::finish`]: every handler's `can_finish` first, then
//!    `finish` in reverse order; files never retrieved are released (and
//!    logged as a warning naming their token).
//!
//! Failure paths:
//! 1. Unknown session name → `ENOENT`; second retrieval → `EINVAL`.
//! 2. Unknown token → `ENOENT`; a failed retrieve's errno is sticky: later
//!    retrieves return it without calling the handler again.
//! 3. A `can_finish` refusal → `EBUSY`, nothing finished, the session stays
//!    as it was.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::error::LuError;
use crate::fdio;
use crate::handler::{FileHandler, HandlerRegistry, RetrievedFile, RetrievedObject};
use crate::names::{Compatible, FileIdentity, SessionName, Token};
use crate::record::{Record, RecordError, RecordKind};

/// Sessions received from a predecessor (upstream's incoming session list).
#[derive(Debug)]
pub struct Incoming {
    slots: Vec<Slot>,
}

#[derive(Debug)]
enum Slot {
    Available(IncomingSession),
    Retrieved(SessionName),
}

impl Slot {
    fn name(&self) -> &SessionName {
        match self {
            Slot::Available(session) => &session.name,
            Slot::Retrieved(name) => name,
        }
    }
}

/// One retrieved incoming session.
pub struct IncomingSession {
    name: SessionName,
    files: Vec<IncomingFile>,
    finished: bool,
}

impl std::fmt::Debug for IncomingSession {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("IncomingSession")
            .field("name", &self.name)
            .field("files", &self.files.len())
            .field("finished", &self.finished)
            .finish()
    }
}

struct IncomingFile {
    token: Token,
    compatible: Compatible,
    handler: Arc<dyn FileHandler>,
    fd: OwnedFd,
    data: Vec<u8>,
    status: RetrieveStatus,
}

enum RetrieveStatus {
    NotYet,
    Retrieved(RetrievedFile),
    Failed { errno: i32, message: String },
}

impl Incoming {
    /// Decodes `bytes` and builds the incoming sessions; see
    /// [`Incoming::from_parts`].
    ///
    /// # Errors
    /// A [`RecordError`] for a bad record, then those of
    /// [`Incoming::from_parts`].
    pub fn decode(
        registry: &HandlerRegistry,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Incoming, LuError> {
        Incoming::from_parts(registry, Record::decode(bytes)?, fds)
    }

    /// Builds the incoming sessions of `record`; `fds[i]` is file `i`.
    ///
    /// # Errors
    /// - `EINVAL` ([`RecordError::WrongKind`]): a delta record;
    /// - `EINVAL` ([`LuError::FdCountMismatch`]): not one fd per file;
    /// - `EINVAL` ([`LuError::FdMismatch`]): an fd is another file than the
    ///   record names;
    /// - `ENOENT` ([`LuError::UnknownHandler`]): a file's handler is not
    ///   registered (as upstream's deserialization fails);
    /// - `EOPNOTSUPP` ([`LuError::HandlerVersion`]): registered with another
    ///   data version.
    pub fn from_parts(
        registry: &HandlerRegistry,
        record: Record,
        fds: Vec<OwnedFd>,
    ) -> Result<Incoming, LuError> {
        if record.kind != RecordKind::Full {
            return Err(RecordError::WrongKind { expected: "full" }.into());
        }
        check_fds(&record, &fds)?;
        let mut fds = fds.into_iter();
        let mut slots = Vec::with_capacity(record.sessions.len());
        for session in record.sessions {
            let mut files = Vec::with_capacity(session.files.len());
            for file in session.files {
                let handler = find_handler(registry, &file.compatible, file.token)?;
                let Some(fd) = fds.next() else {
                    return Err(LuError::FdCountMismatch {
                        expected: files.len() + 1,
                        received: 0,
                    });
                };
                files.push(IncomingFile {
                    token: file.token,
                    compatible: file.compatible,
                    handler,
                    fd,
                    data: file.data,
                    status: RetrieveStatus::NotYet,
                });
            }
            slots.push(Slot::Available(IncomingSession {
                name: session.name,
                files,
                finished: false,
            }));
        }
        Ok(Incoming { slots })
    }

    /// Retrieves every file of every session not yet taken
    /// ([`IncomingSession::retrieve`] for each token, in record order), so
    /// that each handler rebuilds and checks its object now; the sessions
    /// stay available, and a later retrieve of a file returns the object
    /// built here. A transfer successor does this before it answers the
    /// switch, while the old process still owns the guest.
    ///
    /// # Errors
    /// The first file's retrieve error ([`LuError::Handler`], or `Io`);
    /// the files after it are not tried. The error is sticky for that file,
    /// as every failed retrieve is.
    pub fn retrieve_all(&mut self) -> Result<(), LuError> {
        for slot in &mut self.slots {
            if let Slot::Available(session) = slot {
                session.retrieve_all()?;
            }
        }
        Ok(())
    }

    /// Names of all incoming sessions, retrieved or not, in record order.
    pub fn session_names(&self) -> Vec<SessionName> {
        self.slots.iter().map(|slot| slot.name().clone()).collect()
    }

    /// Takes the incoming session called `name`.
    ///
    /// # Errors
    /// - `ENOENT` ([`LuError::UnknownSession`]): no such session;
    /// - `EINVAL` ([`LuError::SessionAlreadyRetrieved`]): retrieved before.
    pub fn retrieve_session(&mut self, name: &str) -> Result<IncomingSession, LuError> {
        let slot = self
            .slots
            .iter_mut()
            .find(|slot| slot.name().as_str() == name)
            .ok_or_else(|| LuError::UnknownSession {
                name: name.to_owned(),
            })?;
        match std::mem::replace(slot, Slot::Retrieved(slot.name().clone())) {
            Slot::Available(session) => {
                tracing::info!(session = %session.name, files = session.files.len(), "retrieved incoming session");
                Ok(session)
            }
            Slot::Retrieved(name) => Err(LuError::SessionAlreadyRetrieved { name }),
        }
    }
}

/// Checks that `fds` are the record's files: one per file, each the file
/// (device, inode) the record names.
///
/// # Errors
/// - `EINVAL` ([`LuError::FdCountMismatch`], [`LuError::FdMismatch`]);
/// - `Io`: `fstat` failed.
pub fn check_fds(record: &Record, fds: &[OwnedFd]) -> Result<(), LuError> {
    if fds.len() != record.file_count() {
        return Err(LuError::FdCountMismatch {
            expected: record.file_count(),
            received: fds.len(),
        });
    }
    for (index, ((_, file), fd)) in record.files().zip(fds).enumerate() {
        let actual = FileIdentity::of(fd).map_err(|errno| LuError::io("fstat", errno))?;
        if actual != file.identity {
            return Err(LuError::FdMismatch {
                index,
                expected: file.identity,
                actual,
            });
        }
    }
    Ok(())
}

fn find_handler(
    registry: &HandlerRegistry,
    compatible: &Compatible,
    token: Token,
) -> Result<Arc<dyn FileHandler>, LuError> {
    let handler =
        registry
            .by_compatible(compatible.name())
            .ok_or_else(|| LuError::UnknownHandler {
                compatible: compatible.name().to_owned(),
                token,
            })?;
    let handler_version = handler.compatible().version();
    if handler_version != compatible.version() {
        return Err(LuError::HandlerVersion {
            compatible: compatible.name().to_owned(),
            record_version: compatible.version(),
            handler_version,
        });
    }
    Ok(handler.clone())
}

impl IncomingSession {
    /// The session's name.
    pub fn name(&self) -> &SessionName {
        &self.name
    }

    /// The tokens of its files, in preservation order.
    pub fn tokens(&self) -> Vec<Token> {
        self.files.iter().map(|file| file.token).collect()
    }

    /// Retrieves the file preserved under `token`.
    ///
    /// # Errors
    /// - `ENOENT` ([`LuError::UnknownToken`]): no such token (or the session
    ///   was finished);
    /// - the handler's `retrieve` error ([`LuError::Handler`]) the first
    ///   time, and the same errno ([`LuError::RetrieveFailed`]) on every
    ///   later try (sticky);
    /// - `Io`: duplicating the fd for the handler failed (not sticky).
    pub fn retrieve(&mut self, token: Token) -> Result<RetrievedFile, LuError> {
        let session = self.name.clone();
        let file = self
            .files
            .iter_mut()
            .find(|file| file.token == token)
            .ok_or_else(|| LuError::UnknownToken {
                session: session.clone(),
                token,
            })?;
        match &file.status {
            RetrieveStatus::Retrieved(retrieved) => return Ok(retrieved.clone()),
            RetrieveStatus::Failed { errno, message } => {
                return Err(LuError::RetrieveFailed {
                    session,
                    token,
                    errno: *errno,
                    message: message.clone(),
                });
            }
            RetrieveStatus::NotYet => {}
        }
        // The handler owns what it rebuilds; we keep the original fd until
        // finish so that a failed retrieve cannot lose the file.
        let duplicate = fdio::duplicate_fd_number(file.fd.as_raw_fd())
            .map_err(|errno| LuError::io("duplicating an incoming fd", errno))?;
        match file.handler.retrieve(duplicate, &file.data) {
            Ok(object) => {
                let retrieved = RetrievedFile::new(token, file.compatible.clone(), object);
                file.status = RetrieveStatus::Retrieved(retrieved.clone());
                tracing::info!(%session, %token, handler = %file.compatible, "retrieved file");
                Ok(retrieved)
            }
            Err(source) => {
                file.status = RetrieveStatus::Failed {
                    errno: source.errno(),
                    message: source.message().to_owned(),
                };
                tracing::warn!(%session, %token, error = %source, "retrieve failed; the error is sticky");
                Err(LuError::Handler {
                    operation: "retrieve",
                    compatible: file.compatible.name().to_owned(),
                    token,
                    source,
                })
            }
        }
    }

    /// Retrieves every file of the session, in preservation order; see
    /// [`IncomingSession::retrieve`].
    ///
    /// # Errors
    /// The first failing file's error, as [`IncomingSession::retrieve`]
    /// returns it; the files after it are not tried.
    pub fn retrieve_all(&mut self) -> Result<(), LuError> {
        for token in self.tokens() {
            self.retrieve(token)?;
        }
        Ok(())
    }

    /// Ends the session: all-or-nothing.
    ///
    /// # Errors
    /// - `EBUSY` ([`LuError::FinishRefused`]): a handler's `can_finish`
    ///   refused; nothing was finished and the session is unchanged.
    pub fn finish(&mut self) -> Result<(), LuError> {
        for file in &self.files {
            if !file.handler.can_finish(file.retrieved_object(), &file.data) {
                return Err(LuError::FinishRefused {
                    session: self.name.clone(),
                    token: file.token,
                });
            }
        }
        while let Some(file) = self.files.pop() {
            if file.retrieved_object().is_none() {
                tracing::warn!(
                    session = %self.name,
                    token = %file.token,
                    handler = %file.compatible,
                    "file was never retrieved; releasing it (its contents are lost)"
                );
            }
            file.handler.finish(file.retrieved_object(), &file.data);
        }
        self.finished = true;
        tracing::info!(session = %self.name, "finished incoming session");
        Ok(())
    }

    /// Whether [`IncomingSession::finish`] succeeded.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl IncomingFile {
    fn retrieved_object(&self) -> Option<&Arc<dyn RetrievedObject>> {
        match &self.status {
            RetrieveStatus::Retrieved(retrieved) => Some(retrieved.object()),
            _ => None,
        }
    }
}

impl Drop for IncomingSession {
    fn drop(&mut self) {
        if !self.finished && !self.files.is_empty() {
            tracing::warn!(
                session = %self.name,
                files = self.files.len(),
                "incoming session dropped without finish; its files are released"
            );
        }
    }
}
