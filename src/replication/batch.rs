//! Cutting an epoch into requests of bounded size.
//!
//! Owns: where one request ends and the next begins. Must not touch the
//! wire: [`crate::proto::wire_size`] is the estimate of a record's encoded
//! size, and the gRPC message limit (twice the batch size at least, see
//! `NodeConfig::validate`) leaves room for the estimate's error.

use std::ops::Range;

use crate::proto::wire_size;
use crate::store::Record;

/// Consecutive ranges covering `records`, each of at most `max_bytes` by
/// [`wire_size`], except that a record larger than that stands alone. No
/// range is empty; an empty epoch gives none.
pub(crate) fn cut(records: &[Record], max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, record) in records.iter().enumerate() {
        let size = wire_size(record);
        if i > start && bytes + size > max_bytes {
            ranges.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < records.len() {
        ranges.push(start..records.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::Version;

    fn record(value_len: usize) -> Record {
        Record::new(
            1,
            "k",
            Some(&"v".repeat(value_len)),
            Version { hlc: 1, node: 1 },
            0,
        )
    }

    #[test]
    fn small_records_share_a_request_and_a_big_one_stands_alone() {
        let records = [record(10), record(10), record(1000), record(10)];
        let one = wire_size(&records[0]);
        assert_eq!(cut(&records, 2 * one), vec![0..2, 2..3, 3..4]);
        assert_eq!(cut(&records, usize::MAX), vec![0..4]);
        assert!(cut(&[], 100).is_empty());
    }

    proptest! {
        #[test]
        fn ranges_cover_everything_in_order_within_the_limit(
            sizes in proptest::collection::vec(0usize..500, 0..60),
            max in 50usize..2000,
        ) {
            let records: Vec<Record> = sizes.iter().map(|&n| record(n)).collect();
            let ranges = cut(&records, max);
            let mut next = 0;
            for range in &ranges {
                prop_assert_eq!(range.start, next);
                prop_assert!(range.end > range.start);
                let bytes: usize = records[range.clone()].iter().map(wire_size).sum();
                prop_assert!(bytes <= max || range.len() == 1);
                next = range.end;
            }
            prop_assert_eq!(next, records.len());
        }
    }
}
