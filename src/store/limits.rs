//! What a write may be, and why one is refused.
//!
//! Owns: [`Limits`] and their defaults, [`StoreError`], [`PEER_HEADROOM`],
//! and the check of a change's figures (a namespace's entries, the bytes
//! held) against the limits.
//! Must not touch: the map (the state passes its figures in), the clock,
//! the lock. The checks of one write's key, value, TTL and batch size are
//! the store's (`Store::check_batch`), which holds the limits.

use super::clock::ClockSkewError;
use super::entry::Meta;
use super::version::Version;

/// Limits that every write, local or remote, is checked against before
/// anything is changed. Each but `max_ttl_secs` is a flag of `podcache
/// serve` (`crate::config` maps the flags onto these fields; the defaults
/// below are the flags' defaults).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest key in bytes.
    pub max_key_bytes: usize,
    /// Longest value in bytes.
    pub max_value_bytes: usize,
    /// Most entries in one batch write.
    pub max_batch_entries: usize,
    /// Remote timestamps further ahead of local wall time than this are
    /// refused (milliseconds here; the flag takes a duration).
    pub max_clock_drift_ms: u64,
    /// Longest TTL a write may ask for, in seconds.
    pub max_ttl_secs: u64,
    /// Most entries holding a value in one type; writes of new keys past it
    /// get 507 (tombstones are not counted).
    pub max_entries_per_type: usize,
    /// Most namespaces (types); a write that would create one past it gets
    /// 507 (a type exists while it holds entries or tombstones).
    pub max_types: usize,
    /// Most bytes of keys and values held in all; writes past it get 507
    /// (nothing is evicted; tombstones count their key).
    pub max_total_bytes: usize,
    /// Superseded versions kept per key for `GET .../history` and
    /// rollback (values and deletions); 0 keeps none, at most 10,000.
    pub history_versions: usize,
    /// Most bytes the kept versions may take in all (keys, values and a
    /// fixed overhead per version); the oldest kept is dropped first.
    pub history_max_bytes: usize,
}

impl Default for Limits {
    /// The one place the defaults are written: 1 KiB keys, 1 MiB values,
    /// 10,000 entries per batch, 60 s of clock drift, ten years of TTL,
    /// 5,000,000 entries per type, 1,024 types, 1 GiB held; 16 versions
    /// of history per key, 64 MiB of history in all.
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            max_batch_entries: 10_000,
            max_clock_drift_ms: 60_000,
            max_ttl_secs: 10 * 365 * 24 * 3600,
            max_entries_per_type: 5_000_000,
            max_types: 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            history_versions: 16,
            history_max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why a write was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key is the empty string.
    #[error("key must not be empty")]
    EmptyKey,
    /// The key is longer than [`Limits::max_key_bytes`].
    #[error("key is {len} bytes, the limit is {limit}")]
    KeyTooLong {
        /// Length of the refused key.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value is longer than [`Limits::max_value_bytes`].
    #[error("value of key {key:?} is {len} bytes, the limit is {limit}")]
    ValueTooLarge {
        /// The key whose value was refused (truncated for display).
        key: String,
        /// Length of the refused value.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A batch holds more entries than [`Limits::max_batch_entries`].
    #[error("batch has {len} entries, the limit is {limit}")]
    BatchTooLarge {
        /// Entries in the refused batch.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A batch holds no entries.
    #[error("batch is empty")]
    EmptyBatch,
    /// The TTL is zero or longer than [`Limits::max_ttl_secs`].
    #[error("ttl must be between 1 and {max} seconds, got {got}")]
    BadTtl {
        /// The refused TTL in seconds.
        got: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A remote version lies too far in the future.
    #[error(transparent)]
    ClockSkew(#[from] ClockSkewError),
    /// An entry from a peer or a file names an author, origin or reason
    /// longer than [`Meta::MAX_FIELD_BYTES`].
    #[error(
        "an entry's author, origin or reason is longer than {} bytes",
        Meta::MAX_FIELD_BYTES
    )]
    MetaTooLong,
    /// Storing the write would pass [`Limits::max_entries_per_type`] or
    /// [`Limits::max_total_bytes`]. Nothing is evicted to make room.
    #[error("store is full: {what} would be {would_be}, the limit is {limit}")]
    Full {
        /// What would pass its limit, e.g. `entries of type 7`.
        what: String,
        /// The figure the write would reach.
        would_be: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A conditional write's expectation of a key does not hold: nothing
    /// of the change was applied.
    #[error("precondition failed: key {key:?} is {}", describe_current(*.current))]
    Precondition {
        /// The first key whose expectation failed (truncated for display).
        key: String,
        /// The version the key holds now (`None`: absent, deleted or
        /// expired).
        current: Option<Version>,
    },
}

fn describe_current(current: Option<Version>) -> String {
    match current {
        Some(version) => format!("at version {version}"),
        None => "absent".to_owned(),
    }
}

/// How far past its own limits a store still takes records from peers: a
/// write one replica accepted must not be refused by the others over writes
/// in flight, but a peer cannot make a replica grow without bound either.
pub const PEER_HEADROOM: usize = 2;

/// Refuses a change that takes a namespace's entries (`values`) or the
/// bytes held from `now` to `after` past the limits times `headroom`. A
/// change that does not grow a figure already past its limit is let
/// through (limits lowered by a restart must not block deletes).
pub(super) fn room_for(
    ty: i32,
    now: (usize, usize),
    after: (usize, usize),
    limits: &Limits,
    headroom: usize,
) -> Result<(), StoreError> {
    let (values, bytes) = after;
    let entry_limit = limits.max_entries_per_type.saturating_mul(headroom);
    if values > entry_limit && values > now.0 {
        return Err(StoreError::Full {
            what: format!("entries of type {ty}"),
            would_be: values,
            limit: entry_limit,
        });
    }
    let byte_limit = limits.max_total_bytes.saturating_mul(headroom);
    if bytes > byte_limit && bytes > now.1 {
        return Err(StoreError::Full {
            what: "bytes held".into(),
            would_be: bytes,
            limit: byte_limit,
        });
    }
    Ok(())
}
