//! What a live update costs the guest: its own view of the blackout and the
//! time it needs to run at full speed again.
//!
//! The guest appends (TSC, iterations) to a per-vCPU trace ring every 2^n
//! iterations. [`TraceCollector`] polls those rings from the host while the
//! guest runs and keeps the entries in order. [`recovery`] compares the
//! loop rate just before the update with the rate after it: the recovery
//! time is how long after the resume the guest first runs a whole window at
//! 90% or more of its former rate.

use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use crate::error::Result;
use crate::guest::{TraceEntry, offsets};
use crate::layout::{GuestLayout, TRACE_CAPACITY, TRACE_ENTRY_BYTES, read_object};

/// Entries this close to being overwritten are not read: the guest may be
/// rewriting them while the host reads.
const OVERWRITE_MARGIN: u64 = 64;

/// Collects every vCPU's trace entries from the guest's rings.
#[derive(Debug, Default)]
pub struct TraceCollector {
    entries: Vec<Vec<TraceEntry>>,
    next: Vec<u64>,
    lost: u64,
}

impl TraceCollector {
    /// A collector for `vcpus` vCPUs, starting with whatever the rings hold.
    pub fn new(vcpus: u32) -> Self {
        Self {
            entries: vec![Vec::new(); vcpus as usize],
            next: vec![0; vcpus as usize],
            lost: 0,
        }
    }

    /// Reads the entries appended since the last poll. Poll at least every
    /// `TRACE_CAPACITY - 64` entries (about a second at full speed) or
    /// entries are lost (counted in [`Self::lost`]).
    ///
    /// # Errors
    /// - [`crate::VmmError::GuestMemory`] (EFAULT): the memory is smaller than the layout.
    pub fn poll(&mut self, memory: &GuestMemoryMmap, layout: &GuestLayout) -> Result<()> {
        for (vcpu, (entries, next)) in
            (0u32..).zip(self.entries.iter_mut().zip(self.next.iter_mut()))
        {
            let head: u64 = read_object(memory, layout.control_block(vcpu) + offsets::TRACE_NEXT)?;
            let oldest_safe = head.saturating_sub(TRACE_CAPACITY - OVERWRITE_MARGIN);
            if *next < oldest_safe {
                self.lost += oldest_safe - *next;
                *next = oldest_safe;
            }
            for sequence in *next..head {
                let address =
                    layout.trace_ring(vcpu) + (sequence % TRACE_CAPACITY) * TRACE_ENTRY_BYTES;
                let [tsc, iterations] = read_object::<[u64; 2]>(memory, address)?;
                entries.push(TraceEntry { tsc, iterations });
            }
            *next = head.max(*next);
        }
        Ok(())
    }

    /// Per vCPU, the entries collected, oldest first.
    pub fn entries(&self) -> &[Vec<TraceEntry>] {
        &self.entries
    }

    /// Entries overwritten before they could be read.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

/// One vCPU's recovery after an update.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    /// Loop iterations per second before the update.
    pub rate_before: f64,
    /// Time from the resume until the first window at 90% of `rate_before`
    /// began (None: not within the trace).
    pub recovery: Option<Duration>,
}

/// Computes one vCPU's recovery from its trace.
///
/// `stop_tsc` is the TSC of the guest's last iteration before the stop and
/// `resume_tsc` that of its first after the resume (stop + the probed gap);
/// the rate before is taken over `before` ending at the stop, the rate after
/// over windows of `window`.
pub fn recovery(
    entries: &[TraceEntry],
    stop_tsc: u64,
    resume_tsc: u64,
    tsc_khz: u32,
    before: Duration,
    window: Duration,
) -> Recovery {
    let ticks = |duration: Duration| duration.as_micros() as u64 * u64::from(tsc_khz) / 1000;
    let rate = |first: &TraceEntry, last: &TraceEntry| {
        let elapsed = last.tsc.saturating_sub(first.tsc);
        if elapsed == 0 {
            return 0.0;
        }
        (last.iterations.saturating_sub(first.iterations)) as f64 * f64::from(tsc_khz) * 1000.0
            / elapsed as f64
    };
    let pre: Vec<&TraceEntry> = entries
        .iter()
        .filter(|entry| {
            entry.tsc <= stop_tsc && entry.tsc >= stop_tsc.saturating_sub(ticks(before))
        })
        .collect();
    let rate_before = match (pre.first(), pre.last()) {
        (Some(first), Some(last)) => rate(first, last),
        _ => 0.0,
    };
    let post: Vec<&TraceEntry> = entries
        .iter()
        .filter(|entry| entry.tsc >= resume_tsc)
        .collect();
    let window_ticks = ticks(window);
    let mut found = None;
    for (start_index, start) in post.iter().enumerate() {
        let Some(end) = post[start_index..]
            .iter()
            .find(|entry| entry.tsc >= start.tsc + window_ticks)
        else {
            break;
        };
        if rate_before > 0.0 && rate(start, end) >= 0.9 * rate_before {
            let ticks_after = start.tsc - resume_tsc;
            found = Some(Duration::from_micros(
                ticks_after * 1000 / u64::from(tsc_khz.max(1)),
            ));
            break;
        }
    }
    Recovery {
        rate_before,
        recovery: found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace at `rate` iterations per ms from `start` to `end` (ms), one
    /// entry per 0.1 ms, at 1 MHz TSC (1000 ticks per ms).
    fn trace(from_ms: u64, to_ms: u64, per_ms: impl Fn(u64) -> u64) -> Vec<TraceEntry> {
        let mut iterations = 0;
        let mut entries = Vec::new();
        for tenth in from_ms * 10..to_ms * 10 {
            entries.push(TraceEntry {
                tsc: tenth * 100,
                iterations,
            });
            iterations += per_ms(tenth / 10) / 10;
        }
        entries
    }

    #[test]
    fn immediate_recovery_is_zero_and_slow_recovery_is_measured() {
        // 1000 iterations/ms until 100 ms, blackout 100..105 ms, then 100/ms
        // for 20 ms, then full speed again.
        let entries: Vec<TraceEntry> = trace(0, 200, |ms| match ms {
            0..100 => 1000,
            100..105 => 0,
            105..125 => 100,
            _ => 1000,
        })
        .into_iter()
        .filter(|entry| !(100_000..105_000).contains(&entry.tsc))
        .collect();
        let result = recovery(
            &entries,
            99_900,
            105_000,
            1000,
            Duration::from_millis(50),
            Duration::from_millis(5),
        );
        assert!((result.rate_before - 1_000_000.0).abs() < 1.0, "{result:?}");
        let recovered = result.recovery.unwrap();
        assert!(
            recovered >= Duration::from_millis(19) && recovered <= Duration::from_millis(21),
            "{recovered:?}"
        );

        let fast = trace(0, 200, |_| 1000);
        let result = recovery(
            &fast,
            99_900,
            100_000,
            1000,
            Duration::from_millis(50),
            Duration::from_millis(5),
        );
        assert_eq!(result.recovery, Some(Duration::ZERO));
    }

    #[test]
    fn never_recovering_within_the_trace_is_none() {
        let entries = trace(0, 200, |ms| if ms < 100 { 1000 } else { 10 });
        let result = recovery(
            &entries,
            99_900,
            100_000,
            1000,
            Duration::from_millis(50),
            Duration::from_millis(5),
        );
        assert_eq!(result.recovery, None);
    }
}
