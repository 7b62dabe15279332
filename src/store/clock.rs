//! The hybrid logical clock that orders every write the same way on every
//! node.
//!
//! A timestamp is one `u64`: physical Unix milliseconds in the high 48 bits
//! and a logical counter in the low 16. Ticking takes the larger of "last + 1"
//! and "now << 16", so the clock never goes backwards, stays close to wall
//! time, and absorbs remote timestamps by the same rule. Owns no I/O: the
//! caller passes the current wall time in.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a timestamp given to the logical counter.
const LOGICAL_BITS: u32 = 16;

/// Builds a timestamp from wall milliseconds (logical part zero).
pub fn hlc_from_ms(ms: u64) -> u64 {
    ms << LOGICAL_BITS
}

/// The wall-clock milliseconds part of a timestamp.
pub fn hlc_ms(hlc: u64) -> u64 {
    hlc >> LOGICAL_BITS
}

/// The logical counter part of a timestamp.
pub fn hlc_logical(hlc: u64) -> u64 {
    hlc & ((1 << LOGICAL_BITS) - 1)
}

/// A remote timestamp the clock refused to absorb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("remote timestamp is {ahead_ms} ms ahead of local wall time (limit {limit_ms} ms)")]
pub struct ClockSkewError {
    /// How far ahead of the local wall clock the remote timestamp was.
    pub ahead_ms: u64,
    /// The configured limit it exceeded.
    pub limit_ms: u64,
}

/// A hybrid logical clock, shared by all writers of one node.
#[derive(Debug)]
pub struct HybridClock {
    /// The largest timestamp handed out or absorbed so far. Every new local
    /// timestamp is strictly larger, which is what makes versions unique per
    /// node.
    last: AtomicU64,
    /// Remote timestamps further ahead of local wall time than this are
    /// refused, so one node with a bad clock cannot drag everyone's clock
    /// (and freeze a key) far into the future.
    max_drift_ms: u64,
}

impl HybridClock {
    /// A clock that refuses remote timestamps more than `max_drift_ms`
    /// ahead of local wall time.
    pub fn new(max_drift_ms: u64) -> Self {
        Self {
            last: AtomicU64::new(0),
            max_drift_ms,
        }
    }

    /// A new timestamp, strictly greater than every earlier one.
    pub fn tick(&self, now_ms: u64) -> u64 {
        let floor = hlc_from_ms(now_ms);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = floor.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    /// Absorbs a timestamp seen from a peer, so later local writes order
    /// after it. Refuses timestamps too far ahead of `now_ms`.
    pub fn observe(&self, remote: u64, now_ms: u64) -> Result<(), ClockSkewError> {
        self.check(remote, now_ms)?;
        self.last.fetch_max(remote, Ordering::AcqRel);
        Ok(())
    }

    /// Checks a remote timestamp against the drift limit without absorbing it.
    pub fn check(&self, remote: u64, now_ms: u64) -> Result<(), ClockSkewError> {
        let remote_ms = hlc_ms(remote);
        let limit = now_ms.saturating_add(self.max_drift_ms);
        if remote_ms > limit {
            return Err(ClockSkewError {
                ahead_ms: remote_ms - now_ms,
                limit_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// The largest timestamp seen so far.
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing_even_when_wall_time_goes_back() {
        let clock = HybridClock::new(60_000);
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(900); // wall clock stepped back
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(hlc_ms(c), 1_000);
        assert_eq!(hlc_logical(c), 2);
        let d = clock.tick(2_000);
        assert_eq!(d, hlc_from_ms(2_000));
    }

    #[test]
    fn observing_a_remote_timestamp_orders_later_ticks_after_it() {
        let clock = HybridClock::new(60_000);
        let remote = hlc_from_ms(5_000) + 7;
        clock.observe(remote, 4_000).expect("within drift");
        assert!(clock.tick(4_000) > remote);
    }

    #[test]
    fn a_timestamp_too_far_ahead_is_refused_and_not_absorbed() {
        let clock = HybridClock::new(60_000);
        let err = clock
            .observe(hlc_from_ms(1_000 + 60_001), 1_000)
            .expect_err("too far ahead");
        assert_eq!(err.ahead_ms, 60_001);
        assert!(clock.tick(1_000) < hlc_from_ms(2_000));
    }
}
