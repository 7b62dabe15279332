//! The digest anti-entropy compares: entries fall into [`BUCKETS`] buckets by
//! a hash of (type, key); a bucket's hash is the XOR of its entries' hashes
//! over key, version, tombstone flag and expiry. Both hashes are FNV-1a with
//! fixed parameters, so every node, whatever its build, computes the same
//! values.

use super::entry::Entry;

/// Buckets in a digest (8 KiB of hashes).
pub const BUCKETS: usize = 1024;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The bucket of (`ty`, `key`), the key given as its UTF-8 bytes.
pub fn bucket_of(ty: i32, key: &[u8]) -> usize {
    let hash = fnv(fnv(FNV_OFFSET, &ty.to_le_bytes()), key);
    (hash % BUCKETS as u64) as usize
}

/// The hash of one entry as the digest counts it.
pub fn entry_hash(ty: i32, entry: &Entry) -> u64 {
    let version = entry.version();
    let mut hash = fnv(FNV_OFFSET, &ty.to_le_bytes());
    hash = fnv(hash, entry.key_bytes());
    hash = fnv(hash, &[0xff]); // separates the key from what follows
    hash = fnv(hash, &version.hlc.to_le_bytes());
    hash = fnv(hash, &version.node.to_le_bytes());
    hash = fnv(hash, &[u8::from(entry.is_tombstone())]);
    fnv(hash, &entry.expires_at_ms().to_le_bytes())
}

/// One hash of a whole digest, to compare two digests with one number.
pub fn root(buckets: &[u64]) -> u64 {
    buckets
        .iter()
        .fold(FNV_OFFSET, |hash, bucket| fnv(hash, &bucket.to_le_bytes()))
}

/// The buckets where two digests differ (all of them when the sizes differ).
pub fn differing(mine: &[u64], theirs: &[u64]) -> Vec<u32> {
    if mine.len() != theirs.len() {
        return (0..mine.len().max(theirs.len()) as u32).collect();
    }
    mine.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_function_is_fixed_across_builds() {
        // FNV-1a of "a": a published test vector.
        assert_eq!(fnv(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert!(bucket_of(1, b"k") < BUCKETS);
        assert_eq!(bucket_of(1, b"k"), bucket_of(1, b"k"));
    }

    #[test]
    fn differing_buckets_are_found() {
        let a = vec![1, 2, 3, 4];
        let b = vec![1, 9, 3, 8];
        assert_eq!(differing(&a, &b), vec![1, 3]);
        assert_eq!(differing(&a, &a), Vec::<u32>::new());
        assert_ne!(root(&a), root(&b));
    }
}
