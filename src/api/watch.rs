//! The watch stream (`GET /v1/watch/{type}`): Server-Sent Events of every
//! change to one namespace (or one key), optionally after a snapshot of
//! it, resumed by `Last-Event-ID`, started over with a `reset` when a
//! watcher falls behind.
//!
//! Owns: the events' names and JSON shapes (`change`, `batch`, `live`,
//! `reset`), their order (snapshot or replay, then live), and the
//! stream's permit. Must not touch: the replay buffer and its event ids
//! (`crate::replica::events` decides), the store beyond reading it, the
//! write paths.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{Api, ApiError, answer, count, entry_json, type_path};
use crate::identity::unix_ms;
use crate::metrics::label;
use crate::store::Record;

/// The query of a watch.
#[derive(Debug, Deserialize, Default)]
pub(super) struct WatchParams {
    key: Option<String>,
    snapshot: Option<String>,
    /// For clients that cannot set the `Last-Event-ID` header.
    last_event_id: Option<String>,
}

/// One change as a `change` event (with its id; snapshot entries carry
/// none, so a client that disconnects mid-snapshot resumes with a reset).
fn change_event(record: &Record, origin: &str, id: String) -> Event {
    let mut body = entry_json(record);
    body["deleted"] = json!(record.entry.is_tombstone());
    body["origin"] = json!(origin);
    answer::meta_json(&mut body, &record.entry, "origin_pod");
    Event::default()
        .event("change")
        .id(id)
        .data(body.to_string())
}

/// A published change as the events a watch of `ty` (and `key`, if any)
/// shows: a single write as a `change` event, a batch as one `batch` event
/// of its entries in that namespace (with `key`, that key's only), nothing
/// when none of it is watched.
fn watched_events(
    change: &crate::replica::ChangeEvent,
    ty: i32,
    key: Option<&str>,
    id: String,
) -> Option<Event> {
    let wanted = |r: &&Record| r.ty == ty && key.is_none_or(|k| k == r.key());
    let Some(batch) = &change.batch else {
        return wanted(&&change.record)
            .then(|| change_event(&change.record, change.origin.as_str(), id));
    };
    let entries: Vec<Value> = batch
        .iter()
        .filter(wanted)
        .map(|r| {
            let mut e = json!({
                "key": r.key(),
                "value": r.entry.value(),
                "deleted": r.entry.is_tombstone(),
                "version": r.entry.version().to_string(),
            });
            if r.entry.expires_at_ms() != 0 {
                e["expires_at_ms"] = json!(r.entry.expires_at_ms());
            }
            e
        })
        .collect();
    if entries.is_empty() {
        return None;
    }
    let first = &change.record;
    let mut body = json!({
        "type": ty,
        "version": first.entry.version().to_string(),
        "origin": change.origin.as_str(),
        "entries": entries,
    });
    answer::meta_json(&mut body, &first.entry, "origin_pod");
    Some(
        Event::default()
            .event("batch")
            .id(id)
            .data(body.to_string()),
    )
}

/// The namespace's live entries (or the one key's), then a `live` event
/// whose id is the stream's position at the snapshot: what follows it is
/// every change after the snapshot.
fn snapshot_events(api: &Api, ty: i32, key: Option<&str>, upto: u64) -> Vec<Event> {
    let now = unix_ms();
    let entries = match key {
        Some(key) => api.replica.store.get(ty, key, now).into_iter().collect(),
        None => api.replica.store.namespace(ty, now),
    };
    let mut events: Vec<Event> = entries
        .into_iter()
        .map(|entry| {
            let id = api.replica.events.snapshot_id(upto);
            change_event(&Record { ty, entry }, "snapshot", id)
        })
        .collect();
    events.push(live_event(api, ty, events.len(), upto));
    events
}

/// The marker that what came before (a snapshot, or a replay) is complete
/// and live changes follow; its id is the stream's position.
fn live_event(api: &Api, ty: i32, entries: usize, upto: u64) -> Event {
    Event::default()
        .event("live")
        .id(api.replica.events.id(upto))
        .data(json!({ "type": ty, "entries": entries }).to_string())
}

fn reset_events(api: &Api, ty: i32, key: Option<&str>, reason: &str, upto: u64) -> Vec<Event> {
    let mut events = vec![
        Event::default()
            .event("reset")
            .id(api.replica.events.snapshot_id(upto))
            .data(json!({ "type": ty, "reason": reason }).to_string()),
    ];
    events.extend(snapshot_events(api, ty, key, upto));
    events
}

/// A Server-Sent Events stream of every change to one namespace (or one
/// key). Every change event has an id; reconnecting with `Last-Event-ID`
/// resumes right after it from the replay buffer, or, when the id is
/// another node's or older than the buffer, starts with a `reset` event,
/// the whole current state and a `live` marker. `?snapshot=true` starts
/// with the current state and the `live` marker (list-then-watch in one
/// request, no gap). A watcher too slow for the stream gets a `reset`
/// too: never a silent gap.
pub(super) async fn watch(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<WatchParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let ty = type_path(path)?;
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let snapshot = match params.snapshot.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("snapshot must be true or false, got {other:?}"),
            ));
        }
    };
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(params.last_event_id);
    if (snapshot || last_id.is_some()) && !api.replica.is_ready() {
        // Its state is still arriving: a snapshot now would be part of it.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the node is still pulling its state; watch with a snapshot once /readyz answers 200",
        ));
    }
    let Ok(permit) = api.watch_permits.clone().try_acquire_owned() else {
        api.replica
            .metrics
            .overloaded
            .get_or_create(&label("what", "watches"))
            .inc();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many watch streams are open on this node; retry later",
        ));
    };
    count(&api, "watch");
    // Subscribed before anything is read: what is published meanwhile is
    // in the stream, and what is older is in what is read.
    let events = BroadcastStream::new(api.replica.subscribe());
    let key = params.key;
    let events_log = &api.replica.events;
    let (first, from) = match last_id {
        Some(id) => match events_log.resume(&id) {
            crate::replica::events::Resume::From { events, upto } => {
                let mut replayed: Vec<Event> = events
                    .iter()
                    .filter_map(|e| watched_events(e, ty, key.as_deref(), events_log.id(e.seq)))
                    .collect();
                // Caught up: what follows is live.
                replayed.push(live_event(&api, ty, replayed.len(), upto));
                (replayed, upto)
            }
            crate::replica::events::Resume::Reset(reason) => {
                let upto = events_log.last_seq();
                (reset_events(&api, ty, key.as_deref(), reason, upto), upto)
            }
        },
        None if snapshot => {
            let upto = events_log.last_seq();
            (snapshot_events(&api, ty, key.as_deref(), upto), upto)
        }
        None => (Vec::new(), events_log.last_seq()),
    };
    let stop = api.stop.clone().cancelled_owned();
    let live = events.scan(from, move |seen, item| {
        let events = match item {
            Ok(change) => {
                if change.seq <= *seen {
                    // Already in what was replayed or read.
                    Vec::new()
                } else {
                    *seen = change.seq;
                    let id = api.replica.events.id(change.seq);
                    watched_events(&change, ty, key.as_deref(), id)
                        .into_iter()
                        .collect()
                }
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                // Events were lost for this slow watcher: start it over.
                let upto = api.replica.events.last_seq();
                *seen = upto;
                reset_events(
                    &api,
                    ty,
                    key.as_deref(),
                    "this watch fell too far behind",
                    upto,
                )
            }
        };
        // The stream holds its permit until the client goes away.
        let _held = &permit;
        std::future::ready(Some(events))
    });
    let stream = futures_util::stream::iter(std::iter::once(first))
        .chain(live)
        .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>)))
        .take_until(stop);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
