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

use triomphe::ThinArc;

use super::Version;

/// The fixed part of an entry, stored in front of the key and value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Header {
    version: Version,
    expires_at_ms: u64,
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
        let header = Header {
            version,
            expires_at_ms,
            key_len: u32::try_from(key.len()).unwrap_or(u32::MAX),
            deleted: value.is_none(),
        };
        let value = value.unwrap_or("");
        let bytes = key.bytes().chain(value.bytes());
        Self(ThinArc::from_header_and_iter(
            header,
            ExactLen(bytes, key.len() + value.len()),
        ))
    }

    fn header(&self) -> &Header {
        &self.0.header.header
    }

    /// The key and the value text (empty for a tombstone).
    fn parts(&self) -> (&str, &str) {
        // The bytes were copied from a key `&str` followed by a value `&str`
        // and are never changed, so they are UTF-8 with a character boundary
        // at `key_len`: the fallback cannot be reached.
        std::str::from_utf8(&self.0.slice)
            .ok()
            .and_then(|text| text.split_at_checked(self.header().key_len as usize))
            .unwrap_or(("", ""))
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
        self.parts().0
    }

    /// The value, or `None` for a tombstone (expired or not).
    pub fn value(&self) -> Option<&str> {
        (!self.header().deleted).then(|| self.parts().1)
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

    /// The value, if the entry is neither a tombstone nor expired at `now_ms`.
    pub fn live_value(&self, now_ms: u64) -> Option<&str> {
        let expires = self.expires_at_ms();
        if expires != 0 && expires <= now_ms {
            return None;
        }
        self.value()
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
            .finish()
    }
}

/// An iterator with a known length: `Chain` does not implement
/// `ExactSizeIterator`, which the single-allocation constructor needs.
struct ExactLen<I>(I, usize);

impl<I: Iterator<Item = u8>> Iterator for ExactLen<I> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let byte = self.0.next()?;
        self.1 = self.1.saturating_sub(1);
        Some(byte)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.1, Some(self.1))
    }
}

impl<I: Iterator<Item = u8>> ExactSizeIterator for ExactLen<I> {}

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
        assert_eq!(e.live_value(100), None);
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
