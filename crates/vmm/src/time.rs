//! Host timestamps that can cross a process boundary.
//!
//! `std::time::Instant` is CLOCK_MONOTONIC on Linux but cannot be sent to
//! another process. A live update measures intervals whose ends lie in two
//! processes (the old one's last vCPU stop, the new one's first vCPU entry),
//! so both sides convert their instants to CLOCK_MONOTONIC nanoseconds,
//! which every process on the host shares.

use std::time::{Duration, Instant};

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (now.tv_sec as u64).wrapping_mul(1_000_000_000) + now.tv_nsec as u64
}

/// `instant` as CLOCK_MONOTONIC nanoseconds (exact to the few nanoseconds
/// between the two clock reads this takes).
pub fn instant_ns(instant: Instant) -> u64 {
    let now_ns = monotonic_ns();
    let now = Instant::now();
    match now.checked_duration_since(instant) {
        Some(ago) => now_ns.saturating_sub(ago.as_nanos() as u64),
        None => now_ns + instant.duration_since(now).as_nanos() as u64,
    }
}

/// The time from `earlier_ns` to `later_ns` (zero if they are reversed).
pub fn between(earlier_ns: u64, later_ns: u64) -> Duration {
    Duration::from_nanos(later_ns.saturating_sub(earlier_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let before = monotonic_ns();
        let instant = Instant::now();
        let after = monotonic_ns();
        let mapped = instant_ns(instant);
        assert!(mapped + 1_000_000 >= before && mapped <= after + 1_000_000);
        assert_eq!(between(10, 5), Duration::ZERO);
        assert_eq!(between(5, 10), Duration::from_nanos(5));
    }
}
