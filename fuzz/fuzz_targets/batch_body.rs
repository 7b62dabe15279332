//! A batch body (`POST /v1/cache/{type}`): parsed, then written to a store
//! with small limits, all or nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podcache::store::{Change, Limits, Record, Store};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = podcache::api::fuzzing::batch(data) else {
        return;
    };
    let store = Store::new(
        1,
        Limits {
            max_key_bytes: 64,
            max_value_bytes: 256,
            max_batch_entries: 100,
            max_total_bytes: 4096,
            ..Limits::default()
        },
    );
    let pairs: Vec<(&str, Option<&str>)> = entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    let before = store.held_bytes();
    let change = Change::Batch {
        ty: 1,
        entries: &pairs,
        ttl_secs: None,
    };
    let hook = |_: &[Record]| Ok::<_, ()>(());
    match store.commit(change, 1_700_000_000_000, None, hook) {
        Ok(records) => {
            assert_eq!(records.len(), pairs.len());
            // One batch, one version.
            assert!(records
                .iter()
                .all(|r| r.entry.version() == records[0].entry.version()));
        }
        // Refused: nothing changed.
        Err(_) => assert_eq!(store.held_bytes(), before),
    }
});
