//! Unit and property tests of the store: merge rule, tombstones, TTL, limits.

use super::clock::hlc_from_ms;
use super::*;
use proptest::prelude::*;

const NOW: u64 = 1_700_000_000_000;

fn store(node: u64) -> Store {
    Store::new(node, Limits::default())
}

fn record(ty: i32, key: &str, value: Option<&str>, hlc_ms: u64, node: u64) -> Record {
    Record::new(
        ty,
        key,
        value,
        Version {
            hlc: hlc_from_ms(hlc_ms),
            node,
        },
        0,
    )
}

/// The live entries of one namespace as key → value.
fn listing(s: &Store, ty: i32, now_ms: u64) -> std::collections::BTreeMap<String, String> {
    s.namespace_pairs(ty, now_ms).collect()
}

fn sorted(mut records: Vec<Record>) -> Vec<Record> {
    records.sort_by(|a, b| (a.ty, a.key()).cmp(&(b.ty, b.key())));
    records
}

#[test]
fn a_local_write_is_readable_and_versioned_by_this_node() {
    let s = store(7);
    let r = s.set(1, "k", "v", None, NOW).expect("valid write");
    assert_eq!(r.entry.version().node, 7);
    let got = s.get(1, "k", NOW).expect("present");
    assert_eq!(got.value(), Some("v"));
    assert_eq!(got.version(), r.entry.version());
    assert!(s.get(2, "k", NOW).is_none(), "other namespace is separate");
}

#[test]
fn later_local_writes_get_larger_versions() {
    let s = store(1);
    let a = s.set(1, "k", "a", None, NOW).expect("write");
    let b = s.set(1, "k", "b", None, NOW).expect("write");
    assert!(b.entry.version() > a.entry.version());
    assert_eq!(
        s.get(1, "k", NOW)
            .and_then(|e| e.value().map(str::to_owned))
            .as_deref(),
        Some("b")
    );
}

#[test]
fn merge_keeps_the_higher_version_and_ties_break_on_node_id() {
    let s = store(1);
    let out = s.merge([record(1, "k", Some("old"), 10, 9)], NOW);
    assert_eq!(out.applied.len(), 1);
    let out = s.merge([record(1, "k", Some("older"), 9, 99)], NOW);
    assert_eq!((out.applied.len(), out.stale), (0, 1));
    let out = s.merge([record(1, "k", Some("tie-higher-node"), 10, 10)], NOW);
    assert_eq!(out.applied.len(), 1);
    let out = s.merge([record(1, "k", Some("tie-lower-node"), 10, 3)], NOW);
    assert_eq!(out.stale, 1);
    assert_eq!(
        s.get(1, "k", NOW)
            .and_then(|e| e.value().map(str::to_owned))
            .as_deref(),
        Some("tie-higher-node")
    );
}

#[test]
fn delete_writes_a_tombstone_that_beats_older_writes() {
    let s = store(1);
    s.set(1, "k", "v", None, NOW).expect("write");
    let tomb = s.delete(1, "k", NOW).expect("valid").expect("was present");
    assert!(tomb.entry.is_tombstone());
    assert!(s.get(1, "k", NOW).is_none());
    assert!(
        s.delete(1, "k", NOW).expect("valid").is_none(),
        "second delete finds nothing"
    );
    // An older write arriving late does not resurrect the key.
    let out = s.merge([record(1, "k", Some("late"), NOW - 5, 2)], NOW);
    assert_eq!(out.stale, 1);
    assert!(s.get(1, "k", NOW).is_none());
    // The tombstone travels in snapshots.
    assert!(
        s.snapshot()
            .iter()
            .any(|r| r.key() == "k" && r.entry.is_tombstone())
    );
}

#[test]
fn ttl_entries_vanish_at_their_expiry_on_every_replica() {
    let a = store(1);
    let b = store(2);
    let r = a.set(1, "k", "v", Some(5), NOW).expect("write");
    assert_eq!(r.entry.expires_at_ms(), NOW + 5_000);
    b.merge([r], NOW + 1);
    for s in [&a, &b] {
        assert!(s.get(1, "k", NOW + 4_999).is_some());
        assert!(s.get(1, "k", NOW + 5_000).is_none());
        assert!(listing(s, 1, NOW + 5_000).is_empty());
    }
    assert!(a.delete(1, "k", NOW + 6_000).expect("valid").is_none());
    assert_eq!(a.purge(NOW + 6_000, 10_000), 0, "kept during grace");
    assert_eq!(a.purge(NOW + 16_000, 10_000), 1);
}

#[test]
fn limits_refuse_bad_writes_and_change_nothing() {
    let s = Store::new(
        1,
        Limits {
            max_key_bytes: 4,
            max_value_bytes: 8,
            max_batch_entries: 2,
            ..Limits::default()
        },
    );
    s.set(1, "keep", "kept", None, NOW).expect("valid");
    assert_eq!(s.set(1, "", "v", None, NOW), Err(StoreError::EmptyKey));
    assert!(matches!(
        s.set(1, "toolong", "v", None, NOW),
        Err(StoreError::KeyTooLong { .. })
    ));
    assert!(matches!(
        s.set(1, "keep", "123456789", None, NOW),
        Err(StoreError::ValueTooLarge { .. })
    ));
    assert!(matches!(
        s.set(1, "keep", "v", Some(0), NOW),
        Err(StoreError::BadTtl { .. })
    ));
    // A batch with one bad entry stores none of them.
    let batch = [("a", "1"), ("keep", "123456789")];
    assert!(s.set_many(1, batch.into_iter(), None, NOW).is_err());
    let too_many = [("a", "1"), ("b", "2"), ("c", "3")];
    assert!(matches!(
        s.set_many(1, too_many.into_iter(), None, NOW),
        Err(StoreError::BatchTooLarge { len: 3, limit: 2 })
    ));
    let ns = listing(&s, 1, NOW);
    assert_eq!(ns.len(), 1);
    assert_eq!(ns.get("keep").map(String::as_str), Some("kept"));
}

#[test]
fn remote_records_over_a_limit_or_from_the_far_future_are_rejected_alone() {
    let s = store(1);
    let future = record(1, "f", Some("x"), NOW + 61_000, 2);
    let empty = record(1, "", Some("x"), NOW, 2);
    let good = record(1, "g", Some("x"), NOW, 2);
    let out = s.merge([future, empty, good], NOW);
    assert_eq!(out.applied.len(), 1);
    assert_eq!(out.rejected.len(), 2);
    assert!(matches!(out.rejected[0], StoreError::ClockSkew(_)));
    assert!(s.get(1, "f", NOW).is_none());
    // The refused future timestamp did not drag the clock forward.
    assert!(
        s.set(1, "n", "v", None, NOW)
            .expect("write")
            .entry
            .version()
            .hlc
            < hlc_from_ms(NOW + 1)
    );
}

#[test]
fn unversioned_writes_are_stamped_after_everything_seen() {
    let s = store(1);
    // A peer's entry from a clock ahead of this one (within the drift).
    s.merge([record(1, "k", Some("peer"), NOW + 500, 2)], NOW);
    let out = s
        .apply_unversioned(1, &[("k", "legacy"), ("j", "legacy")], NOW)
        .expect("valid");
    assert_eq!(out.len(), 2);
    for key in ["k", "j"] {
        assert_eq!(
            s.get(1, key, NOW)
                .and_then(|e| e.value().map(str::to_owned))
                .as_deref(),
            Some("legacy")
        );
    }
    assert!(out[0].entry.version() > record(1, "k", None, NOW + 500, 2).entry.version());
}

#[test]
fn a_refusing_hook_leaves_the_store_unchanged() {
    let s = store(1);
    let refused = s.commit(
        Change::Set {
            ty: 1,
            key: "k",
            value: "v",
            ttl_secs: None,
        },
        NOW,
        None,
        |records: &[Record]| {
            assert_eq!(records.len(), 1);
            Err("disk full")
        },
    );
    assert_eq!(refused, Err(Refused::Hook("disk full")));
    assert!(s.get(1, "k", NOW).is_none());
    assert_eq!(s.held_bytes(), 0);
    s.set(1, "k", "v", None, NOW).expect("set");
    let refused = s.commit(Change::Delete { ty: 1, key: "k" }, NOW, None, |_| Err(()));
    assert_eq!(refused, Err(Refused::Hook(())));
    assert!(s.get(1, "k", NOW).is_some(), "the delete was not applied");
}

#[test]
fn loading_keeps_what_was_stored_past_lowered_limits_and_drops_old_tombstones() {
    let s = Store::new(
        1,
        Limits {
            max_entries_per_type: 1,
            ..Limits::default()
        },
    );
    let kept = s.load(
        [
            record(1, "a", Some("1"), NOW, 2),
            record(1, "b", Some("2"), NOW, 2),
            record(1, "gone", None, NOW - 10_000, 2),
        ],
        NOW,
        NOW - 5_000,
    );
    assert_eq!(kept, 2);
    assert!(s.get(1, "b", NOW).is_some());
    assert_eq!(s.stats(NOW)[&1].tombstones, 0);
}

/// A deleted (or expired) value does not come back from the files once
/// its tombstone is past the grace: the records are merged by version
/// first, whatever order the files hold them in, and purged after.
#[test]
fn loading_merges_every_record_before_it_purges() {
    let old = record(1, "flag", Some("on"), NOW - 20_000, 2);
    let tombstone = record(1, "flag", None, NOW - 10_000, 2);
    let overwritten = record(1, "ttl", Some("plain"), NOW - 20_000, 2);
    let mut expired = record(1, "ttl", Some("short-lived"), NOW - 10_000, 2);
    expired.entry = Entry::new(
        "ttl",
        Some("short-lived"),
        expired.entry.version(),
        NOW - 9_000,
    );
    for order in [
        vec![
            old.clone(),
            tombstone.clone(),
            overwritten.clone(),
            expired.clone(),
        ],
        vec![
            tombstone.clone(),
            old.clone(),
            expired.clone(),
            overwritten.clone(),
        ],
    ] {
        let s = store(1);
        assert_eq!(s.load(order, NOW, NOW - 5_000), 0);
        assert!(
            s.get(1, "flag", NOW).is_none(),
            "the deleted flag stays deleted"
        );
        assert!(
            s.get(1, "ttl", NOW).is_none(),
            "the overwritten value stays gone"
        );
    }
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        0..3i32,
        prop::sample::select(vec!["a", "b", "c", "d"]),
        prop::option::of("[a-z]{0,3}"),
        0..20u64,
        1..4u64,
    )
        .prop_map(|(ty, key, value, ms, node)| record(ty, key, value.as_deref(), NOW + ms, node))
}

/// Distinct versions per (type, key): a node never issues one version twice.
fn arb_history() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec(arb_record(), 0..40).prop_map(|records| {
        let mut seen = std::collections::HashSet::new();
        records
            .into_iter()
            .filter(|r| seen.insert((r.ty, r.key().to_owned(), r.entry.version())))
            .collect()
    })
}

proptest! {
    #[test]
    fn any_order_of_the_same_merges_gives_the_same_state(
        (history, shuffled) in arb_history().prop_flat_map(|h| (Just(h.clone()), Just(h).prop_shuffle()))
    ) {
        let a = store(100);
        let b = store(200);
        a.merge(history, NOW);
        // b receives the records one at a time, in another order, twice.
        for r in shuffled.iter().chain(shuffled.iter()) {
            b.merge([r.clone()], NOW);
        }
        prop_assert_eq!(sorted(a.snapshot()), sorted(b.snapshot()));
    }

    #[test]
    fn the_survivor_of_each_key_is_its_highest_version(history in arb_history()) {
        let s = store(100);
        s.merge(history.clone(), NOW);
        for r in s.snapshot() {
            let max = history
                .iter()
                .filter(|h| h.ty == r.ty && h.key() == r.key())
                .map(|h| h.entry.version())
                .max();
            prop_assert_eq!(Some(r.entry.version()), max);
        }
    }
}

#[test]
fn digests_match_exactly_when_states_match() {
    let a = store(1);
    let b = store(2);
    assert_eq!(a.digest(), b.digest());
    let r = a.set(1, "k", "v", None, NOW).expect("write");
    assert_ne!(a.digest(), b.digest());
    let differing = digest::differing(&a.digest(), &b.digest());
    assert_eq!(differing, vec![digest::bucket_of(1, b"k") as u32]);
    assert_eq!(a.bucket_records(&differing), vec![r.clone()]);
    b.merge([r], NOW);
    assert_eq!(a.digest(), b.digest());
    // A tombstone is a change of state too.
    let t = a.delete(1, "k", NOW).expect("valid").expect("present");
    assert_ne!(a.digest(), b.digest());
    b.merge([t], NOW);
    assert_eq!(digest::root(&a.digest()), digest::root(&b.digest()));
}

#[test]
fn purge_drops_old_tombstones_and_expired_entries_and_refuses_them_back() {
    let s = store(1);
    s.set(1, "live", "v", None, NOW).expect("write");
    s.set(1, "ttl", "v", Some(1), NOW).expect("write");
    let tomb = {
        s.set(1, "gone", "v", None, NOW).expect("write");
        s.delete(1, "gone", NOW).expect("valid").expect("present")
    };
    assert_eq!(s.purge(NOW + 500, 1_000), 0, "nothing is old enough yet");
    assert_eq!(s.purge(NOW + 10_000, 1_000), 2);
    assert_eq!(s.snapshot().len(), 1);
    let before = s.digest();
    // The same tombstone arriving late from a slow peer is not taken back.
    let out = s.merge_with_horizon([tomb], NOW + 10_000, NOW + 9_000);
    assert_eq!((out.applied.len(), out.stale), (0, 1));
    assert_eq!(s.digest(), before);
}

#[test]
fn a_full_resync_drops_old_entries_the_peer_no_longer_has() {
    let s = store(1);
    s.merge(
        [record(
            1,
            "deleted-elsewhere",
            Some("old"),
            NOW - 100_000,
            2,
        )],
        NOW,
    );
    s.merge([record(1, "kept", Some("old"), NOW - 100_000, 2)], NOW);
    s.merge(
        [record(1, "written-while-away", Some("new"), NOW - 10, 2)],
        NOW,
    );
    let keep: std::collections::HashSet<(i32, &str)> = [(1, "kept")].into();
    let spare = |e: &Entry| e.version().hlc >= hlc_from_ms(NOW - 50_000);
    let dropped = s.drop_absent(&keep, spare);
    assert_eq!(dropped.len(), 1);
    assert!(dropped[0].entry.is_tombstone(), "a delete event's record");
    let ns = listing(&s, 1, NOW);
    assert!(ns.contains_key("kept") && ns.contains_key("written-while-away"));
    assert!(!ns.contains_key("deleted-elsewhere"));
}

proptest! {
    #[test]
    fn any_order_of_the_same_merges_gives_the_same_digest(
        (history, shuffled) in arb_history().prop_flat_map(|h| (Just(h.clone()), Just(h).prop_shuffle()))
    ) {
        let a = store(100);
        let b = store(200);
        a.merge(history, NOW);
        b.merge(shuffled, NOW);
        prop_assert_eq!(a.digest(), b.digest());
    }
}

fn small_store(entries: usize, bytes: usize) -> Store {
    Store::new(
        1,
        Limits {
            max_entries_per_type: entries,
            max_total_bytes: bytes,
            ..Limits::default()
        },
    )
}

#[test]
fn a_local_write_past_the_entry_limit_is_refused_and_changes_nothing() {
    let s = small_store(3, 1 << 20);
    s.set_many(
        1,
        [("a", "1"), ("b", "2"), ("c", "3")].into_iter(),
        None,
        NOW,
    )
    .expect("fits exactly");
    let before = s.snapshot();
    let err = s.set(1, "d", "4", None, NOW).expect_err("a fourth key");
    assert!(matches!(err, StoreError::Full { .. }), "{err}");
    let err = s
        .set_many(1, [("a", "x"), ("e", "5")].into_iter(), None, NOW)
        .expect_err("all or nothing");
    assert!(matches!(err, StoreError::Full { .. }));
    assert_eq!(sorted(s.snapshot()), sorted(before), "nothing changed");
    // Overwriting held keys and other types still works; a delete frees a place.
    s.set(1, "a", "updated", None, NOW).expect("overwrite");
    s.set(2, "z", "other type", None, NOW).expect("other type");
    s.delete(1, "b", NOW).expect("delete");
    s.set(1, "d", "4", None, NOW + 1)
        .expect("room after delete");
}

#[test]
fn a_local_write_past_the_byte_limit_is_refused_and_peers_get_headroom() {
    let s = small_store(1_000, 10);
    s.set(1, "k", "12345", None, NOW).expect("6 bytes");
    let err = s.set(1, "k2", "12345", None, NOW).expect_err("13 bytes");
    assert!(
        err.to_string()
            .contains("bytes held would be 13, the limit is 10"),
        "{err}"
    );
    assert_eq!(s.held_bytes(), 6);
    // A shrinking overwrite is fine even when full.
    s.set(1, "k", "1", None, NOW).expect("shrinks");
    // A peer may take the store up to PEER_HEADROOM times the limit, no further.
    let outcome = s.merge(
        [
            record(1, "p1", Some("123456789"), NOW, 9),
            record(1, "p2", Some("123456789"), NOW, 9),
        ],
        NOW,
    );
    assert_eq!(outcome.applied.len(), 1, "{:?}", outcome.rejected);
    assert!(matches!(outcome.rejected[0], StoreError::Full { .. }));
    assert_eq!(s.held_bytes(), 2 + 11);
    // The legacy Set is a client write: no headroom, all or nothing.
    let err = s
        .apply_unversioned(1, &[("x", "y")], NOW)
        .expect_err("over the limit");
    assert!(matches!(err, StoreError::Full { .. }));
}

proptest! {
    #[test]
    fn held_bytes_always_equal_the_sum_over_held_entries(history in arb_history(), deletes in prop::collection::vec((0..3i32, prop::sample::select(vec!["a", "b", "c", "d"])), 0..8)) {
        let s = store(100);
        s.merge(history, NOW);
        for (ty, key) in deletes {
            let _ = s.delete(ty, key, NOW + 30);
        }
        s.purge(NOW + 25, 0);
        let expected: usize = s
            .snapshot()
            .iter()
            .map(|r| r.key().len() + r.entry.value().map_or(0, str::len))
            .sum();
        prop_assert_eq!(s.held_bytes(), expected);
    }
}

#[test]
fn version_text_is_ms_dot_logical_at_sixteen_hex_digits() {
    let samples = [
        Version { hlc: 0, node: 0 },
        Version {
            hlc: 1_764_222_930_123 << 16 | 7,
            node: 0x9f3a,
        },
        Version {
            hlc: u64::MAX,
            node: u64::MAX,
        },
        Version {
            hlc: 65_535,
            node: 1 << 63,
        },
    ];
    for v in samples {
        let expected = format!(
            "{}.{}@{:016x}",
            clock::hlc_ms(v.hlc),
            clock::hlc_logical(v.hlc),
            v.node
        );
        assert_eq!(v.text().as_str(), expected);
        assert_eq!(v.to_string(), expected);
    }
}

#[test]
fn a_refused_merge_into_a_new_namespace_leaves_no_trace() {
    let s = small_store(1_000, 10);
    let outcome = s.merge(
        [record(7, "big", Some("0123456789abcdefghij"), NOW, 9)],
        NOW,
    );
    assert!(matches!(outcome.rejected[..], [StoreError::Full { .. }]));
    assert!(outcome.applied.is_empty());
    assert!(s.types().is_empty(), "{:?}", s.types());
    assert_eq!(s.held_bytes(), 0);
    let digest_of_empty = store(1).digest();
    assert_eq!(s.digest(), digest_of_empty);
}

#[test]
fn types_past_the_cap_are_refused_locally_and_taken_from_peers_up_to_twice_it() {
    let s = Store::new(
        1,
        Limits {
            max_types: 2,
            ..Limits::default()
        },
    );
    s.set(1, "k", "v", None, NOW).expect("type 1");
    s.set(2, "k", "v", None, NOW).expect("type 2");
    let err = s.set(3, "k", "v", None, NOW).expect_err("type 3");
    assert!(
        matches!(err, StoreError::Full { .. }) && err.to_string().contains("--max-types"),
        "{err}"
    );
    s.set(1, "other", "v", None, NOW).expect("an existing type");
    let outcome = s.merge(
        [
            record(3, "k", Some("v"), NOW, 2),
            record(4, "k", Some("v"), NOW, 2),
            record(5, "k", Some("v"), NOW, 2),
        ],
        NOW,
    );
    assert_eq!(outcome.applied.len(), 2, "peers get twice the cap");
    assert_eq!(outcome.rejected.len(), 1);
}

/// Found by the `replicate_request` fuzz target: two different entries of
/// one key with the same version (a faulty peer's) left replicas holding
/// whichever came first.
#[test]
fn entries_of_equal_versions_merge_to_the_same_one_in_any_order() {
    let version = Version {
        hlc: 5 << 16,
        node: 9,
    };
    let records = [
        Record::new(1, "k", Some("a"), version, 0),
        Record::new(1, "k", Some("b"), version, 0),
        Record::new(1, "k", None, version, 0),
        Record::new(1, "k", Some("b"), version, NOW + 1000),
    ];
    let mut ends = Vec::new();
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
        let s = store(1);
        s.merge(order.iter().map(|&i| records[i].clone()), NOW);
        ends.push((s.digest(), s.snapshot()));
    }
    assert!(ends.windows(2).all(|w| w[0] == w[1]), "{ends:?}");
    assert!(
        ends[0].1[0].entry.is_tombstone(),
        "a tombstone wins the tie"
    );
}

#[test]
fn a_batch_shares_one_version_and_may_delete() {
    let s = store(1);
    s.set(1, "gone", "x", None, NOW).expect("set");
    let records = s
        .commit(
            Change::Batch {
                ty: 1,
                entries: &[("a", Some("1")), ("gone", None), ("never", None)],
                ttl_secs: Some(60),
            },
            NOW,
            None,
            |_: &[Record]| Ok::<_, ()>(()),
        )
        .expect("batch");
    assert_eq!(records.len(), 3);
    assert!(
        records
            .iter()
            .all(|r| r.entry.version() == records[0].entry.version())
    );
    assert!(s.get(1, "gone", NOW).is_none());
    assert!(records[1].entry.is_tombstone() && records[1].entry.expires_at_ms() == 0);
    assert!(
        records[0].entry.expires_at_ms() > NOW,
        "the ttl is the values'"
    );
    // A key named twice in one batch keeps its last value, once.
    let records = s
        .commit(
            Change::Batch {
                ty: 1,
                entries: &[("d", Some("first")), ("e", Some("x")), ("d", Some("last"))],
                ttl_secs: None,
            },
            NOW,
            None,
            |_: &[Record]| Ok::<_, ()>(()),
        )
        .expect("batch");
    let written: Vec<(&str, Option<&str>)> = records.iter().map(|r| r.entry.key_value()).collect();
    assert_eq!(written, [("e", Some("x")), ("d", Some("last"))]);
}

#[test]
fn superseded_and_late_versions_are_kept_as_history_and_survive_a_reload() {
    let s = store(1);
    let v1 = s
        .set(1, "k", "one", None, NOW)
        .expect("set")
        .entry
        .version();
    s.set(1, "k", "two", None, NOW + 1).expect("set");
    s.delete(1, "k", NOW + 2).expect("delete");
    // A peer's older write arriving late is a version of the key too.
    let late = Record::new(1, "k", Some("late"), Version { hlc: 1, node: 9 }, 0);
    let outcome = s.merge([late], NOW + 3);
    assert_eq!(outcome.stale, 1);
    let (current, older) = s.history(1, "k");
    assert!(current.expect("tombstone").is_tombstone());
    let values: Vec<Option<&str>> = older.iter().map(Entry::value).collect();
    assert_eq!(values, [Some("two"), Some("one"), Some("late")]);
    assert_eq!(
        s.version_of(1, "k", v1)
            .and_then(|e| e.value().map(str::to_owned))
            .as_deref(),
        Some("one")
    );
    // What a snapshot writes, loaded into a new store: the same history,
    // and no kept version becomes current.
    let (state, history) = s.snapshot_with_history();
    let t = store(1);
    t.load(state, NOW + 4, 0);
    t.keep_history(history);
    let (current, older) = t.history(1, "k");
    assert!(current.expect("tombstone").is_tombstone());
    assert_eq!(older.len(), 3);
    assert!(t.get(1, "k", NOW + 4).is_none());
}

#[test]
fn a_purged_key_keeps_its_history_and_takes_it_back_when_written_again() {
    let s = store(1);
    s.set(1, "k", "one", None, NOW).expect("set");
    s.set(1, "k", "two", None, NOW + 1).expect("set");
    s.delete(1, "k", NOW + 2).expect("delete");
    assert_eq!(s.purge(NOW + 10_000, 1_000), 1, "the tombstone goes");
    let (current, older) = s.history(1, "k");
    assert!(current.is_none());
    let values: Vec<Option<&str>> = older.iter().map(Entry::value).collect();
    assert_eq!(values, [Some("two"), Some("one")], "who wrote what before");
    s.set(1, "k", "three", None, NOW + 10_001).expect("set");
    s.set(1, "k", "four", None, NOW + 10_002).expect("set");
    let (_, older) = s.history(1, "k");
    let values: Vec<Option<&str>> = older.iter().map(Entry::value).collect();
    assert_eq!(values, [Some("three"), Some("two"), Some("one")]);
    // A snapshot's history of a key the store no longer holds comes back.
    s.delete(1, "k", NOW + 10_003).expect("delete");
    assert_eq!(s.purge(NOW + 20_000, 1_000), 1);
    let (state, history) = s.snapshot_with_history();
    let t = store(1);
    t.load(state, NOW + 20_000, 0);
    t.keep_history(history);
    assert_eq!(t.history(1, "k").1.len(), 4);
}
