//! Records: an entry with its address.
//!
//! Owns: [`Record`], what travels between nodes (fan-out, snapshot, merge)
//! and what a change notification carries.
//! Must not touch: the map, the limits, the merge rule: a record is data,
//! and the state decides what it replaces.

use super::entry::Entry;
use super::version::Version;

/// A full versioned entry with its address: what travels between nodes
/// (fan-out, snapshot, merge) and what a change notification carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Namespace (`SyncData.type`).
    pub ty: i32,
    /// Key, value or tombstone, version, expiry.
    pub entry: Entry,
}

impl Record {
    /// A record of `key` in namespace `ty` holding `value`, or a tombstone
    /// when `value` is `None`.
    pub fn new(
        ty: i32,
        key: &str,
        value: Option<&str>,
        version: Version,
        expires_at_ms: u64,
    ) -> Self {
        Self {
            ty,
            entry: Entry::new(key, value, version, expires_at_ms),
        }
    }

    /// The key within the namespace.
    pub fn key(&self) -> &str {
        self.entry.key()
    }
}
