//! The receiving half of the prefix guarantee: a peer's epoch held until
//! its last request, then merged at once, so this node never shows part
//! of it.
//!
//! Owns: what one `ReplicateStream` call holds of an unfinished epoch, the
//! cap on it, and when it is released. Must not touch: the merge (the
//! replica's remote write path takes what is released), the wire (the gRPC
//! handler in [`crate::rpc`] only adapts requests to [`Assembly::take`]),
//! the sending half (`link`, `batch`).
//!
//! A sender cuts an epoch into requests (`batch`), marks every one but the
//! last `more`, and sends them in order on one call. An assembly lives as
//! long as that call: when the call ends before an epoch's last request
//! (the sender restarted or lost the connection mid-epoch), what it held
//! is dropped unmerged, and the sender, which counts the epoch
//! acknowledged only once its last request was answered, sends the whole
//! epoch again on its next call. Past its cap (what the store could take
//! anyway) an epoch is released early rather than held without bound; the
//! caller counts and logs that, since a node then may show part of it.

use crate::store::Record;

/// What one request did to the epoch being assembled.
#[derive(Debug)]
pub(crate) enum Released {
    /// Held with the epoch's earlier requests: nothing to merge yet.
    Held,
    /// Merge these now, in this order (the epoch's earlier requests first).
    Merge {
        records: Vec<Record>,
        /// Some when the epoch passed the cap before its last request:
        /// the bytes held when it did. The rest of the epoch follows as a
        /// new hold.
        past_cap: Option<usize>,
    },
}

/// An epoch's requests held until its last one, on one call.
#[derive(Debug)]
pub(crate) struct Assembly {
    held: Vec<Record>,
    /// Bytes of what `held` holds, as [`crate::store::Entry::size`] counts.
    bytes: usize,
    cap: usize,
}

impl Assembly {
    /// An assembly that holds at most `cap` bytes of an epoch.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            held: Vec::new(),
            bytes: 0,
            cap,
        }
    }

    /// Takes one request's `records`; `more` says the epoch goes on after
    /// it.
    pub(crate) fn take(&mut self, mut records: Vec<Record>, more: bool) -> Released {
        if !more && self.held.is_empty() {
            return Released::Merge {
                records,
                past_cap: None,
            };
        }
        self.bytes += records.iter().map(|r| r.entry.size()).sum::<usize>();
        self.held.append(&mut records);
        let past_cap = (more && self.bytes > self.cap).then_some(self.bytes);
        if more && past_cap.is_none() {
            return Released::Held;
        }
        self.bytes = 0;
        Released::Merge {
            records: std::mem::take(&mut self.held),
            past_cap,
        }
    }

    /// Entries and bytes held of an unfinished epoch.
    #[cfg(test)]
    fn holding(&self) -> (usize, usize) {
        (self.held.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Version;

    fn records(keys: &[&str]) -> Vec<Record> {
        keys.iter()
            .map(|k| Record::new(1, k, Some("v"), Version { hlc: 1, node: 2 }, 0))
            .collect()
    }

    fn size(keys: &[&str]) -> usize {
        records(keys).iter().map(|r| r.entry.size()).sum()
    }

    fn merged(released: Released) -> (Vec<String>, Option<usize>) {
        match released {
            Released::Held => panic!("held, expected a merge"),
            Released::Merge { records, past_cap } => (
                records.iter().map(|r| r.key().to_owned()).collect(),
                past_cap,
            ),
        }
    }

    #[test]
    fn a_request_that_ends_an_epoch_of_one_is_merged_as_it_comes() {
        let mut a = Assembly::new(1 << 20);
        assert_eq!(
            merged(a.take(records(&["a", "b"]), false)),
            (vec!["a".into(), "b".into()], None)
        );
        assert_eq!(a.holding(), (0, 0));
    }

    #[test]
    fn an_epoch_is_held_until_its_last_request_then_merged_whole_in_order() {
        let mut a = Assembly::new(1 << 20);
        assert!(matches!(a.take(records(&["a"]), true), Released::Held));
        assert!(matches!(a.take(records(&["b", "c"]), true), Released::Held));
        assert_eq!(a.holding(), (3, size(&["a", "b", "c"])));
        let (keys, past_cap) = merged(a.take(records(&["d"]), false));
        assert_eq!(keys, ["a", "b", "c", "d"]);
        assert_eq!(past_cap, None);
        assert_eq!(a.holding(), (0, 0));
        // The next epoch starts from nothing.
        assert!(matches!(a.take(records(&["e"]), true), Released::Held));
        assert_eq!(merged(a.take(Vec::new(), false)).0, ["e"]);
    }

    #[test]
    fn an_empty_last_request_releases_what_was_held() {
        let mut a = Assembly::new(1 << 20);
        assert!(matches!(a.take(records(&["a"]), true), Released::Held));
        assert_eq!(merged(a.take(Vec::new(), false)).0, ["a"]);
    }

    #[test]
    fn an_epoch_past_the_cap_is_released_early_and_the_rest_held_again() {
        let cap = size(&["a", "b"]);
        let mut a = Assembly::new(cap);
        assert!(matches!(a.take(records(&["a", "b"]), true), Released::Held));
        let (keys, past_cap) = merged(a.take(records(&["c"]), true));
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(past_cap, Some(size(&["a", "b", "c"])));
        assert_eq!(a.holding(), (0, 0));
        assert!(matches!(a.take(records(&["d"]), true), Released::Held));
        assert_eq!(
            merged(a.take(records(&["e"]), false)),
            (vec!["d".into(), "e".into()], None)
        );
    }

    #[test]
    fn an_epoch_cut_off_before_its_last_request_merges_nothing() {
        // The call ended (the sender restarted mid-epoch): the assembly is
        // dropped with what it held, and a new call starts from nothing.
        let mut a = Assembly::new(1 << 20);
        assert!(matches!(a.take(records(&["a"]), true), Released::Held));
        assert!(matches!(a.take(records(&["b"]), true), Released::Held));
        drop(a);
        let mut next = Assembly::new(1 << 20);
        assert_eq!(
            merged(next.take(records(&["a", "b", "c"]), false)).0,
            ["a", "b", "c"]
        );
    }
}
