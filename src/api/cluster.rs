//! The cluster view (`GET /v1/cluster`), the dashboard's data: this node,
//! its peers as their links see them, the oldest member, discovery,
//! bootstrap, the data directory, the decider and the latest changes.
//!
//! Owns: the document's JSON shape, and what a token limited to some
//! types may see of the latest changes. Must not touch: which member is
//! oldest (`crate::replication::oldest` decides), the peer links' state
//! (only read, through `Replicator::peer_views`), anything that writes.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::{Api, answer, auth};
use crate::discovery::DiscoveryState;
use crate::replication::oldest::{self, Age};

pub(super) async fn cluster(State(api): State<Arc<Api>>, headers: HeaderMap) -> Json<Value> {
    let mut body = cluster_json(&api);
    // With --public-dashboard this answer is open: keys, authors and
    // reasons only with a token that may read them, and of its types only.
    if let Some(auth) = &api.auth
        && let Some(object) = body.as_object_mut()
    {
        match auth.granted(&headers) {
            None => {
                object.remove("recent_changes");
            }
            Some(auth::Grant {
                scope: Some(scope), ..
            }) => {
                if let Some(Value::Array(changes)) = object.get_mut("recent_changes") {
                    changes.retain(|change| recent_change_covered(change, &scope));
                }
            }
            Some(_) => {}
        }
    }
    Json(body)
}

/// Whether a token limited to `scope` may see one of the recent changes:
/// of one of its types, or the schema of one.
fn recent_change_covered(change: &Value, scope: &auth::Scope) -> bool {
    let Some(ty) = change["type"].as_i64().and_then(|t| i32::try_from(t).ok()) else {
        return false;
    };
    if ty == crate::replica::SCHEMA_TYPE {
        return change["key"]
            .as_str()
            .and_then(|k| k.parse().ok())
            .is_some_and(|ty| scope.covers(ty));
    }
    scope.covers(ty)
}

/// The `/v1/cluster` document.
pub(crate) fn cluster_json(api: &Api) -> Value {
    let me = &api.replica.identity;
    let peers = api.replicator.peer_views();
    let set = api.peers_rx.borrow().clone();
    // The oldest member, this node included, by the one seniority rule.
    let node_ids: Vec<Option<u64>> = peers
        .iter()
        .map(|p| {
            p.node_id
                .as_deref()
                .and_then(|id| u64::from_str_radix(id, 16).ok())
        })
        .collect();
    let mut members = vec![Age {
        discovered_ms: None,
        own_ms: Some(me.started_at_ms),
        node_id: Some(me.node_id),
        addr: &me.grpc_addr,
    }];
    members.extend(peers.iter().zip(&node_ids).map(|(p, id)| Age {
        discovered_ms: p.started_at_ms,
        own_ms: None,
        node_id: *id,
        addr: &p.grpc_addr,
    }));
    let oldest = oldest::oldest(&members)
        .map_or_else(|| me.grpc_addr.clone(), |i| members[i].addr.to_owned());
    let peers_json: Vec<Value> = peers
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["oldest"] = json!(p.grpc_addr == oldest);
            v
        })
        .collect();
    let (state, last_good_ms, error) = match &set.state {
        DiscoveryState::Pending => ("pending", None, None),
        DiscoveryState::Fresh { at } => ("fresh", Some(system_ms(*at)), None),
        DiscoveryState::Stale { last_good, error } => {
            ("stale", last_good.map(system_ms), Some(error.clone()))
        }
    };
    let bootstrap = api.replica.bootstrap_report();
    // Where this node's state came from: its data directory, its peers
    // (a bootstrap pull, or what the join repaired), both, or neither.
    let from_disk = api.replica.loaded_from_disk() > 0;
    let from_peers = bootstrap.as_ref().is_some_and(|b| b.entries > 0);
    let state_source = match (from_disk, from_peers) {
        (true, true) => "disk+peers",
        (true, false) => "disk",
        (false, true) => "peers",
        (false, false) => "none",
    };
    let data_dir = api.replica.data.as_ref().map(|d| {
        json!({
            "path": d.path().display().to_string(),
            "fsync": format!("{:?}", d.policy()).to_lowercase(),
            "healthy": d.healthy(),
        })
    });
    let decider = match api.decider.holder() {
        Some((name, addr, me)) => json!({
            "rule": api.decider.backend(), "name": name, "grpc_addr": addr, "me": me,
        }),
        None => {
            json!({ "rule": api.decider.backend(), "name": null, "grpc_addr": null, "me": false })
        }
    };
    json!({
        "decider": decider,
        "node": {
            "name": me.name,
            "node_id": format!("{:016x}", me.node_id),
            "pod_ip": me.pod_ip,
            "host_ip": me.host_ip,
            "grpc_addr": me.grpc_addr,
            "started_at_ms": me.started_at_ms,
            "ready": api.replica.is_ready(),
            "oldest": oldest == me.grpc_addr,
        },
        "oldest": oldest,
        "peers": peers_json,
        "discovery": {
            "source": api.discovery_name,
            "state": state,
            "last_good_ms": last_good_ms,
            "error": error,
            "peers": set.peers.len(),
        },
        "bootstrap": bootstrap,
        "state_source": state_source,
        "data_dir": data_dir,
        "recent_changes": recent_json(api),
    })
}

/// The latest changes this node took, newest first: what, who, where
/// from and why.
fn recent_json(api: &Api) -> Vec<Value> {
    api.replica
        .recent_changes()
        .iter()
        .map(|(record, via)| {
            let mut v = json!({
                "type": record.ty,
                "key": record.key(),
                "deleted": record.entry.is_tombstone(),
                "batch": record.entry.in_batch(),
                "version": record.entry.version().to_string(),
                "via": via.as_str(),
            });
            answer::meta_json(&mut v, &record.entry, "origin");
            v
        })
        .collect()
}

fn system_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
