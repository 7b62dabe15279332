//! A batch body (`POST /v1/cache/{type}`): parsed, then written to a store
//! with small limits, all or nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podcache::store::{Limits, Store};

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
    let pairs: Vec<(&str, &str)> = entries.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let before = store.held_bytes();
    match store.set_many(1, pairs.iter().copied(), None, 1_700_000_000_000) {
        Ok(records) => assert_eq!(records.len(), pairs.len()),
        // Refused: nothing changed.
        Err(_) => assert_eq!(store.held_bytes(), before),
    }
});
