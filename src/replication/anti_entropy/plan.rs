//! Anti-entropy's decisions, apart from the calls: which buckets to repair
//! after two digest comparisons, and how to group them into requests.
//!
//! Owns: the busy-bucket rule and the grouping. Must not touch the network
//! or the store. Repairs always go both ways (the caller sends its entries
//! of a bucket, the peer answers with its newer or missing ones), so the
//! plan names buckets, not directions.
//!
//! Writes still on their way through fan-out make digests differ for a
//! moment, so the digests are compared twice, a settle time apart, and only
//! buckets that differed both times and did not change on either side in
//! between are repaired: a bucket that kept changing is being written, and
//! fan-out is delivering it. Under constant write load that can be every
//! bucket (with a 100,000-key state at tens of thousands of writes per
//! second, repairing them all each round took half the writer's CPU in the
//! profile), so busy buckets are repaired only every
//! [`BUSY_ROUNDS_BEFORE_REPAIRING_ALL`]th round in a row that found some.

use std::collections::HashSet;
use std::ops::Range;

use crate::store::digest;

/// After this many rounds in a row that skipped busy buckets, a round
/// repairs them anyway: this bounds how long a real difference can hide
/// (about a minute at the default interval).
pub(crate) const BUSY_ROUNDS_BEFORE_REPAIRING_ALL: u32 = 6;

/// Buckets repaired in one request at most.
pub(crate) const BUCKETS_PER_REPAIR: usize = 16;

/// The peers a round compares digests with: `k` of the `n` peers (sorted),
/// a window that moves on by `k` each round from an offset of this node's
/// own, so the cost of a round does not grow with the cluster, and every
/// peer is a partner at least once in every `ceil(n / k)` rounds in a row.
/// Returns indexes into the sorted peers.
pub(crate) fn partners(n: usize, k: usize, offset: u64, round: u64) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let start = (offset.wrapping_add(round.wrapping_mul(k as u64)) % n as u64) as usize;
    (0..k).map(|i| (start + i) % n).collect()
}

/// Two digests, this node's and the peer's, taken at the same moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Comparison<'a> {
    pub(crate) mine: &'a [u64],
    pub(crate) theirs: &'a [u64],
}

/// What a round repairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Buckets to repair, ascending.
    pub(crate) repair: Vec<u32>,
    /// Buckets that kept changing were left to fan-out and a later round:
    /// the round does not prove the two nodes in sync.
    pub(crate) left_busy: bool,
    /// The count of busy rounds in a row after this one.
    pub(crate) busy_rounds: u32,
}

/// The plan after comparing `before` and, a settle time later, `after`,
/// given how many rounds in a row left busy buckets before this one.
pub(crate) fn plan(before: Comparison<'_>, after: Comparison<'_>, busy_rounds: u32) -> Plan {
    let first: HashSet<u32> = digest::differing(before.mine, before.theirs)
        .into_iter()
        .collect();
    let both: Vec<u32> = digest::differing(after.mine, after.theirs)
        .into_iter()
        .filter(|b| first.contains(b))
        .collect();
    let quiet = |b: &u32| {
        let i = *b as usize;
        before.mine.get(i) == after.mine.get(i) && before.theirs.get(i) == after.theirs.get(i)
    };
    let busy = both.iter().filter(|b| !quiet(b)).count();
    if busy == 0 || busy_rounds + 1 >= BUSY_ROUNDS_BEFORE_REPAIRING_ALL {
        return Plan {
            repair: both,
            left_busy: false,
            busy_rounds: 0,
        };
    }
    Plan {
        repair: both.into_iter().filter(quiet).collect(),
        left_busy: true,
        busy_rounds: busy_rounds + 1,
    }
}

/// Groups buckets, given with the bytes of their entries, into requests of
/// at most [`BUCKETS_PER_REPAIR`] buckets and about `max_bytes` (a bucket
/// larger than that goes alone). Ranges index `sizes`.
pub(crate) fn group(sizes: &[usize], max_bytes: usize) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start == BUCKETS_PER_REPAIR || bytes + size > max_bytes) {
            groups.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        groups.push(start..sizes.len());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp<'a>(mine: &'a [u64], theirs: &'a [u64]) -> Comparison<'a> {
        Comparison { mine, theirs }
    }

    #[test]
    fn only_buckets_that_differed_twice_and_stayed_still_are_repaired() {
        let before = cmp(&[1, 2, 3, 4], &[1, 9, 8, 4]);
        // Bucket 1 still differs and stayed still; bucket 2 converged;
        // bucket 3 started differing only now.
        let after = cmp(&[1, 2, 3, 5], &[1, 9, 3, 4]);
        assert_eq!(
            plan(before, after, 0),
            Plan {
                repair: vec![1],
                left_busy: false,
                busy_rounds: 0
            }
        );
    }

    #[test]
    fn busy_buckets_wait_for_fan_out_until_the_sixth_round_in_a_row() {
        let before = cmp(&[1, 2], &[5, 6]);
        // Bucket 0 stayed still; bucket 1 changed on my side.
        let after = cmp(&[1, 3], &[5, 6]);
        let mut rounds = 0;
        for round in 1..BUSY_ROUNDS_BEFORE_REPAIRING_ALL {
            let p = plan(before, after, rounds);
            assert_eq!(p.repair, vec![0], "round {round}");
            assert!(p.left_busy);
            rounds = p.busy_rounds;
        }
        let p = plan(before, after, rounds);
        assert_eq!(p.repair, vec![0, 1]);
        assert!(!p.left_busy);
        assert_eq!(p.busy_rounds, 0);
    }

    #[test]
    fn digests_of_different_sizes_repair_everything() {
        let p = plan(cmp(&[1], &[1, 2]), cmp(&[1], &[1, 2]), 0);
        assert_eq!(p.repair, vec![0, 1]);
    }

    #[test]
    fn every_peer_is_a_partner_within_ceil_n_over_k_rounds() {
        for n in [1usize, 2, 3, 4, 7, 12, 99] {
            for k in [1usize, 2, 3, 5] {
                let rounds = n.div_ceil(k) as u64;
                for offset in [0u64, 7, 123_456_789] {
                    for first in [0u64, 5, 1000] {
                        let mut seen = vec![false; n];
                        for round in first..first + rounds {
                            let p = partners(n, k, offset, round);
                            assert_eq!(p.len(), n.min(k));
                            for i in p {
                                seen[i] = true;
                            }
                        }
                        assert!(
                            seen.iter().all(|s| *s),
                            "n={n} k={k} offset={offset} first={first}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn groups_respect_both_bounds() {
        assert_eq!(group(&[10; 40], 1_000_000), vec![0..16, 16..32, 32..40]);
        assert_eq!(
            group(&[600, 600, 10, 5000, 1], 1000),
            vec![0..1, 1..3, 3..4, 4..5]
        );
        assert!(group(&[], 10).is_empty());
    }
}
