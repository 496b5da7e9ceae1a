//! Giving the huge page pool back when `gmemctl bench` is interrupted.
//!
//! The hugetlb figures raise the 2 MiB pool for each guest size and lower it
//! again when the size's reservation drops. A Ctrl-C (SIGINT), a `kill`
//! (SIGTERM) or a closed terminal (SIGHUP) ends the process without
//! dropping anything, which would leave the machine with gigabytes locked
//! in the pool. While the measurements run, those signals go to a handler
//! that gives back what the live reservations added
//! (`gmem::hugetlb::give_back_on_termination`, async-signal-safe) and then
//! ends the process by the same signal, with its default action, so the
//! exit status still says what ended it.

use std::io;

/// The signals that end the process and are handled while measuring.
const ENDING_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Installs the handler for [`ENDING_SIGNALS`] for the rest of the process.
///
/// Errors: sigaction's (EINVAL), which cannot happen for these signals.
pub fn give_back_huge_pages_when_ended() -> io::Result<()> {
    for signal in ENDING_SIGNALS {
        // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty
        // mask, no flags), completed below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = end_by_signal as *const () as libc::sighandler_t;
        // SAFETY: `action` is a live sigaction; the handler is an `extern
        // "C"` function taking the signal number; no former action wanted.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives the pool back, then ends the process by `signal` itself.
extern "C" fn end_by_signal(signal: libc::c_int) {
    gmem::hugetlb::give_back_on_termination();
    // SAFETY: signal(2) and raise(3) are async-signal-safe. The signal is
    // blocked while this handler runs, so the raised one is delivered, with
    // the default action (the process ends), when the handler returns.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}
