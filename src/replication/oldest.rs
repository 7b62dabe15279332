//! The one rule for which member has run longest: the bootstrap source for
//! newcomers, the reference of a full resync, the `oldest` of
//! `/v1/cluster`.
//!
//! Owns: the seniority order. Must not touch anything else.
//!
//! A member's start time is the one discovery reports when it has one (a
//! pod's running container `startedAt`: what the original design read from
//! etcd), else the member's own answer to `Hello`; ties are broken by node
//! id, then by address, so every node orders the same members the same way.
//! A member whose start time nobody knows comes last.

/// What is known of one member's age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age<'a> {
    /// Start time discovery reports, Unix ms.
    pub discovered_ms: Option<i64>,
    /// Start time the member itself reports, Unix ms.
    pub own_ms: Option<i64>,
    /// Its node id, once it answered.
    pub node_id: Option<u64>,
    /// Its dial address.
    pub addr: &'a str,
}

/// The sort key: smaller is older.
pub fn seniority(age: &Age<'_>) -> (i64, u64, String) {
    (
        age.discovered_ms.or(age.own_ms).unwrap_or(i64::MAX),
        age.node_id.unwrap_or(u64::MAX),
        age.addr.to_owned(),
    )
}

/// The index of the oldest of `members`, if any.
pub fn oldest(members: &[Age<'_>]) -> Option<usize> {
    (0..members.len()).min_by_key(|&i| seniority(&members[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(discovered: Option<i64>, own: Option<i64>, id: Option<u64>, addr: &str) -> Age<'_> {
        Age {
            discovered_ms: discovered,
            own_ms: own,
            node_id: id,
            addr,
        }
    }

    #[test]
    fn discovery_start_time_wins_over_the_members_own() {
        let members = [
            age(Some(200), Some(50), Some(1), "a"),
            age(Some(100), Some(300), Some(2), "b"),
        ];
        assert_eq!(oldest(&members), Some(1));
    }

    #[test]
    fn own_start_time_counts_when_discovery_has_none_and_ties_go_by_id_then_address() {
        let members = [
            age(None, Some(100), Some(9), "a"),
            age(None, Some(100), Some(3), "b"),
            age(None, None, None, "c"),
        ];
        assert_eq!(oldest(&members), Some(1));
        let same = [
            age(None, Some(1), Some(1), "z"),
            age(None, Some(1), Some(1), "y"),
        ];
        assert_eq!(oldest(&same), Some(1));
        assert_eq!(oldest(&[age(None, None, None, "x")]), Some(0));
        assert_eq!(oldest(&[]), None);
    }
}
