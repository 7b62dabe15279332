//! Generated protobuf and gRPC code, and conversions between wire messages
//! and store records.
//!
//! Owns: the mapping of [`Record`] to `podcache.v1.Entry` and back,
//! including validation of what arrives (a wire entry becomes a record only
//! through [`record_from_wire`]).

#![allow(missing_docs, unreachable_pub, clippy::all)]

use crate::store::{Record, Version};

/// The original `hellorpc` package, generated from `proto/hellorpc.proto`.
pub mod hellorpc {
    tonic::include_proto!("hellorpc");
}

/// podcache's own additions, generated from `proto/podcache.proto`.
pub mod podcache {
    tonic::include_proto!("podcache.v1");
}

/// The subset of etcd's v3 API that podcache calls (client only), generated
/// from `proto/etcd/rpc.proto`.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// The subset of Kubernetes' Pod storage encoding that podcache reads,
/// generated from `proto/k8s/pod.proto`.
pub mod k8s {
    tonic::include_proto!("k8s.podcache");
}

/// The encoded descriptors of podcache's own files, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("podcache_descriptor");

/// A record as a wire entry.
pub fn record_to_wire(record: &Record) -> podcache::Entry {
    podcache::Entry {
        r#type: record.ty,
        key: record.key().to_owned(),
        value: record.entry.value().unwrap_or_default().to_owned(),
        deleted: record.entry.is_tombstone(),
        hlc: record.entry.version().hlc,
        node: record.entry.version().node,
        expires_at_ms: record.entry.expires_at_ms(),
    }
}

/// A wire entry as a record. Limits are checked by the store when it merges.
pub fn record_from_wire(entry: podcache::Entry) -> Record {
    Record::new(
        entry.r#type,
        &entry.key,
        (!entry.deleted).then_some(entry.value.as_str()),
        Version {
            hlc: entry.hlc,
            node: entry.node,
        },
        entry.expires_at_ms,
    )
}

/// Rough encoded size of a record, used to cut batches and chunks.
pub fn wire_size(record: &Record) -> usize {
    record.entry.size() + 40
}
