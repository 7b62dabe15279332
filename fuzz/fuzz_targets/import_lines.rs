//! An import file (`ctl import`, `POST /v1/import`): JSON lines checked
//! before anything is merged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = podcache::api::fuzzing::import(data) {
        let store = podcache::store::Store::new(1, Default::default());
        store.merge(records, 1_700_000_000_000);
    }
});
