//! Generated protobuf and gRPC code, and conversions between wire messages
//! and store records.
//!
//! Owns: the mapping of [`Record`] to `podcache.v1.Entry` and back,
//! including validation of what arrives (a wire entry becomes a record only
//! through [`record_from_wire`]).

use std::sync::Arc;

use crate::store::{Entry, Meta, Record, Version};

/// The original `hellorpc` package, generated from `proto/hellorpc.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod hellorpc {
    tonic::include_proto!("hellorpc");
}

/// podcache's own additions, generated from `proto/podcache.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod podcache {
    tonic::include_proto!("podcache.v1");
}

/// The subset of etcd's v3 API that podcache calls (client only), generated
/// from `proto/etcd/rpc.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The subset of Kubernetes' Pod storage encoding that podcache reads,
/// generated from `proto/k8s/pod.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod k8s {
    tonic::include_proto!("k8s.podcache");
}

/// The encoded descriptors of podcache's own files, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("podcache_descriptor");

/// A record as a wire entry.
pub fn record_to_wire(record: &Record) -> podcache::Entry {
    let meta = record.entry.meta();
    let text = |f: fn(&Meta) -> &str| meta.map(|m| f(m).to_owned()).unwrap_or_default();
    podcache::Entry {
        r#type: record.ty,
        key: record.key().to_owned(),
        value: record.entry.value().unwrap_or_default().to_owned(),
        deleted: record.entry.is_tombstone(),
        hlc: record.entry.version().hlc,
        node: record.entry.version().node,
        expires_at_ms: record.entry.expires_at_ms(),
        author: text(|m| &m.author),
        origin: text(|m| &m.origin),
        reason: text(|m| m.reason.as_deref().unwrap_or_default()),
        batch: record.entry.in_batch(),
        batch_entries: Vec::new(),
        history: false,
        meta_as_previous: false,
    }
}

/// True when `record` can name its writer as the previous record of the
/// same list did (`meta_as_previous`): both have one, and it is the same.
fn same_meta(record: &Record, previous: Option<&Record>) -> bool {
    match (record.entry.meta(), previous.and_then(|p| p.entry.meta())) {
        (Some(meta), Some(before)) => std::ptr::eq(meta, before) || meta == before,
        _ => false,
    }
}

/// Records as one list of wire entries, each naming its writer only where
/// it differs from the previous entry's (`meta_as_previous`).
pub fn records_to_wire(records: &[Record]) -> Vec<podcache::Entry> {
    let mut previous = None;
    records
        .iter()
        .map(|record| {
            let mut entry = record_to_wire(record);
            if same_meta(record, previous) {
                entry.author.clear();
                entry.origin.clear();
                entry.reason.clear();
                entry.batch = false;
                entry.meta_as_previous = true;
            }
            previous = Some(record);
            entry
        })
        .collect()
}

/// A wire entry as a record. Limits are checked by the store when it merges.
pub fn record_from_wire(entry: podcache::Entry) -> Record {
    record_sharing(entry, &mut None)
}

/// Wire entries as records; consecutive entries with the same author,
/// origin, reason and batch flag (a batch, or one writer's writes) share
/// one [`Meta`], and an entry that says `meta_as_previous` takes the
/// previous entry's (none when it is the first).
pub fn records_from_wire(entries: Vec<podcache::Entry>) -> Vec<Record> {
    let mut last = None;
    entries
        .into_iter()
        .map(|entry| record_sharing(entry, &mut last))
        .collect()
}

fn record_sharing(entry: podcache::Entry, last: &mut Option<Arc<Meta>>) -> Record {
    let meta = if entry.meta_as_previous {
        last.clone()
    } else if entry.author.is_empty()
        && entry.origin.is_empty()
        && entry.reason.is_empty()
        && !entry.batch
    {
        // The next entry's `meta_as_previous` means none, too.
        *last = None;
        None
    } else {
        match last {
            Some(shared)
                if shared.is(
                    &entry.author,
                    &entry.origin,
                    Some(entry.reason.as_str()),
                    entry.batch,
                ) =>
            {
                Some(shared.clone())
            }
            _ => {
                let meta = Arc::new(Meta::new(
                    &entry.author,
                    &entry.origin,
                    Some(entry.reason.as_str()),
                    entry.batch,
                ));
                *last = Some(meta.clone());
                Some(meta)
            }
        }
    };
    Record {
        ty: entry.r#type,
        entry: Entry::with_meta(
            &entry.key,
            (!entry.deleted).then_some(entry.value.as_str()),
            Version {
                hlc: entry.hlc,
                node: entry.node,
            },
            entry.expires_at_ms,
            meta,
        ),
    }
}

/// A data directory record's entries: the entry and the rest of its batch
/// (`batch_entries`), and whether it is history.
pub fn log_record_from_wire(mut entry: podcache::Entry) -> (Vec<Record>, bool) {
    let history = entry.history;
    let rest = std::mem::take(&mut entry.batch_entries);
    let mut last = None;
    let mut records = Vec::with_capacity(1 + rest.len());
    records.push(record_sharing(entry, &mut last));
    for more in rest {
        records.push(record_sharing(more, &mut last));
    }
    (records, history)
}

/// Appends `record` encoded as a `podcache.v1.Entry` message to `buf`
/// (straight from the record, no intermediate message); decode it with
/// `podcache::Entry::decode` and [`record_from_wire`].
pub fn encode_entry(record: &Record, buf: &mut Vec<u8>) {
    buf.reserve(replicate_batch::entry_len(record, false));
    replicate_batch::encode_entry_fields(record, false, buf);
}

/// Appends one data directory record: the first of `records` as an
/// `Entry` with the others as its `batch_entries` (one batch, one
/// record), marked `history` when they are superseded versions. Decode
/// with [`log_record_from_wire`].
pub fn encode_log_record(records: &[Record], history: bool, buf: &mut Vec<u8>) {
    let Some((first, rest)) = records.split_first() else {
        return;
    };
    encode_entry(first, buf);
    for more in rest {
        replicate_batch::put_entry_field(12, more, false, buf);
    }
    if history {
        prost::encoding::encode_key(13, prost::encoding::WireType::Varint, buf);
        prost::encoding::encode_varint(1, buf);
    }
}

/// Rough encoded size of a record, used to cut batches and chunks.
pub fn wire_size(record: &Record) -> usize {
    let meta = record.entry.meta().map_or(0, |m| {
        m.author.len() + m.origin.len() + m.reason.as_deref().map_or(0, str::len) + 8
    });
    record.entry.size() + meta + 40
}

/// A `podcache.v1.ReplicateRequest` encoded straight from store records.
///
/// The fan-out sends every write to every peer; building `Entry` messages
/// first cost two allocations and two copies per record and peer (key and
/// value `String`s), plus the same again for each send attempt. This writes
/// the same bytes from the records themselves (shared, never copied). It
/// only encodes: the callee decodes a plain `ReplicateRequest` (the test
/// below checks that both encodings are the same bytes).
#[derive(Debug, Clone)]
pub struct ReplicateBatch {
    /// `ReplicateRequest.sender`.
    pub sender: Option<podcache::NodeInfo>,
    /// The records `range` of which are `ReplicateRequest.entries`: an
    /// epoch shared by every peer's send, never copied.
    pub records: std::sync::Arc<[Record]>,
    /// Which of `records` this request carries.
    pub range: std::ops::Range<usize>,
    /// `ReplicateRequest.more`.
    pub more: bool,
}

impl ReplicateBatch {
    /// The records this request carries.
    pub fn entries(&self) -> &[Record] {
        self.records.get(self.range.clone()).unwrap_or_default()
    }
}

impl Default for ReplicateBatch {
    fn default() -> Self {
        Self {
            sender: None,
            records: std::sync::Arc::from(Vec::new()),
            range: 0..0,
            more: false,
        }
    }
}

/// A message already encoded: sent as these bytes. Every link sending an
/// epoch sends the same requests; they are encoded once
/// ([`ReplicateBatch`] into bytes) and copied into each call's buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Preencoded(pub prost::bytes::Bytes);

impl prost::Message for Preencoded {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded (the callee decodes the message it stands for).
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

mod replicate_batch {
    use prost::bytes::{Buf, BufMut};
    use prost::encoding::{
        self, DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
    };

    use super::ReplicateBatch;
    use crate::store::Record;

    /// `ReplicateRequest` field numbers.
    const SENDER: u32 = 1;
    const ENTRIES: u32 = 2;
    const MORE: u32 = 3;

    /// The encoded length of a string field (omitted when empty, as proto3
    /// does for default values).
    fn string_len(tag: u32, text: &str) -> usize {
        if text.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(text.len() as u64) + text.len()
        }
    }

    fn put_string(tag: u32, text: &str, buf: &mut impl BufMut) {
        if !text.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(text.len() as u64, buf);
            buf.put_slice(text.as_bytes());
        }
    }

    fn varint_len(tag: u32, value: u64) -> usize {
        if value == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(value)
        }
    }

    fn put_varint(tag: u32, value: u64, buf: &mut impl BufMut) {
        if value != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(value, buf);
        }
    }

    /// The `Entry` fields of a record, numbered as in `podcache.proto`:
    /// type 1 (int32: negative numbers sign-extend to 64 bits), key 2,
    /// value 3, deleted 4, hlc 5, node 6, expires_at_ms 7, batch 11.
    fn varints(record: &Record) -> [(u32, u64); 6] {
        let version = record.entry.version();
        [
            (1, i64::from(record.ty) as u64),
            (4, u64::from(record.entry.is_tombstone())),
            (5, version.hlc),
            (6, version.node),
            (7, record.entry.expires_at_ms()),
            (11, u64::from(record.entry.in_batch())),
        ]
    }

    /// author 8, origin 9, reason 10.
    fn texts(record: &Record) -> [(u32, &str); 3] {
        match record.entry.meta() {
            None => [(8, ""), (9, ""), (10, "")],
            Some(m) => [
                (8, &m.author),
                (9, &m.origin),
                (10, m.reason.as_deref().unwrap_or_default()),
            ],
        }
    }

    /// `Entry.meta_as_previous`.
    const META_AS_PREVIOUS: u32 = 14;

    /// The fields of a `podcache.v1.Entry` message for `record`; with
    /// `as_previous`, its author, origin, reason and batch are left out
    /// and `meta_as_previous` is set (see [`super::same_meta`]).
    pub(super) fn encode_entry_fields(record: &Record, as_previous: bool, buf: &mut impl BufMut) {
        let (key, value) = record.entry.key_value();
        let [ty, deleted, hlc, node, expires, batch] = varints(record);
        put_varint(ty.0, ty.1, buf);
        put_string(2, key, buf);
        put_string(3, value.unwrap_or_default(), buf);
        for (tag, value) in [deleted, hlc, node, expires] {
            put_varint(tag, value, buf);
        }
        if as_previous {
            put_varint(META_AS_PREVIOUS, 1, buf);
            return;
        }
        for (tag, text) in texts(record) {
            put_string(tag, text, buf);
        }
        put_varint(batch.0, batch.1, buf);
    }

    pub(super) fn entry_len(record: &Record, as_previous: bool) -> usize {
        let (key, value) = record.entry.key_value();
        let [ty, deleted, hlc, node, expires, batch] = varints(record);
        let numbers: usize = [ty, deleted, hlc, node, expires]
            .iter()
            .map(|&(tag, value)| varint_len(tag, value))
            .sum();
        let meta = if as_previous {
            varint_len(META_AS_PREVIOUS, 1)
        } else {
            let texts: usize = texts(record)
                .iter()
                .map(|&(tag, text)| string_len(tag, text))
                .sum();
            texts + varint_len(batch.0, batch.1)
        };
        numbers + meta + string_len(2, key) + string_len(3, value.unwrap_or_default())
    }

    /// `record` as a nested `Entry` message in field `tag`.
    pub(super) fn put_entry_field(
        tag: u32,
        record: &Record,
        as_previous: bool,
        buf: &mut impl BufMut,
    ) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(entry_len(record, as_previous) as u64, buf);
        encode_entry_fields(record, as_previous, buf);
    }

    /// Each record with whether it names its writer as the one before it.
    fn with_previous(records: &[Record]) -> impl Iterator<Item = (&Record, bool)> {
        let mut previous = None;
        records.iter().map(move |record| {
            let as_previous = super::same_meta(record, previous);
            previous = Some(record);
            (record, as_previous)
        })
    }

    impl prost::Message for ReplicateBatch {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            if let Some(sender) = &self.sender {
                encoding::message::encode(SENDER, sender, buf);
            }
            for (record, as_previous) in with_previous(self.entries()) {
                put_entry_field(ENTRIES, record, as_previous, buf);
            }
            put_varint(MORE, u64::from(self.more), buf);
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            // Never decoded (the callee decodes `ReplicateRequest`).
            encoding::skip_field(wire_type, tag, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            let sender = self
                .sender
                .as_ref()
                .map_or(0, |s| encoding::message::encoded_len(SENDER, s));
            let entries: usize = with_previous(self.entries())
                .map(|(r, as_previous)| {
                    let len = entry_len(r, as_previous);
                    key_len(ENTRIES) + encoded_len_varint(len as u64) + len
                })
                .sum();
            sender + entries + varint_len(MORE, u64::from(self.more))
        }

        fn clear(&mut self) {
            *self = Self::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn a_replicate_batch_encodes_as_the_replicate_request_it_stands_for() {
        let records = [
            Record::new(
                1,
                "key",
                Some("value"),
                Version {
                    hlc: 7 << 16,
                    node: 9,
                },
                0,
            ),
            Record::new(
                -5,
                "gone",
                None,
                Version {
                    hlc: 1,
                    node: u64::MAX,
                },
                0,
            ),
            Record::new(
                0,
                "ключ",
                Some(""),
                Version { hlc: 0, node: 0 },
                1_700_000_000_000,
            ),
            Record::new(
                i32::MIN,
                "k",
                Some(&"v".repeat(300)),
                Version {
                    hlc: u64::MAX,
                    node: 1,
                },
                u64::MAX,
            ),
        ];
        // Writers: one batch's shared description, an equal one of its
        // own, another writer, and none between.
        let batch = Arc::new(Meta::new("ops", "pod-a", Some("rollout 7"), true));
        let with = |key: &str, meta: Option<Arc<Meta>>| Record {
            ty: 3,
            entry: Entry::with_meta(key, Some("x"), Version { hlc: 9, node: 2 }, 0, meta),
        };
        let records = [
            records.to_vec(),
            vec![
                with("b1", Some(batch.clone())),
                with("b2", Some(batch.clone())),
                with(
                    "b3",
                    Some(Arc::new(Meta::new("ops", "pod-a", Some("rollout 7"), true))),
                ),
                with(
                    "other",
                    Some(Arc::new(Meta::new("ci", "pod-b", None, false))),
                ),
                with("none", None),
                with("after-none", Some(batch.clone())),
            ],
        ]
        .concat();
        let sender = podcache::NodeInfo {
            node_id: 42,
            name: "pod-a".into(),
            grpc_addr: "10.0.0.1:9090".into(),
            started_at_ms: 1,
            pod_ip: "10.0.0.1".into(),
            host_ip: String::new(),
        };
        let shared: std::sync::Arc<[Record]> = records.to_vec().into();
        for (sender, more) in [(Some(sender), false), (None, true)] {
            for n in 0..=records.len() {
                let ours = ReplicateBatch {
                    sender: sender.clone(),
                    records: shared.clone(),
                    range: 0..n,
                    more,
                };
                let theirs = podcache::ReplicateRequest {
                    sender: sender.clone(),
                    entries: records_to_wire(&records[..n]),
                    more,
                };
                let bytes = ours.encode_to_vec();
                assert_eq!(bytes, theirs.encode_to_vec());
                let again = Preencoded(bytes.clone().into());
                assert_eq!(again.encode_to_vec(), bytes);
                assert_eq!(again.encoded_len(), bytes.len());
                assert_eq!(bytes.len(), ours.encoded_len());
                let decoded =
                    podcache::ReplicateRequest::decode(bytes.as_slice()).expect("decodes");
                let as_previous = decoded
                    .entries
                    .iter()
                    .filter(|e| e.meta_as_previous)
                    .count();
                assert_eq!(as_previous, n.saturating_sub(5).min(2), "b2 and b3 only");
                let back = records_from_wire(decoded.entries);
                assert_eq!(back, records[..n]);
                let metas: Vec<_> = back.iter().map(|r| r.entry.meta().cloned()).collect();
                let wanted: Vec<_> = records[..n]
                    .iter()
                    .map(|r| r.entry.meta().cloned())
                    .collect();
                assert_eq!(metas, wanted, "who wrote each entry comes back");
                for record in &records[..n] {
                    let mut bytes = Vec::new();
                    encode_entry(record, &mut bytes);
                    assert_eq!(bytes, record_to_wire(record).encode_to_vec());
                }
            }
        }
    }

    #[test]
    fn an_entry_as_its_previous_one_with_none_before_it_has_no_writer() {
        let entry = |key: &str, author: &str, as_previous: bool| podcache::Entry {
            r#type: 1,
            key: key.into(),
            value: "v".into(),
            hlc: 1,
            node: 1,
            author: author.into(),
            meta_as_previous: as_previous,
            ..Default::default()
        };
        let back = records_from_wire(vec![
            entry("first", "", true),
            entry("a", "ops", false),
            entry("b", "", true),
            entry("plain", "", false),
            entry("c", "", true),
        ]);
        let authors: Vec<Option<&str>> = back
            .iter()
            .map(|r| r.entry.meta().map(|m| &*m.author))
            .collect();
        assert_eq!(authors, [None, Some("ops"), Some("ops"), None, None]);
    }
}
