//! The loop the etcd-family sources (`etcd`, `etcd-v2`, `etcd-lease`)
//! run their sessions in: a session lists and watches until it ends; the
//! loop counts why, marks the membership stale after a failure, and waits
//! before the next one.
//!
//! Owns: the pause between sessions ([`Backoff`]) and what each way a
//! session ends does to the relist counter and the published membership.
//! Must not touch: what a session reads or how (each source's own module),
//! the peer set itself (the [`Publisher`] keeps it).

use std::time::Duration;

use super::DiscoveryContext;
use super::pod_table::Publisher;
use crate::metrics::label;

/// How one session of a source ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ended {
    /// The source's watch position is gone (a compacted revision, an
    /// outdated v2 index) while the source is fine: list again at once.
    /// Counted as a relist for this reason.
    Relist(&'static str),
    /// The source failed: the last membership stays, marked stale with
    /// this error, and the next session waits.
    Failed(String),
    /// The node is shutting down (or the source has nothing more to do).
    Done,
}

/// The pause before the next session: 100 ms after the first failure,
/// doubling with every failure after it, at most 5 s; a relist goes on at
/// once and starts the pauses over, and so does a failure that ended a
/// session that had run for longer than the longest pause (it served: an
/// etcd that fails once after hours is retried at once, not at the pause
/// reached by failures long ago).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MOST: Duration = Duration::from_secs(5);

    pub(super) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// What to do after a session that `lasted` so long ended so: `None`
    /// stops, else the pause before the next session.
    pub(super) fn after(&mut self, ended: &Ended, lasted: Duration) -> Option<Duration> {
        if lasted > Self::MOST {
            self.next = Self::FIRST;
        }
        match ended {
            Ended::Done => None,
            Ended::Relist(_) => {
                self.next = Self::FIRST;
                Some(Duration::ZERO)
            }
            Ended::Failed(_) => {
                let pause = self.next;
                self.next = (self.next * 2).min(Self::MOST);
                Some(pause)
            }
        }
    }
}

/// What a source does between two sessions. Each source runs
///
/// ```text
/// let mut retry = Retry::new();
/// loop {
///     let ended = /* one session, or Done when the node shuts down */;
///     if !retry.after(ended, &mut publisher, &ctx).await { return; }
/// }
/// ```
///
/// (a loop over a closure would be shorter, but the sessions borrow the
/// source's state across awaits, and a future that must be `Send` cannot
/// be returned by such a closure yet).
#[derive(Debug)]
pub(super) struct Retry {
    backoff: Backoff,
    /// When the current session started.
    started: tokio::time::Instant,
}

impl Retry {
    pub(super) fn new() -> Self {
        Self {
            backoff: Backoff::new(),
            started: tokio::time::Instant::now(),
        }
    }

    /// After a session ended: counts why, marks the membership stale after
    /// a failure, and waits the pause. False when the source should stop
    /// (the session was the last, or the node shut down meanwhile). A
    /// session that must notice the shutdown itself (to release what it
    /// holds, as etcd-lease revokes its lease) does, and ends with
    /// [`Ended::Done`].
    pub(super) async fn after(
        &mut self,
        ended: Ended,
        publisher: &mut Publisher,
        ctx: &DiscoveryContext,
    ) -> bool {
        let pause = self.backoff.after(&ended, self.started.elapsed());
        match ended {
            Ended::Relist(reason) => {
                ctx.metrics
                    .discovery_relists
                    .get_or_create(&label("reason", reason))
                    .inc();
            }
            Ended::Failed(error) => {
                ctx.metrics
                    .discovery_relists
                    .get_or_create(&label("reason", "error"))
                    .inc();
                publisher.stale(error, ctx);
            }
            Ended::Done => {}
        }
        let go_on = match pause {
            None => false,
            Some(pause) if pause.is_zero() => !ctx.cancel.is_cancelled(),
            Some(pause) => {
                tokio::select! {
                    _ = ctx.cancel.cancelled() => false,
                    _ = tokio::time::sleep(pause) => true,
                }
            }
        };
        self.started = tokio::time::Instant::now();
        go_on
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{DiscoveryState, PeerSet};
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn failures_double_the_pause_up_to_five_seconds_and_a_relist_starts_over() {
        let mut backoff = Backoff::new();
        let failed = Ended::Failed("down".into());
        let short = Duration::from_millis(10);
        let pauses: Vec<u64> = (0..8)
            .map(|_| {
                backoff
                    .after(&failed, short)
                    .map_or(0, |d| d.as_millis() as u64)
            })
            .collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(
            backoff.after(&Ended::Relist("compacted"), short),
            Some(Duration::ZERO)
        );
        assert_eq!(
            backoff.after(&failed, short),
            Some(Duration::from_millis(100))
        );
        assert_eq!(backoff.after(&Ended::Done, short), None);
    }

    #[test]
    fn a_failure_after_a_session_that_served_starts_the_pauses_over() {
        let mut backoff = Backoff::new();
        let failed = Ended::Failed("down".into());
        for _ in 0..8 {
            backoff.after(&failed, Duration::from_millis(10));
        }
        assert_eq!(
            backoff.after(&failed, Duration::from_millis(10)),
            Some(Duration::from_secs(5)),
            "a session that failed at once keeps the pause"
        );
        assert_eq!(
            backoff.after(&failed, Duration::from_secs(6)),
            Some(Duration::from_millis(100)),
            "one that ran longer than the longest pause served"
        );
        assert_eq!(
            backoff.after(&failed, Duration::from_millis(10)),
            Some(Duration::from_millis(200))
        );
    }

    fn ctx() -> (DiscoveryContext, watch::Receiver<PeerSet>) {
        let (peers_tx, peers_rx) = watch::channel(PeerSet::pending());
        let ctx = DiscoveryContext {
            identity: crate::identity::NodeIdentity::for_test("me", "10.9.9.9:7000"),
            peers_tx,
            cancel: CancellationToken::new(),
            metrics: Default::default(),
        };
        (ctx, peers_rx)
    }

    fn relists(ctx: &DiscoveryContext, reason: &str) -> u64 {
        ctx.metrics
            .discovery_relists
            .get_or_create(&label("reason", reason))
            .get()
    }

    /// Sessions scripted to end as listed: each end is counted, a
    /// failure marks the membership stale, the pauses are the backoff's
    /// (on a paused clock), and `Done` stops.
    #[tokio::test(start_paused = true)]
    async fn sessions_run_until_done_with_the_pauses_and_counts_of_their_ends() {
        let (ctx, peers_rx) = ctx();
        let mut script = vec![
            Ended::Failed("refused".into()),
            Ended::Failed("refused".into()),
            Ended::Relist("compacted"),
            Ended::Failed("timeout".into()),
            Ended::Done,
        ]
        .into_iter();
        let mut started = Vec::new();
        let start = tokio::time::Instant::now();
        let mut publisher = Publisher::new();
        let mut retry = Retry::new();
        loop {
            started.push(start.elapsed().as_millis());
            let ended = script.next().unwrap_or(Ended::Done);
            if !retry.after(ended, &mut publisher, &ctx).await {
                break;
            }
        }
        assert_eq!(started, [0, 100, 300, 300, 400]);
        assert_eq!(relists(&ctx, "error"), 3);
        assert_eq!(relists(&ctx, "compacted"), 1);
        assert!(
            matches!(peers_rx.borrow().state, DiscoveryState::Stale { .. }),
            "{:?}",
            peers_rx.borrow()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_stops_the_wait_between_sessions() {
        let (ctx, _peers) = ctx();
        let mut publisher = Publisher::new();
        let mut retry = Retry::new();
        let cancel = ctx.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            cancel.cancel();
        });
        let start = tokio::time::Instant::now();
        let go_on = retry
            .after(Ended::Failed("down".into()), &mut publisher, &ctx)
            .await;
        assert!(!go_on);
        assert_eq!(start.elapsed().as_millis(), 50, "not the whole 100 ms");
        assert!(
            !retry
                .after(Ended::Relist("compacted"), &mut publisher, &ctx)
                .await,
            "nor a relist once shut down"
        );
    }
}
