//! The framing of the data directory's files: each record is
//! `[u32 length][u32 CRC-32][payload]` (little endian), the payload a
//! `podcache.v1.Entry` message, the checksum over the payload. A file
//! starts with an 8-byte magic naming its kind and format.
//!
//! Owns: the byte layout, and telling a torn tail (a record cut short by a
//! crash while it was being written, at the very end of a file) from
//! damage (anything else). Must not touch files or the store: it reads
//! and writes byte slices. Written by hand because it is twenty lines on
//! top of two kept crates (prost for the payload, crc32fast for the
//! checksum); no framing crate checks what the recovery rules here need.

use std::io::Read;

use prost::Message;

use crate::proto::{encode_entry, podcache, record_from_wire};
use crate::store::Record;

/// The magic of a log file (appends since a snapshot).
pub(crate) const LOG_MAGIC: &[u8; 8] = b"PCLOG\x00\x01\n";
/// The magic of a snapshot file (the whole state at one moment).
pub(crate) const SNAPSHOT_MAGIC: &[u8; 8] = b"PCSNP\x00\x01\n";
/// Bytes of a record's header.
pub(crate) const HEADER: usize = 8;
/// The longest payload a record may claim: larger than any entry the
/// limits allow (1 MiB values by default, and the gRPC message limit
/// bounds what peers send), small enough that a damaged length is caught.
pub(crate) const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// Appends `record` framed to `buf`.
pub(crate) fn put(record: &Record, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    encode_entry(record, buf);
    let payload = &buf[start + HEADER..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why the records of a file stop where they stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Every byte was a whole, valid record.
    Clean,
    /// From this offset on, the bytes hold no valid record: a record cut
    /// short (or never written) by a crash. Safe to cut off at the end of
    /// a log: nothing after it ever counted as on disk.
    Torn {
        /// Where the valid records end.
        offset: usize,
    },
    /// A record at this offset is invalid but valid records follow it, or
    /// its payload is not an entry: damage, never to be skipped silently.
    Damaged {
        /// Where the bad record starts.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the records of `bytes` (a file's contents after its magic,
/// which starts at `base` in the file), giving each to `each` in order.
pub(crate) fn read(bytes: &[u8], base: usize, mut each: impl FnMut(Record)) -> End {
    let mut at = 0;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Ok((record, next)) => {
                each(record);
                at = next;
            }
            Err(reason) => {
                // A crash leaves at most one partial record, at the end: if
                // any valid record starts after this point, it is damage.
                let later = (at + 1..bytes.len()).find(|&o| record_at(bytes, o).is_ok());
                return match later {
                    None => End::Torn { offset: base + at },
                    Some(_) => End::Damaged {
                        offset: base + at,
                        reason,
                    },
                };
            }
        }
    }
    End::Clean
}

/// Reads the records of a file's contents after its magic from `source`,
/// `chunk` bytes at a time, as [`read`] does on the whole (the same
/// records, the same end), holding about one chunk in memory rather than
/// the file: a node's snapshot is as large as its state. Only when a
/// record is bad before the end is the rest read whole, to tell a torn
/// tail from damage. Returns the end and the bytes read.
pub(crate) fn read_from(
    mut source: impl Read,
    base: usize,
    chunk: usize,
    mut each: impl FnMut(Record),
) -> std::io::Result<(End, usize)> {
    let chunk = chunk.max(1);
    let mut buf: Vec<u8> = Vec::with_capacity(chunk);
    // The file offset of buf[0], and where the next record starts in buf.
    let (mut start, mut at) = (base, 0);
    let mut eof = false;
    loop {
        while at < buf.len() && whole_record_at(&buf, at) {
            match record_at(&buf, at) {
                Ok((record, next)) => {
                    each(record);
                    at = next;
                }
                Err(_) => {
                    // Bad before the end: the rest decides what it is.
                    source.read_to_end(&mut buf)?;
                    let read_bytes = start - base + buf.len();
                    return Ok((read(&buf[at..], start + at, each), read_bytes));
                }
            }
        }
        if eof {
            let read_bytes = start - base + buf.len();
            return Ok((read(&buf[at..], start + at, each), read_bytes));
        }
        buf.drain(..at);
        start += at;
        at = 0;
        // A record longer than a chunk is read whole before it is parsed.
        let want = match header_at(&buf, 0) {
            Some((len, _)) => (HEADER + len.min(MAX_PAYLOAD))
                .saturating_sub(buf.len())
                .max(chunk),
            None => chunk,
        };
        let before = buf.len();
        (&mut source).take(want as u64).read_to_end(&mut buf)?;
        eof = buf.len() == before;
    }
}

/// True when `bytes` holds the whole record at `at` (or its header claims
/// more than a record may): it can be judged without reading more.
fn whole_record_at(bytes: &[u8], at: usize) -> bool {
    header_at(bytes, at)
        .is_some_and(|(len, _)| len > MAX_PAYLOAD || at + HEADER + len <= bytes.len())
}

/// The payload length and checksum the header at `at` claims, if the
/// whole header is there.
fn header_at(bytes: &[u8], at: usize) -> Option<(usize, u32)> {
    let h = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    Some((len, u32::from_le_bytes([h[4], h[5], h[6], h[7]])))
}

/// The record at `at` and the offset after it.
fn record_at(bytes: &[u8], at: usize) -> Result<(Record, usize), String> {
    let (len, crc) = header_at(bytes, at).ok_or_else(|| "a record header cut short".to_owned())?;
    if len > MAX_PAYLOAD {
        return Err(format!("a record claims {len} bytes"));
    }
    let payload = bytes
        .get(at + HEADER..at + HEADER + len)
        .ok_or_else(|| "a record cut short".to_owned())?;
    if crc32fast::hash(payload) != crc {
        return Err("a record's checksum does not match".to_owned());
    }
    let entry = podcache::Entry::decode(payload)
        .map_err(|e| format!("a record that is not an entry: {e}"))?;
    if entry.key.is_empty() {
        return Err("a record with an empty key".to_owned());
    }
    Ok((record_from_wire(entry), at + HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Version;

    fn records() -> Vec<Record> {
        (0..5)
            .map(|i| {
                Record::new(
                    i,
                    &format!("key-{i}"),
                    (i % 2 == 0).then_some("value"),
                    Version {
                        hlc: 100 + i as u64,
                        node: 7,
                    },
                    0,
                )
            })
            .collect()
    }

    fn framed(records: &[Record]) -> Vec<u8> {
        let mut buf = Vec::new();
        for r in records {
            put(r, &mut buf);
        }
        buf
    }

    fn read_all(bytes: &[u8]) -> (Vec<Record>, End) {
        let mut out = Vec::new();
        let end = read(bytes, 8, |r| out.push(r));
        (out, end)
    }

    #[test]
    fn records_read_back_as_written() {
        let rs = records();
        assert_eq!(read_all(&framed(&rs)), (rs, End::Clean));
        assert_eq!(read_all(&[]), (vec![], End::Clean));
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_a_torn_tail_at_its_offset() {
        let rs = records();
        let bytes = framed(&rs);
        let last_start = framed(&rs[..4]).len();
        for cut in last_start + 1..bytes.len() {
            let (got, end) = read_all(&bytes[..cut]);
            assert_eq!(got, rs[..4]);
            assert_eq!(
                end,
                End::Torn {
                    offset: 8 + last_start
                },
                "cut at {cut}"
            );
        }
        // Garbage after the last record (a preallocated or half-written
        // block) is a torn tail too.
        let mut zeros = bytes.clone();
        zeros.extend_from_slice(&[0xff; 40]);
        assert_eq!(
            read_all(&zeros).1,
            End::Torn {
                offset: 8 + bytes.len()
            }
        );
    }

    /// Reading in chunks of any size gives what reading the whole gives,
    /// for clean, torn, damaged and garbage-tailed contents.
    #[test]
    fn reading_in_chunks_is_reading_the_whole() {
        let rs = records();
        let clean = framed(&rs);
        let mut cases = vec![clean.clone(), Vec::new()];
        for cut in [1, 5, 9, clean.len() / 2, clean.len() - 1] {
            cases.push(clean[..cut].to_vec());
        }
        for flip in [0, 3, 9, clean.len() / 2, clean.len() - 2] {
            let mut bad = clean.clone();
            bad[flip] ^= 0x55;
            cases.push(bad);
        }
        let mut tailed = clean.clone();
        tailed.extend_from_slice(&[0xff; 40]);
        cases.push(tailed);
        for bytes in &cases {
            let whole = read_all(bytes);
            for chunk in [1, 2, 7, 8, 9, 31, 64, 1 << 20] {
                let mut got = Vec::new();
                let (end, n) =
                    read_from(&bytes[..], 8, chunk, |r| got.push(r)).expect("read from memory");
                assert_eq!((got, end), whole, "chunk {chunk}, {} bytes", bytes.len());
                assert_eq!(n, bytes.len());
            }
        }
    }

    #[test]
    fn a_bad_record_with_valid_ones_after_it_is_damage() {
        let rs = records();
        let mut bytes = framed(&rs);
        let second = framed(&rs[..1]).len();
        bytes[second + HEADER + 2] ^= 0x55;
        let (got, end) = read_all(&bytes);
        assert_eq!(got, rs[..1]);
        match end {
            End::Damaged { offset, reason } => {
                assert_eq!(offset, 8 + second);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected damage, got {other:?}"),
        }
    }
}
