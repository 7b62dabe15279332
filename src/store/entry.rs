//! One stored entry: its key, its value or tombstone, its version and
//! expiry, in a single reference-counted allocation.
//!
//! Owns: the layout of an entry in memory and the accessors to its parts.
//! Must not touch: the merge rule, limits, the map that holds entries.
//!
//! Why one allocation: at a million entries the store's memory is mostly
//! per-entry overhead. A map of `Arc<str>` keys to separately allocated
//! values costs two allocation headers and a 56-byte map slot per entry; an
//! [`Entry`] is one thin pointer (8 bytes in the map's slot) to one block
//! holding everything, shared without copying by the store, the fan-out
//! queues, snapshots and watchers.

use std::fmt;
use std::sync::Arc;

use triomphe::ThinArc;

use super::version::Version;

/// Who wrote an entry, on which replica, why, and whether as part of a
/// batch. One write's entries share one (a pointer each), and the write
/// path reuses the last one it made while they are equal, so what this
/// costs per entry is a pointer, not the strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Meta {
    /// A REST token's name (or fingerprint), a client certificate's
    /// subject, `anonymous`, `sync` or `import`.
    pub author: Box<str>,
    /// The pod name of the replica that took the write.
    pub origin: Box<str>,
    /// Why, as the writer said it.
    pub reason: Option<Box<str>>,
    /// Written by a batch: its entries share one version.
    pub batch: bool,
}

impl Meta {
    /// Longest author, origin or reason taken from a peer or a file.
    pub const MAX_FIELD_BYTES: usize = 256;

    /// A description of who wrote it.
    pub fn new(author: &str, origin: &str, reason: Option<&str>, batch: bool) -> Self {
        Self {
            author: author.into(),
            origin: origin.into(),
            reason: reason.filter(|r| !r.is_empty()).map(Into::into),
            batch,
        }
    }

    /// True when it says what [`Meta::new`] would make of these (without
    /// allocating: the write paths reuse the last one while this holds).
    pub fn is(&self, author: &str, origin: &str, reason: Option<&str>, batch: bool) -> bool {
        let reason = reason.filter(|r| !r.is_empty());
        self.batch == batch
            && *self.author == *author
            && *self.origin == *origin
            && self.reason.as_deref() == reason
    }

    /// True when every field is within [`Meta::MAX_FIELD_BYTES`].
    pub fn within_limits(&self) -> bool {
        [
            &*self.author,
            &*self.origin,
            self.reason.as_deref().unwrap_or(""),
        ]
        .iter()
        .all(|f| f.len() <= Self::MAX_FIELD_BYTES)
    }
}

/// The fixed part of an entry, stored in front of the key and value bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Header {
    version: Version,
    expires_at_ms: u64,
    /// Who wrote it (none for entries from before the field, or from the
    /// original protocol's peers).
    meta: Option<Arc<Meta>>,
    /// Bytes of the key at the start of the slice; the value follows.
    key_len: u32,
    /// A tombstone: the key was deleted at `version`.
    deleted: bool,
}

/// A versioned entry with its key: a value or a tombstone. Cloning shares
/// it (a reference count), never copies.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Entry(ThinArc<Header, u8>);

impl Entry {
    /// An entry of `key` holding `value`, or a tombstone when `value` is
    /// `None`. `expires_at_ms` is an absolute Unix time, 0 for never.
    ///
    /// Keys are limited far below 4 GiB (`Limits::max_key_bytes`, and the
    /// gRPC message limit for entries from peers). A key of 4 GiB or more
    /// would read back as the empty key, which every write path refuses.
    pub fn new(key: &str, value: Option<&str>, version: Version, expires_at_ms: u64) -> Self {
        Self::with_meta(key, value, version, expires_at_ms, None)
    }

    /// [`Entry::new`], saying who wrote it.
    pub fn with_meta(
        key: &str,
        value: Option<&str>,
        version: Version,
        expires_at_ms: u64,
        meta: Option<Arc<Meta>>,
    ) -> Self {
        let header = Header {
            version,
            expires_at_ms,
            meta,
            key_len: u32::try_from(key.len()).unwrap_or(u32::MAX),
            deleted: value.is_none(),
        };
        let value = value.unwrap_or("");
        let len = key.len() + value.len();
        // The block is filled from one slice (a copy) rather than from an
        // iterator over both parts (a byte at a time, ~4x slower here).
        const ON_STACK: usize = 512;
        if len <= ON_STACK {
            let mut joined = [0u8; ON_STACK];
            joined[..key.len()].copy_from_slice(key.as_bytes());
            joined[key.len()..len].copy_from_slice(value.as_bytes());
            Self(ThinArc::from_header_and_slice(header, &joined[..len]))
        } else {
            let joined = [key.as_bytes(), value.as_bytes()].concat();
            Self(ThinArc::from_header_and_slice(header, &joined))
        }
    }

    fn header(&self) -> &Header {
        &self.0.header.header
    }

    /// The key's and the value's bytes (the value's empty for a tombstone).
    fn byte_parts(&self) -> (&[u8], &[u8]) {
        let slice = &self.0.slice;
        slice
            .split_at_checked(self.header().key_len as usize)
            .unwrap_or((&[], &[]))
    }

    /// `bytes` as text. The bytes were copied from a key `&str` and a value
    /// `&str` and are never changed, so the check cannot fail (and the
    /// fallback cannot be reached); each part is checked on its own, so
    /// reading the key does not pay for checking the value.
    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// The key and the value text (empty for a tombstone).
    fn parts(&self) -> (&str, &str) {
        let (key, value) = self.byte_parts();
        (Self::text(key), Self::text(value))
    }

    /// The key's bytes (for hashing and comparing without a UTF-8 check).
    pub(crate) fn key_bytes(&self) -> &[u8] {
        self.0
            .slice
            .get(..self.header().key_len as usize)
            .unwrap_or(&[])
    }

    /// The key.
    pub fn key(&self) -> &str {
        Self::text(self.byte_parts().0)
    }

    /// The value, or `None` for a tombstone (expired or not).
    pub fn value(&self) -> Option<&str> {
        (!self.header().deleted).then(|| Self::text(self.byte_parts().1))
    }

    /// The key and [`Entry::value`] together, for one UTF-8 check instead
    /// of two.
    pub fn key_value(&self) -> (&str, Option<&str>) {
        let (key, value) = self.parts();
        (key, (!self.header().deleted).then_some(value))
    }

    /// True for a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.header().deleted
    }

    /// When and by whom this entry was written.
    pub fn version(&self) -> Version {
        self.header().version
    }

    /// Absolute expiry in Unix milliseconds, set by the writer so that every
    /// replica expires the entry at the same moment; 0 means never.
    pub fn expires_at_ms(&self) -> u64 {
        self.header().expires_at_ms
    }

    /// True if the entry is neither a tombstone nor expired at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        let expires = self.expires_at_ms();
        !self.header().deleted && (expires == 0 || expires > now_ms)
    }

    /// The value, if the entry is neither a tombstone nor expired at `now_ms`.
    pub fn live_value(&self, now_ms: u64) -> Option<&str> {
        self.is_live(now_ms).then(|| self.parts().1)
    }

    /// Who wrote it, where and why, when known.
    pub fn meta(&self) -> Option<&Arc<Meta>> {
        self.header().meta.as_ref()
    }

    /// True when a batch wrote it (its entries share its version).
    pub fn in_batch(&self) -> bool {
        self.meta().is_some_and(|m| m.batch)
    }

    /// When the write was taken, Unix ms: the wall-clock part of its
    /// version.
    pub fn written_at_ms(&self) -> u64 {
        super::clock::hlc_ms(self.version().hlc)
    }

    /// The same entry under another version and description (a rollback
    /// writes an old value again).
    pub fn rewritten(&self, version: Version, meta: Option<Arc<Meta>>) -> Self {
        let (key, value) = self.key_value();
        Self::with_meta(key, value, version, self.expires_at_ms(), meta)
    }

    /// Bytes of key and value (what the store's byte limit counts).
    pub fn size(&self) -> usize {
        self.0.slice.len()
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key())
            .field("value", &self.value())
            .field("version", &self.version())
            .field("expires_at_ms", &self.expires_at_ms())
            .field("meta", &self.meta())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(hlc: u64) -> Version {
        Version { hlc, node: 3 }
    }

    #[test]
    fn parts_read_back_as_written() {
        let e = Entry::new("ключ", Some("значение ✓"), version(5), 9);
        assert_eq!(e.key(), "ключ");
        assert_eq!(e.key_bytes(), "ключ".as_bytes());
        assert_eq!(e.value(), Some("значение ✓"));
        assert_eq!(e.version(), version(5));
        assert_eq!(e.expires_at_ms(), 9);
        assert_eq!(e.size(), "ключ".len() + "значение ✓".len());
        assert!(!e.is_tombstone());
    }

    #[test]
    fn long_entries_are_held_whole() {
        let key = "k".repeat(300);
        let value = "é".repeat(400);
        let e = Entry::new(&key, Some(&value), version(2), 0);
        assert_eq!(e.key_value(), (key.as_str(), Some(value.as_str())));
        assert_eq!(e.size(), key.len() + value.len());
        let tomb = Entry::new(&key, None, version(3), 0);
        assert_eq!(tomb.key_value(), (key.as_str(), None));
    }

    #[test]
    fn a_tombstone_and_an_empty_value_differ() {
        let tomb = Entry::new("k", None, version(1), 0);
        let empty = Entry::new("k", Some(""), version(1), 0);
        assert_eq!(tomb.value(), None);
        assert!(tomb.is_tombstone());
        assert_eq!(empty.value(), Some(""));
        assert_ne!(tomb, empty);
    }

    #[test]
    fn expiry_hides_the_value() {
        let e = Entry::new("k", Some("v"), version(1), 100);
        assert_eq!(e.live_value(99), Some("v"));
        assert!(e.is_live(99));
        assert_eq!(e.live_value(100), None);
        assert!(!e.is_live(100));
        assert!(!Entry::new("k", None, version(1), 0).is_live(0));
        assert_eq!(
            Entry::new("k", Some("v"), version(1), 0).live_value(u64::MAX),
            Some("v")
        );
    }

    #[test]
    fn an_entry_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Entry>(), std::mem::size_of::<usize>());
        assert_eq!(
            std::mem::size_of::<Option<Entry>>(),
            std::mem::size_of::<usize>()
        );
    }
}
