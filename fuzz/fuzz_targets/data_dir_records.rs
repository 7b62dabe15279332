//! The records of a data directory file (after its magic): whatever the
//! bytes, reading ends clean, at a torn tail, or at damage, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (records, _end) = podcache::durability::fuzz_read_records(data);
    for record in records {
        assert!(!record.key().is_empty());
    }
});
