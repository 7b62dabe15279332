//! The decisions of one peer link, apart from the calls that carry them
//! (after raft-rs's `RawNode`): results go in, the next step comes out.
//!
//! Owns: when to ask the peer who it is, when to send and which way
//! (`ReplicateStream`, else unary `Replicate` for a podcache from before
//! the stream, else the original `Sync/Set`), the retry backoff, when a
//! peer counts as down, when its pending writes are released and when it is
//! taken back. Must not touch: sockets, the change index, the clock (every
//! call is given `now`), so it is tested without either.

use std::time::Duration;

use tokio::time::Instant;

/// How batches go to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// Requests on one long-lived `Replica/ReplicateStream` call.
    Stream,
    /// One `Replica/Replicate` call per request: a podcache from before
    /// the stream.
    Unary,
    /// The original `hellorpc.Sync/Set`: a node built from the original
    /// proto alone.
    Legacy,
}

/// Whether the peer answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reachability {
    /// Not asked yet.
    Unknown,
    /// The last exchange succeeded.
    Up,
    /// The last exchange failed.
    Down,
}

/// The timers of a link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkSettings {
    /// How often an idle link checks that its peer is up.
    pub(crate) heartbeat: Duration,
    /// The first pause after a failure; it doubles with each failure.
    pub(crate) first_backoff: Duration,
    /// The longest pause between attempts.
    pub(crate) max_backoff: Duration,
    /// How long a peer may fail every call before its pending writes are
    /// released.
    pub(crate) release_after: Duration,
}

/// What the link does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Ask the peer who it is (at start, to probe a failing peer, and as a
    /// heartbeat when idle).
    Hello,
    /// Send the next pending epoch this way.
    Send(Protocol),
    /// The peer has failed for longer than the retention: stop holding
    /// writes for it.
    Release,
    /// A released peer answers again: hold writes for it from now on and
    /// have anti-entropy repair what it missed.
    Reattach,
    /// Nothing to do until `until`, or until a local write when `on_write`.
    Wait {
        /// The next retry or heartbeat.
        until: Instant,
        /// Whether a new local write ends the wait.
        on_write: bool,
    },
}

/// How a call ended, as the machine needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The peer answered.
    Ok,
    /// The peer does not serve the call.
    Unimplemented,
    /// Anything else: a timeout, a refused connection, an error status.
    Failed,
}

/// The state of one link.
#[derive(Debug)]
pub(crate) struct LinkMachine {
    settings: LinkSettings,
    protocol: Protocol,
    reach: Reachability,
    /// The peer said who it is (or turned out to know only the original
    /// protocol): sends may go.
    identified: bool,
    backoff: Duration,
    /// No call before this, after a failure.
    retry_at: Option<Instant>,
    /// The last successful exchange.
    last_ok: Option<Instant>,
    /// Since when every call failed.
    failing_since: Option<Instant>,
    /// The peer's pending writes were released.
    released: bool,
    /// The peer answered after a release; [`Step::Reattach`] is due.
    reattach_due: bool,
}

impl LinkMachine {
    pub(crate) fn new(settings: LinkSettings) -> Self {
        Self {
            protocol: Protocol::Stream,
            reach: Reachability::Unknown,
            identified: false,
            backoff: settings.first_backoff,
            retry_at: None,
            last_ok: None,
            failing_since: None,
            released: false,
            reattach_due: false,
            settings,
        }
    }

    /// Sets the idle heartbeat (it stretches as the node has more links).
    pub(crate) fn set_heartbeat(&mut self, heartbeat: Duration) {
        self.settings.heartbeat = heartbeat;
    }

    pub(crate) fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub(crate) fn reachability(&self) -> Reachability {
        self.reach
    }

    pub(crate) fn released(&self) -> bool {
        self.released
    }

    /// The next step at `now`; `pending` says whether the peer's cursor
    /// has something to send.
    pub(crate) fn next(&mut self, now: Instant, pending: bool) -> Step {
        let release_at = self
            .failing_since
            .filter(|_| !self.released)
            .map(|since| since + self.settings.release_after);
        if release_at.is_some_and(|at| at <= now) {
            self.released = true;
            self.identified = false;
            return Step::Release;
        }
        if let Some(at) = self.retry_at.filter(|at| *at > now) {
            let until = release_at.map_or(at, |r| r.min(at));
            return Step::Wait {
                until,
                on_write: false,
            };
        }
        if !self.identified {
            return Step::Hello;
        }
        if self.reattach_due {
            self.reattach_due = false;
            return Step::Reattach;
        }
        if pending && !self.released {
            return Step::Send(self.protocol);
        }
        let heartbeat_at = self.last_ok.map_or(now, |t| t + self.settings.heartbeat);
        if heartbeat_at <= now {
            return Step::Hello;
        }
        Step::Wait {
            until: heartbeat_at,
            on_write: !self.released,
        }
    }

    /// The answer to [`Step::Hello`].
    pub(crate) fn hello_result(&mut self, now: Instant, outcome: Outcome) {
        match outcome {
            Outcome::Ok => {
                if self.protocol == Protocol::Legacy {
                    // A podcache now answers at this address.
                    self.protocol = Protocol::Stream;
                }
                self.answered(now);
            }
            Outcome::Unimplemented => {
                self.protocol = Protocol::Legacy;
                self.answered(now);
            }
            Outcome::Failed => self.failed(now),
        }
    }

    /// The answer to [`Step::Send`].
    pub(crate) fn send_result(&mut self, now: Instant, outcome: Outcome) {
        match outcome {
            Outcome::Ok => self.answered(now),
            Outcome::Unimplemented => match self.protocol {
                // Fall back at once, no backoff: the peer answered.
                Protocol::Stream => self.protocol = Protocol::Unary,
                Protocol::Unary => self.protocol = Protocol::Legacy,
                Protocol::Legacy => self.failed(now),
            },
            Outcome::Failed => self.failed(now),
        }
    }

    fn answered(&mut self, now: Instant) {
        self.identified = true;
        self.reach = Reachability::Up;
        self.backoff = self.settings.first_backoff;
        self.retry_at = None;
        self.failing_since = None;
        self.last_ok = Some(now);
        if self.released {
            self.released = false;
            self.reattach_due = true;
        }
    }

    fn failed(&mut self, now: Instant) {
        self.reach = Reachability::Down;
        self.failing_since.get_or_insert(now);
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.settings.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LinkSettings {
        LinkSettings {
            heartbeat: Duration::from_secs(2),
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
            release_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_link_asks_first_then_sends_what_is_pending_then_heartbeats() {
        let t0 = Instant::now();
        let mut link = LinkMachine::new(settings());
        assert_eq!(link.next(t0, true), Step::Hello);
        link.hello_result(t0, Outcome::Ok);
        assert_eq!(link.next(t0, true), Step::Send(Protocol::Stream));
        link.send_result(t0, Outcome::Ok);
        assert_eq!(
            link.next(t0, false),
            Step::Wait {
                until: t0 + Duration::from_secs(2),
                on_write: true
            }
        );
        assert_eq!(link.next(t0 + Duration::from_secs(2), false), Step::Hello);
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap_and_success_resets() {
        let t0 = Instant::now();
        let mut link = LinkMachine::new(settings());
        link.hello_result(t0, Outcome::Ok);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..10 {
            link.send_result(now, Outcome::Failed);
            match link.next(now, true) {
                Step::Wait { until, on_write } => {
                    assert!(!on_write, "a retry waits for its time, not for writes");
                    pauses.push(until - now);
                    now = until;
                }
                other => panic!("expected a wait, got {other:?}"),
            }
            assert_eq!(link.next(now, true), Step::Send(Protocol::Stream));
        }
        assert_eq!(pauses[0], Duration::from_millis(20));
        assert_eq!(pauses[1], Duration::from_millis(40));
        assert_eq!(*pauses.last().expect("pauses"), Duration::from_secs(2));
        assert_eq!(link.reachability(), Reachability::Down);
        link.send_result(now, Outcome::Ok);
        assert_eq!(link.reachability(), Reachability::Up);
        link.send_result(now, Outcome::Failed);
        assert_eq!(
            link.next(now, true),
            Step::Wait {
                until: now + Duration::from_millis(20),
                on_write: false
            }
        );
    }

    #[test]
    fn unimplemented_downgrades_stream_to_unary_to_the_original_set() {
        let t0 = Instant::now();
        let mut link = LinkMachine::new(settings());
        link.hello_result(t0, Outcome::Ok);
        link.send_result(t0, Outcome::Unimplemented);
        assert_eq!(link.next(t0, true), Step::Send(Protocol::Unary));
        link.send_result(t0, Outcome::Unimplemented);
        assert_eq!(link.next(t0, true), Step::Send(Protocol::Legacy));
        assert_eq!(link.reachability(), Reachability::Up);

        let mut legacy = LinkMachine::new(settings());
        legacy.hello_result(t0, Outcome::Unimplemented);
        assert_eq!(legacy.next(t0, true), Step::Send(Protocol::Legacy));
        // A podcache later answers at the same address.
        legacy.hello_result(t0, Outcome::Ok);
        assert_eq!(legacy.next(t0, true), Step::Send(Protocol::Stream));
    }

    #[test]
    fn a_peer_failing_past_the_retention_is_released_probed_and_taken_back() {
        let t0 = Instant::now();
        let mut link = LinkMachine::new(settings());
        link.hello_result(t0, Outcome::Ok);
        let mut now = t0;
        link.send_result(now, Outcome::Failed);
        let mut released_at = None;
        for _ in 0..200 {
            match link.next(now, true) {
                Step::Wait { until, .. } => now = until,
                Step::Send(_) => link.send_result(now, Outcome::Failed),
                Step::Hello => link.hello_result(now, Outcome::Failed),
                Step::Release => {
                    released_at = Some(now);
                    break;
                }
                Step::Reattach => panic!("not before it answers"),
            }
        }
        let released_at = released_at.expect("released");
        assert_eq!(released_at, t0 + Duration::from_secs(60));
        assert!(link.released());
        // Released: it is probed with hellos, never sent to.
        for _ in 0..5 {
            match link.next(now, true) {
                Step::Wait { until, on_write } => {
                    assert!(!on_write);
                    now = until;
                }
                Step::Hello => link.hello_result(now, Outcome::Failed),
                other => panic!("released link did {other:?}"),
            }
        }
        while link.next(now, true) != Step::Hello {
            now += Duration::from_secs(1);
        }
        link.hello_result(now, Outcome::Ok);
        assert_eq!(link.next(now, true), Step::Reattach);
        assert!(!link.released());
        assert_eq!(link.next(now, true), Step::Send(Protocol::Stream));
    }

    #[test]
    fn an_idle_down_peer_is_released_too() {
        let t0 = Instant::now();
        let mut link = LinkMachine::new(settings());
        assert_eq!(link.next(t0, false), Step::Hello);
        link.hello_result(t0, Outcome::Failed);
        let mut now = t0;
        loop {
            match link.next(now, false) {
                Step::Wait { until, .. } => now = until,
                Step::Hello => link.hello_result(now, Outcome::Failed),
                Step::Release => break,
                other => panic!("{other:?}"),
            }
            assert!(now <= t0 + Duration::from_secs(60));
        }
        assert_eq!(now, t0 + Duration::from_secs(60));
    }
}
