//! The progress display of `gmemctl bench` on stderr: which step of how
//! many is running, what it measures, and the time so far. On a terminal it
//! rewrites one line; otherwise (a log, a test) it prints one line per step.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Counts steps and shows the current one.
pub struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
}

impl Progress {
    /// A display for `total` steps.
    pub fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Announces the next step.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        let line = format!(
            "[{:>3}/{} {}] {what}",
            self.done,
            self.total,
            clock(self.started.elapsed())
        );
        let mut stderr = std::io::stderr().lock();
        // A progress line that cannot be written is not worth failing for.
        let _ = if self.terminal {
            write!(stderr, "\r\x1b[K{line}")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }

    /// Prints a note on its own line (a skipped figure, say).
    pub fn note(&self, text: &str) {
        let mut stderr = std::io::stderr().lock();
        let _ = if self.terminal {
            writeln!(stderr, "\r\x1b[K{text}")
        } else {
            writeln!(stderr, "{text}")
        };
    }

    /// Ends the display with the total time.
    pub fn finish(&self) {
        let elapsed = clock(self.started.elapsed());
        self.note(&format!("measured in {elapsed}"));
    }
}

/// `1m05s` or `12.3s`.
fn clock(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    if seconds >= 60.0 {
        format!("{}m{:02}s", elapsed.as_secs() / 60, elapsed.as_secs() % 60)
    } else {
        format!("{seconds:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_shows_minutes_from_one_minute_on() {
        assert_eq!(clock(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(clock(Duration::from_secs(65)), "1m05s");
    }
}
