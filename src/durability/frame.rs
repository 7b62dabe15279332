//! The framing of the data directory's files, and telling a torn tail (a
//! record cut short by a power cut while it was written, at the very end
//! of a file) from damage (anything else).
//!
//! # Format 2 (written now)
//! A file starts with a 24-byte header: an 8-byte magic naming its kind
//! and format, a random 64-bit salt chosen when the file was created, the
//! CRC-32 of those 16 bytes, and 4 zero bytes. Each record is `[u32
//! length][u32 checksum][payload]` (little endian), the payload a
//! `podcache.v1.Entry` message, the checksum a CRC-32 over the salt, the
//! record's offset in the file, its length and its payload, as SQLite's
//! WAL mixes a salt into its frames. So a record cut short never passes
//! (its header is covered), a record cannot pass at another offset or in
//! another file, and the bytes of a value that hold a well-formed record
//! cannot pass for one (they would need the file's salt and their own
//! offset).
//!
//! # Format 1 (read only)
//! An 8-byte magic, then records whose checksum covers the payload alone.
//! Read with the same rules, to start from a directory an older podcache
//! wrote; nothing is appended to such a file.
//!
//! # Torn or damaged
//! Power loss can only cut the unsynced end of a file, so a record that
//! fails is a torn tail when no valid record starts anywhere after it,
//! and damage otherwise. The search for a later record reads the file in
//! bounded chunks (a checksum's payload is streamed, never held), so a bad
//! record early in a large file costs time, not memory.
//!
//! Owns: the byte layout. Must not touch files by name or the store: it
//! reads through [`Source`] and writes byte vectors. Written by hand
//! because it is short on top of two kept crates (prost for the payload,
//! crc32fast for the checksum); no framing crate checks what the recovery
//! rules here need.

use std::io;

use prost::Message;

use crate::proto::{encode_log_record, log_record_from_wire, podcache};
use crate::store::Record;

/// The magic of a format-2 log file (appends since a snapshot).
pub(crate) const LOG_MAGIC: &[u8; 8] = b"PCLOG\x00\x02\n";
/// The magic of a format-2 snapshot file (the whole state at one moment).
pub(crate) const SNAPSHOT_MAGIC: &[u8; 8] = b"PCSNP\x00\x02\n";
/// The magic of a format-1 log file.
pub(crate) const LOG_MAGIC_V1: &[u8; 8] = b"PCLOG\x00\x01\n";
/// The magic of a format-1 snapshot file.
pub(crate) const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"PCSNP\x00\x01\n";
/// Bytes of a format-2 file header.
pub(crate) const FILE_HEADER: usize = 24;
/// Bytes of a record's header.
pub(crate) const HEADER: usize = 8;
/// The longest payload a record may claim. The configuration keeps every
/// entry below it with a data directory (see `Limits::max_entry_bytes`);
/// small enough that a damaged length is caught.
pub(crate) const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// The two kinds of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `log-<gen>`.
    Log,
    /// `snapshot-<gen>`.
    Snapshot,
}

impl Kind {
    fn magics(self) -> (&'static [u8; 8], &'static [u8; 8]) {
        match self {
            Kind::Log => (LOG_MAGIC, LOG_MAGIC_V1),
            Kind::Snapshot => (SNAPSHOT_MAGIC, SNAPSHOT_MAGIC_V1),
        }
    }
}

/// How a file's records are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Format 1: the payload's CRC alone; records from byte 8.
    V1,
    /// Format 2: salted, offset-bound CRC over header and payload;
    /// records from byte 24.
    V2 {
        /// The file's salt.
        salt: u64,
    },
}

impl Framing {
    /// Where the first record starts.
    pub(crate) fn first_record(self) -> u64 {
        match self {
            Framing::V1 => 8,
            Framing::V2 { .. } => FILE_HEADER as u64,
        }
    }

    fn checksum(self, offset: u64, len: u32, payload: &[&[u8]]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        if let Framing::V2 { salt } = self {
            h.update(&salt.to_le_bytes());
            h.update(&offset.to_le_bytes());
            h.update(&len.to_le_bytes());
        }
        for part in payload {
            h.update(part);
        }
        h.finalize()
    }
}

/// The header of a new format-2 file of `kind` with `salt`.
pub(crate) fn file_header(kind: Kind, salt: u64) -> [u8; FILE_HEADER] {
    let mut out = [0; FILE_HEADER];
    out[..8].copy_from_slice(kind.magics().0);
    out[8..16].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What a file's first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Head {
    /// Shorter than its header, or a header of zeros with nothing after
    /// it: created, and cut (or never written) before its header was
    /// whole. A file's header is synced before any record is appended, so
    /// such a file never held a record.
    Empty,
    /// A valid header.
    Framed(Framing),
    /// Anything else: not a podcache file of this kind, or damaged.
    Bad(String),
}

/// Reads the header of a file of `kind` from `source`.
pub(crate) fn head<S: Source + ?Sized>(source: &S, kind: Kind) -> io::Result<Head> {
    let len = source.len()?;
    let mut bytes = [0; FILE_HEADER];
    let n = read_full(
        source,
        0,
        &mut bytes[..(len.min(FILE_HEADER as u64) as usize)],
    )?;
    let bytes = &bytes[..n];
    let (v2, v1) = kind.magics();
    if bytes.len() >= 8 && &bytes[..8] == v1 {
        return Ok(Head::Framed(Framing::V1));
    }
    if bytes.len() < FILE_HEADER {
        let prefix_of = |m: &[u8; 8]| {
            let k = bytes.len().min(8);
            m[..k] == bytes[..k]
        };
        if prefix_of(v2) || prefix_of(v1) || bytes.iter().all(|b| *b == 0) {
            return Ok(Head::Empty);
        }
        return Ok(Head::Bad(
            "not a podcache file of this kind (wrong magic)".into(),
        ));
    }
    if &bytes[..8] != v2 {
        if bytes.iter().all(|b| *b == 0) && len == FILE_HEADER as u64 {
            return Ok(Head::Empty);
        }
        return Ok(Head::Bad(
            "not a podcache file of this kind (wrong magic)".into(),
        ));
    }
    let crc = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if crc32fast::hash(&bytes[..16]) != crc || bytes[20..24] != [0; 4] {
        return Ok(Head::Bad("the file's header fails its checksum".into()));
    }
    let mut salt = [0; 8];
    salt.copy_from_slice(&bytes[8..16]);
    Ok(Head::Framed(Framing::V2 {
        salt: u64::from_le_bytes(salt),
    }))
}

/// Appends `record` framed for `framing` to `buf`, as the record that
/// starts at `offset` in its file.
#[cfg(test)]
pub(crate) fn put(framing: Framing, offset: u64, record: &Record, buf: &mut Vec<u8>) {
    put_group(framing, offset, std::slice::from_ref(record), false, buf);
}

/// Appends `records` framed for `framing` to `buf` as one record starting
/// at `offset`: one batch's entries (all or none survive a power cut), or
/// kept history when `history` is set.
pub(crate) fn put_group(
    framing: Framing,
    offset: u64,
    records: &[Record],
    history: bool,
    buf: &mut Vec<u8>,
) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    encode_log_record(records, history, buf);
    let payload = &buf[start + HEADER..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = framing.checksum(offset, len, &[payload]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why the records of a file stop where they stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Every byte was a whole, valid record.
    Clean,
    /// From this offset on, the bytes hold no valid record: a record cut
    /// short (or never written) by a power cut. Safe to cut off at the end
    /// of a log: nothing after it ever counted as on disk.
    Torn {
        /// Where the valid records end.
        offset: u64,
    },
    /// A record at this offset is invalid but a valid record follows it,
    /// or it passes its checksum but is not an entry: damage, never to be
    /// skipped silently.
    Damaged {
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Random-access bytes: a file, or a slice in tests and fuzzing.
pub(crate) trait Source {
    /// The size.
    fn len(&self) -> io::Result<u64>;
    /// Reads from `offset`; 0 at the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

impl Source for [u8] {
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let from = (offset as usize).min(<[u8]>::len(self));
        let n = buf.len().min(<[u8]>::len(self) - from);
        buf[..n].copy_from_slice(&self[from..from + n]);
        Ok(n)
    }
}

impl Source for dyn super::storage::StorageFile {
    fn len(&self) -> io::Result<u64> {
        super::storage::StorageFile::len(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        super::storage::StorageFile::read_at(self, offset, buf)
    }
}

fn read_full<S: Source + ?Sized>(source: &S, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        let n = source.read_at(offset + at as u64, &mut buf[at..])?;
        if n == 0 {
            break;
        }
        at += n;
    }
    Ok(at)
}

/// Reads the records of `source` (a whole file whose header said
/// `framing`), `chunk` bytes at a time, giving each to `each` in order.
/// Returns how they end.
pub(crate) fn read<S: Source + ?Sized>(
    source: &S,
    framing: Framing,
    chunk: usize,
    mut each: impl FnMut(Vec<Record>, bool),
) -> io::Result<End> {
    let chunk = chunk.max(HEADER);
    let len = source.len()?;
    let mut buf: Vec<u8> = Vec::new();
    // The file offset of buf[0].
    let mut buf_at = framing.first_record();
    let mut at = buf_at;
    // Makes buf cover [from, from + n) as far as the file goes.
    let cover = |buf: &mut Vec<u8>, buf_at: &mut u64, from: u64, n: usize| -> io::Result<()> {
        let have_to = *buf_at + buf.len() as u64;
        if from >= *buf_at && from + n as u64 <= have_to {
            return Ok(());
        }
        buf.drain(..((from - *buf_at) as usize).min(buf.len()));
        *buf_at = from;
        let want = n.max(chunk).min((len.saturating_sub(from)) as usize);
        let old = buf.len();
        if want > old {
            buf.resize(want, 0);
            let got = read_full(source, from + old as u64, &mut buf[old..])?;
            buf.truncate(old + got);
        }
        Ok(())
    };
    while at < len {
        cover(&mut buf, &mut buf_at, at, HEADER)?;
        let rel = (at - buf_at) as usize;
        let bad = match header_at(&buf, rel) {
            None => Some("a record header cut short".to_owned()),
            Some((plen, crc)) => {
                if plen == 0 || plen > MAX_PAYLOAD {
                    Some(format!("a record claims {plen} bytes"))
                } else if at + (HEADER + plen) as u64 > len {
                    Some("a record cut short".to_owned())
                } else {
                    cover(&mut buf, &mut buf_at, at, HEADER + plen)?;
                    let rel = (at - buf_at) as usize;
                    // Short only if the file shrank while it was read.
                    let payload = buf.get(rel + HEADER..rel + HEADER + plen).unwrap_or(&[]);
                    if payload.len() != plen {
                        Some("a record cut short".to_owned())
                    } else if framing.checksum(at, plen as u32, &[payload]) != crc {
                        Some("a record's checksum does not match".to_owned())
                    } else {
                        // It passed its checksum: it was written so. Not
                        // being an entry is damage, not a torn tail.
                        match decode(payload) {
                            Ok((records, history)) => {
                                each(records, history);
                                at += (HEADER + plen) as u64;
                                None
                            }
                            Err(reason) => {
                                return Ok(End::Damaged { offset: at, reason });
                            }
                        }
                    }
                }
            }
        };
        if let Some(reason) = bad {
            drop(buf);
            return Ok(
                match valid_record_after(source, framing, at + 1, len, chunk)? {
                    None => End::Torn { offset: at },
                    Some(next) if lost_page_between(source, at, next)? => End::Torn { offset: at },
                    Some(_) => End::Damaged { offset: at, reason },
                },
            );
        }
    }
    Ok(End::Clean)
}

/// A record's entries (one, or a batch's), and whether they are history.
fn decode(payload: &[u8]) -> Result<(Vec<Record>, bool), String> {
    let entry = podcache::Entry::decode(payload)
        .map_err(|e| format!("a record that is not an entry: {e}"))?;
    let (records, history) = log_record_from_wire(entry);
    if records.iter().any(|r| r.key().is_empty()) {
        return Err("a record with an empty key".to_owned());
    }
    Ok((records, history))
}

/// The payload length and checksum the header at `at` claims, if the
/// whole header is there.
fn header_at(bytes: &[u8], at: usize) -> Option<(usize, u32)> {
    let h = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    Some((len, u32::from_le_bytes([h[4], h[5], h[6], h[7]])))
}

/// The unit a kernel writes a file's pages back in.
pub(crate) const PAGE: u64 = 4096;

/// True when the bytes from `from` (a bad record) up to `to` (a valid one
/// after it) hold a page that never reached the disk: zeros from `from`
/// to the end of its page, or a whole page of zeros. A power cut leaves
/// that when a later page of the same unsynced write went out first (the
/// size reached the disk, the page did not), so what follows was never
/// synced either (a sync writes every page; nothing is appended after a
/// failed one, and a new process starts a new log): a torn tail, not
/// damage. A bit flipped on the disk leaves no such page.
fn lost_page_between<S: Source + ?Sized>(source: &S, from: u64, to: u64) -> io::Result<bool> {
    let first_boundary = (from / PAGE + 1) * PAGE;
    if first_boundary <= to && all_zero(source, from, first_boundary)? {
        return Ok(true);
    }
    let mut page = from.div_ceil(PAGE) * PAGE;
    while page + PAGE <= to {
        if all_zero(source, page, page + PAGE)? {
            return Ok(true);
        }
        page += PAGE;
    }
    Ok(false)
}

fn all_zero<S: Source + ?Sized>(source: &S, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = [0u8; PAGE as usize];
    let want = (to - from) as usize;
    let want_here = want.min(buf.len());
    let n = read_full(source, from, &mut buf[..want_here])?;
    Ok(n == want && buf[..n].iter().all(|b| *b == 0))
}

/// The first offset at or after `from` where a record that passes its
/// checksum starts, reading `chunk` bytes at a time.
fn valid_record_after<S: Source + ?Sized>(
    source: &S,
    framing: Framing,
    from: u64,
    len: u64,
    chunk: usize,
) -> io::Result<Option<u64>> {
    let mut window = vec![0; chunk + HEADER];
    let mut base = from;
    // Bytes whose checksum may be computed in all: bytes that read as
    // plausible lengths at many offsets would otherwise cost the square
    // of the file. Past it, a later record is taken to exist (damage: the
    // operator is asked to look, nothing is cut silently).
    let mut budget: u64 = 4 * MAX_PAYLOAD as u64;
    while base + HEADER as u64 <= len {
        let n = read_full(source, base, &mut window)?;
        let last = n.saturating_sub(HEADER - 1).min(chunk);
        for rel in 0..last {
            let Some((plen, crc)) = header_at(&window[..n], rel) else {
                break;
            };
            let at = base + rel as u64;
            if plen == 0 || plen > MAX_PAYLOAD || at + (HEADER + plen) as u64 > len {
                continue;
            }
            if budget < plen as u64 {
                return Ok(Some(at));
            }
            budget -= plen as u64;
            if streamed_checksum(source, framing, at, plen, chunk)? == crc {
                return Ok(Some(at));
            }
        }
        base += chunk as u64;
    }
    Ok(None)
}

/// The checksum of the record claimed at `at` with `plen` payload bytes,
/// its payload read `chunk` bytes at a time.
fn streamed_checksum<S: Source + ?Sized>(
    source: &S,
    framing: Framing,
    at: u64,
    plen: usize,
    chunk: usize,
) -> io::Result<u32> {
    let mut h = crc32fast::Hasher::new();
    if let Framing::V2 { salt } = framing {
        h.update(&salt.to_le_bytes());
        h.update(&at.to_le_bytes());
        h.update(&(plen as u32).to_le_bytes());
    }
    let mut buf = vec![0; chunk.min(plen)];
    let mut done = 0;
    while done < plen {
        let want = (plen - done).min(buf.len());
        let n = read_full(source, at + (HEADER + done) as u64, &mut buf[..want])?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n;
    }
    Ok(h.finalize())
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

    const SALT: u64 = 0x1234_5678_9abc_def0;
    const V2: Framing = Framing::V2 { salt: SALT };

    fn file(framing: Framing, records: &[Record]) -> Vec<u8> {
        let mut buf = match framing {
            Framing::V1 => LOG_MAGIC_V1.to_vec(),
            Framing::V2 { salt } => file_header(Kind::Log, salt).to_vec(),
        };
        for r in records {
            let at = buf.len() as u64;
            put(framing, at, r, &mut buf);
        }
        buf
    }

    fn read_all(bytes: &[u8], framing: Framing, chunk: usize) -> (Vec<Record>, End) {
        let mut out = Vec::new();
        let end = read(bytes, framing, chunk, |r, _| out.extend(r)).expect("read from memory");
        (out, end)
    }

    #[test]
    fn records_read_back_as_written_in_both_formats() {
        let rs = records();
        for framing in [Framing::V1, V2] {
            let bytes = file(framing, &rs);
            assert_eq!(
                head(&bytes[..], Kind::Log).expect("head"),
                Head::Framed(framing)
            );
            assert_eq!(read_all(&bytes, framing, 1 << 20), (rs.clone(), End::Clean));
        }
        assert_eq!(
            head(&file(V2, &[])[..], Kind::Snapshot).expect("head"),
            Head::Bad("not a podcache file of this kind (wrong magic)".into())
        );
    }

    #[test]
    fn a_short_or_zero_header_is_empty_and_a_bad_one_is_not() {
        let whole = file(V2, &[]);
        for cut in 0..FILE_HEADER {
            assert_eq!(
                head(&whole[..cut], Kind::Log).expect("head"),
                Head::Empty,
                "{cut}"
            );
        }
        assert_eq!(
            head(&[0u8; FILE_HEADER][..], Kind::Log).expect("head"),
            Head::Empty
        );
        let mut bad = file(V2, &records());
        bad[9] ^= 1;
        assert!(matches!(
            head(&bad[..], Kind::Log).expect("head"),
            Head::Bad(_)
        ));
        // Every byte of the header is checked, the reserved ones too.
        for at in 0..FILE_HEADER {
            let mut bad = file(V2, &records());
            bad[at] ^= 0x10;
            assert!(
                matches!(head(&bad[..], Kind::Log).expect("head"), Head::Bad(_)),
                "byte {at}"
            );
        }
        let mut zeros = file(V2, &records());
        zeros[..FILE_HEADER].fill(0);
        assert!(matches!(
            head(&zeros[..], Kind::Log).expect("head"),
            Head::Bad(_)
        ));
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_a_torn_tail_at_its_offset() {
        let rs = records();
        for framing in [Framing::V1, V2] {
            let bytes = file(framing, &rs);
            let last_start = file(framing, &rs[..4]).len();
            for cut in last_start + 1..bytes.len() {
                let (got, end) = read_all(&bytes[..cut], framing, 1 << 20);
                assert_eq!(got, rs[..4]);
                assert_eq!(
                    end,
                    End::Torn {
                        offset: last_start as u64
                    },
                    "cut at {cut}"
                );
            }
            let mut tailed = bytes.clone();
            tailed.extend_from_slice(&[0; 40]);
            assert_eq!(
                read_all(&tailed, framing, 1 << 20).1,
                End::Torn {
                    offset: bytes.len() as u64
                }
            );
        }
    }

    /// Reading in chunks of any size gives what reading the whole gives,
    /// for clean, torn, damaged and garbage-tailed contents.
    #[test]
    fn reading_in_chunks_is_reading_the_whole() {
        let rs = records();
        for framing in [Framing::V1, V2] {
            let clean = file(framing, &rs);
            let first = framing.first_record() as usize;
            let mut cases = vec![clean.clone()];
            for cut in [
                first + 1,
                first + 5,
                first + 9,
                clean.len() / 2,
                clean.len() - 1,
            ] {
                cases.push(clean[..cut].to_vec());
            }
            for flip in [
                first,
                first + 3,
                first + 9,
                clean.len() / 2,
                clean.len() - 2,
            ] {
                let mut bad = clean.clone();
                bad[flip] ^= 0x55;
                cases.push(bad);
            }
            let mut tailed = clean.clone();
            tailed.extend_from_slice(&[0xff; 40]);
            cases.push(tailed);
            for bytes in &cases {
                let whole = read_all(bytes, framing, 1 << 20);
                for chunk in [1, 2, 7, 8, 9, 31, 64] {
                    assert_eq!(
                        read_all(bytes, framing, chunk),
                        whole,
                        "chunk {chunk}, {} bytes",
                        bytes.len()
                    );
                }
            }
        }
    }

    #[test]
    fn a_bad_record_with_valid_ones_after_it_is_damage() {
        let rs = records();
        for framing in [Framing::V1, V2] {
            let mut bytes = file(framing, &rs);
            let second = file(framing, &rs[..1]).len();
            bytes[second + HEADER + 2] ^= 0x55;
            let (got, end) = read_all(&bytes, framing, 1 << 20);
            assert_eq!(got, rs[..1]);
            match end {
                End::Damaged { offset, reason } => {
                    assert_eq!(offset, second as u64);
                    assert!(reason.contains("checksum"), "{reason}");
                }
                other => panic!("expected damage, got {other:?}"),
            }
        }
    }

    /// A value holding the bytes of a well-formed record does not pass for
    /// one in format 2: cut just before it, the rest is a torn tail, where
    /// format 1 took the embedded record for a later valid one (damage).
    #[test]
    fn a_value_holding_a_record_cannot_pass_for_one() {
        let inner = Record::new(1, "inner", Some("x"), Version { hlc: 5, node: 1 }, 0);
        for framing in [Framing::V1, V2] {
            let mut embedded = Vec::new();
            // As a writer who knows the layout but not the salt would frame it.
            put(Framing::V2 { salt: 0 }, 0, &inner, &mut embedded);
            if framing == Framing::V1 {
                embedded.clear();
                put(Framing::V1, 0, &inner, &mut embedded);
            }
            let value = String::from_utf8_lossy(&embedded).into_owned();
            if value.as_bytes() != &embedded[..] {
                continue; // not valid UTF-8: a value could not hold it
            }
            let outer = Record::new(1, "outer", Some(&value), Version { hlc: 6, node: 1 }, 0);
            let bytes = file(framing, &[outer]);
            let cut = &bytes[..bytes.len() - 1];
            let end = read_all(cut, framing, 1 << 20).1;
            match framing {
                Framing::V1 => assert!(matches!(end, End::Damaged { .. }), "{end:?}"),
                Framing::V2 { .. } => {
                    assert_eq!(
                        end,
                        End::Torn {
                            offset: framing.first_record()
                        }
                    )
                }
            }
        }
    }

    /// A page of an unsynced write that never reached the disk, with a
    /// later page that did, is a torn tail (the power cut's), where a
    /// flipped byte at the same place is damage.
    #[test]
    fn a_lost_page_before_valid_records_is_torn_and_a_flipped_byte_is_not() {
        let value = "v".repeat(700);
        let rs: Vec<Record> = (0..20)
            .map(|i| {
                Record::new(
                    1,
                    &format!("k{i}"),
                    Some(&value),
                    Version { hlc: i, node: 1 },
                    0,
                )
            })
            .collect();
        let bytes = file(V2, &rs);
        assert!(bytes.len() > 3 * PAGE as usize);
        // Where the record that page 1 starts in begins.
        let mut starts = vec![FILE_HEADER];
        for r in &rs {
            let mut one = Vec::new();
            let at = *starts.last().expect("a start");
            put(V2, at as u64, r, &mut one);
            starts.push(at + one.len());
        }
        let hit = *starts
            .iter()
            .rev()
            .find(|s| **s < PAGE as usize)
            .expect("a record in page 0");
        let mut lost = bytes.clone();
        lost[PAGE as usize..2 * PAGE as usize].fill(0);
        assert_eq!(
            read_all(&lost, V2, 1 << 20).1,
            End::Torn { offset: hit as u64 }
        );
        // Zeros from a record's start to its page's end: the same.
        let mut tail_lost = bytes.clone();
        let next = starts
            .iter()
            .find(|s| **s > PAGE as usize)
            .copied()
            .expect("a record in page 1");
        tail_lost[next..2 * PAGE as usize].fill(0);
        assert_eq!(
            read_all(&tail_lost, V2, 1 << 20).1,
            End::Torn {
                offset: next as u64
            }
        );
        let mut flipped = bytes.clone();
        flipped[PAGE as usize + 10] ^= 0x20;
        assert!(matches!(
            read_all(&flipped, V2, 1 << 20).1,
            End::Damaged { .. }
        ));
    }

    #[test]
    fn a_record_moved_to_another_offset_or_file_fails() {
        let rs = records();
        let bytes = file(V2, &rs[..1]);
        let record = bytes[FILE_HEADER..].to_vec();
        let mut moved = file(V2, &rs[..1]);
        moved.extend_from_slice(&record);
        assert_eq!(
            read_all(&moved, V2, 1 << 20).1,
            End::Torn {
                offset: bytes.len() as u64
            }
        );
        let other = Framing::V2 { salt: SALT ^ 1 };
        assert_eq!(
            read_all(&bytes, other, 1 << 20).1,
            End::Torn {
                offset: FILE_HEADER as u64
            }
        );
    }
}
