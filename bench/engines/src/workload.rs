//! The workload every engine gets: podcache's map of (type i32, key
//! string) → entry (value of 100 bytes, version (hlc u64, node u64),
//! expiry u64), keys `key-000123`.
//!
//! fjall and redb store a key as the type (4 bytes, big endian) then the
//! key's bytes, and the entry as hlc, node, expiry (8 bytes each, little
//! endian) then the value: 124 bytes. podcache stores its own records
//! (a `podcache.v1.Entry` message in its framing).

use podcache::store::{Entry, Version};

/// Bytes of every value.
pub const VALUE_BYTES: usize = 100;
/// The namespace every entry is in.
pub const TYPE: i32 = 0;

/// The key of entry `i`.
pub fn key(i: u64) -> String {
    format!("key-{i:06}")
}

/// The engine key of (`ty`, `key`).
pub fn engine_key(ty: i32, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// Splits an engine key back into (type, key).
pub fn split_key(bytes: &[u8]) -> (i32, String) {
    let (ty, key) = bytes.split_at(4);
    let ty = i32::from_be_bytes([ty[0], ty[1], ty[2], ty[3]]);
    (ty, String::from_utf8_lossy(key).into_owned())
}

/// The value of entry `i` written in `round`: 100 pseudo-random
/// alphanumeric bytes (so that compression gains little, as with real
/// values that are not all alike).
pub fn value(i: u64, round: u64) -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut state = i
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(round.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    (0..VALUE_BYTES)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            char::from(ALPHABET[(r >> 58) as usize % 62])
        })
        .collect()
}

/// Encodes an entry for fjall and redb.
pub fn encode(value: &str, version: Version, expires_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + value.len());
    out.extend_from_slice(&version.hlc.to_le_bytes());
    out.extend_from_slice(&version.node.to_le_bytes());
    out.extend_from_slice(&expires_at_ms.to_le_bytes());
    out.extend_from_slice(value.as_bytes());
    out
}

/// Decodes what [`encode`] wrote into podcache's own entry type, so that
/// every engine's restart fills the same map with the same values.
pub fn decode(key: &str, bytes: &[u8]) -> Entry {
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let version = Version {
        hlc: word(0),
        node: word(8),
    };
    let value = std::str::from_utf8(&bytes[24..]).unwrap_or("");
    Entry::new(key, Some(value), version, word(16))
}

/// The map a restart reads everything back into.
pub type Map = std::collections::HashMap<(i32, String), Entry>;

/// Puts `entry` into `map` unless it holds a newer version of the key
/// (podcache's files may hold several versions of one key).
pub fn merge(map: &mut Map, ty: i32, entry: Entry) {
    use std::collections::hash_map::Entry as Slot;
    match map.entry((ty, entry.key().to_owned())) {
        Slot::Occupied(mut held) => {
            if entry.version() > held.get().version() {
                held.insert(entry);
            }
        }
        Slot::Vacant(slot) => {
            slot.insert(entry);
        }
    }
}
