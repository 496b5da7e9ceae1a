//! The control channel between a controller (`gmemctl demo`) and the VMM
//! processes it drives.
//!
//! Model: the controller listens on a Unix stream socket; every VMM process
//! (the first one and each successor) connects on its own and introduces
//! itself with [`Event::Hello`]. Both directions carry one JSON object per
//! line. The controller sends [`Command`]s to the VMM that runs the guest
//! now; VMMs send [`Event`]s. A VMM that loses its controller (EOF) stops
//! its guest and exits: nobody would ever update or finish it.
//!
//! The channel is for orchestration and measurement only: nothing the live
//! update needs travels on it (that is the `liveupdate` crate's business).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::report::{FinalReport, NewSide, OldSide, Progress};
use super::{Mode, UpdateRequest};

/// What the controller asks of the VMM that runs the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Live-update into a successor.
    Update(UpdateRequest),
    /// Say which of these pages (file page indices) are missing from the
    /// guest memory file ([`Event::Present`]): the controller checks that
    /// every fault parked in an update's old process was served.
    CheckPresent {
        /// The pages.
        pages: Vec<u64>,
    },
    /// Ask the guest for its final self-check, check every page from the
    /// host, report ([`Event::Final`]) and exit.
    Finish,
}

/// What a VMM process tells the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A VMM process connected.
    Hello {
        /// Its generation: 0 for the first, n + 1 for the successor of n.
        generation: u32,
        /// The update that started it (0 for the first VMM).
        update: u32,
        /// Its pid.
        pid: u32,
        /// Whether the guest runs in KVM (false: on host threads).
        kvm: bool,
        /// The backend of the guest memory file.
        backend: String,
    },
    /// Counters of the running guest (sent a few times a second).
    Progress(Progress),
    /// The old side of an update is done (its handover call was made).
    OldSide(Box<OldSide>),
    /// The successor resumed the guest, finished the session and measured
    /// the guest's recovery.
    NewSide(Box<NewSide>),
    /// An update failed. `guest_running` says whether the guest still runs
    /// in the process that sends this (the old one, after an abort).
    UpdateFailed {
        /// Which update.
        update: u32,
        /// Its mode.
        mode: Mode,
        /// What failed.
        error: String,
        /// Whether the guest runs on in this process.
        guest_running: bool,
        /// Whether the guest memory file is frozen now (false after an
        /// abort: the session was closed, which unfroze it).
        frozen: bool,
    },
    /// The answer to [`Command::CheckPresent`].
    Present {
        /// Pages asked about.
        checked: u64,
        /// Those missing from the file.
        missing: Vec<u64>,
    },
    /// The final check, after [`Command::Finish`].
    Final(Box<FinalReport>),
    /// The VMM hit an error it cannot recover from and exits.
    Fatal {
        /// The update that started the process (0 for the first VMM).
        update: u32,
        /// What went wrong.
        error: String,
    },
}

/// The VMM's end of the channel.
#[derive(Debug)]
pub struct ControlLink {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

/// What [`ControlLink::poll`] found.
#[derive(Debug)]
pub enum Polled {
    /// A command arrived.
    Command(Command),
    /// Nothing within the timeout.
    Idle,
    /// The controller closed the channel.
    Closed,
}

impl ControlLink {
    /// Connects to the controller at `path` (the socket is close-on-exec,
    /// so an exec'd successor connects anew).
    ///
    /// # Errors
    /// The `connect` error (ENOENT, ECONNREFUSED).
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let writer = UnixStream::connect(path)?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Self {
            writer,
            reader,
            line: String::new(),
        })
    }

    /// Sends one event.
    ///
    /// # Errors
    /// The write error (EPIPE when the controller is gone).
    pub fn send(&mut self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_string(event).map_err(std::io::Error::other)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())
    }

    /// Waits up to `timeout` for a command.
    ///
    /// # Errors
    /// A read error other than the timeout, or a line that is not a command
    /// (EINVAL).
    pub fn poll(&mut self, timeout: Duration) -> std::io::Result<Polled> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        // A partial line stays in `self.line` across timeouts.
        match self.reader.read_line(&mut self.line) {
            Ok(0) => Ok(Polled::Closed),
            Ok(_) if self.line.ends_with('\n') => {
                let command = serde_json::from_str(self.line.trim_end())
                    .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error));
                self.line.clear();
                command.map(Polled::Command)
            }
            Ok(_) => Ok(Polled::Idle),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(Polled::Idle)
            }
            Err(error) => Err(error),
        }
    }
}

/// The controller's end of one VMM's connection: reads events, sends
/// commands.
#[derive(Debug)]
pub struct VmmConnection {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

impl VmmConnection {
    /// Wraps an accepted connection.
    ///
    /// # Errors
    /// The `dup` of the socket failed (EMFILE).
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self {
            writer: stream,
            reader,
            line: String::new(),
        })
    }

    /// Sends a command.
    ///
    /// # Errors
    /// The write error (EPIPE when the VMM is gone).
    pub fn send(&mut self, command: &Command) -> std::io::Result<()> {
        let mut line = serde_json::to_string(command).map_err(std::io::Error::other)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())
    }

    /// Waits up to `timeout` for an event; `Ok(None)` on timeout, an
    /// `UnexpectedEof` error when the VMM closed the connection.
    ///
    /// # Errors
    /// Read errors, EOF, and lines that are not events (EINVAL).
    pub fn receive(&mut self, timeout: Duration) -> std::io::Result<Option<Event>> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.reader.read_line(&mut self.line) {
            Ok(0) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VMM closed its control connection",
            )),
            Ok(_) if self.line.ends_with('\n') => {
                let event = serde_json::from_str(self.line.trim_end())
                    .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error));
                self.line.clear();
                event.map(Some)
            }
            Ok(_) => Ok(None),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_events_cross_the_channel_in_order() {
        let directory = std::env::temp_dir().join(format!("vmm-control-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("control.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut link = ControlLink::connect(&path).unwrap();
        let mut connection = VmmConnection::new(listener.accept().unwrap().0).unwrap();
        assert!(matches!(
            link.poll(Duration::from_millis(5)).unwrap(),
            Polled::Idle
        ));
        let request = UpdateRequest {
            update: 3,
            mode: Mode::Transfer,
            ..UpdateRequest::default()
        };
        connection.send(&Command::Update(request.clone())).unwrap();
        connection.send(&Command::Finish).unwrap();
        match link.poll(Duration::from_secs(1)).unwrap() {
            Polled::Command(Command::Update(got)) => assert_eq!(got, request),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            link.poll(Duration::from_secs(1)).unwrap(),
            Polled::Command(Command::Finish)
        ));
        let hello = Event::Hello {
            generation: 1,
            update: 1,
            pid: 7,
            kvm: true,
            backend: "memfd".into(),
        };
        link.send(&hello).unwrap();
        assert_eq!(
            connection.receive(Duration::from_secs(1)).unwrap(),
            Some(hello)
        );
        drop(link);
        assert_eq!(
            connection
                .receive(Duration::from_secs(1))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        let _ = std::fs::remove_dir_all(&directory);
    }
}
