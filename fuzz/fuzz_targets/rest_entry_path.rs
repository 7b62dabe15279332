//! The entry endpoint's path: `/v1/cache/{type}/{key}` split, decoded and
//! checked, whatever the path holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    if let Some(Ok((_, key))) = podcache::api::fuzzing::entry_path(&path) {
        // A decoded key is a valid string the store can take or refuse.
        let store = podcache::store::Store::new(1, Default::default());
        let _ = store.set(1, &key, "v", None, 1_700_000_000_000);
    }
});
