//! A peer's `ReplicateRequest`: decoded, its entries merged into a store
//! with small limits. The merge must never panic, and two stores that merge
//! the same entries in another order end with the same digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podcache::proto::{podcache::ReplicateRequest, record_from_wire};
use podcache::store::{Limits, Store};
use prost::Message;

const NOW: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = ReplicateRequest::decode(data) else {
        return;
    };
    let limits = Limits {
        max_key_bytes: 64,
        max_value_bytes: 256,
        max_total_bytes: 1 << 16,
        max_types: 8,
        ..Limits::default()
    };
    let records: Vec<_> = request.entries.into_iter().map(record_from_wire).collect();
    let forward = Store::new(1, limits.clone());
    forward.merge(records.clone(), NOW);
    let backward = Store::new(2, limits);
    backward.merge(records.into_iter().rev(), NOW);
    // Limits may refuse different records in another order only when the
    // store fills up; below the limits both orders agree.
    if forward.held_bytes() < 1 << 15 && backward.held_bytes() < 1 << 15 {
        assert_eq!(forward.digest(), backward.digest());
    }
});
