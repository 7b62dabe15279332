//! `podcache ctl`: a client for a running node's REST API (get, set,
//! delete, list, watch, history, rollback, export, import, schema,
//! cluster).

use clap::{Args, Subcommand};
use hyper::Method;
use podcache::client::{RestClient, entry_path};
use serde_json::Value;

use crate::{Failure, shutdown_signal};

#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The node's REST address (https:// for a node with --http-tls-cert).
    #[arg(long, env = "PODCACHE_ADDR", default_value = "http://127.0.0.1:8087")]
    addr: String,
    /// The CA that signed the node's REST certificate (PEM), for https://.
    #[arg(long, env = "PODCACHE_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), for a node with --http-tls-client-ca.
    #[arg(long, env = "PODCACHE_CERT", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "PODCACHE_KEY", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// A file holding the bearer token for a node with --auth-token-file.
    #[arg(long, env = "PODCACHE_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Print the node's JSON answers as they are.
    #[arg(long)]
    json: bool,
    /// Why (kept with every entry written: X-Podcache-Reason, at most 256
    /// bytes).
    #[arg(long, global = true)]
    reason: Option<String>,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CtlOp {
    /// Print one value.
    Get {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// The key.
        key: String,
    },
    /// Set one value, on this node and every replica.
    Set {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// The key.
        key: String,
        /// The value (UTF-8 text).
        value: String,
        /// Expire after this many seconds, on every replica at the same moment.
        #[arg(long)]
        ttl: Option<u64>,
        /// Wait until every peer acknowledged, and show what each said.
        #[arg(long)]
        wait: bool,
        /// Only if the entry is at exactly this version (as `get --json`
        /// or `history` shows it): a compare-and-set, decided by the
        /// decider. Otherwise nothing is written and the command fails,
        /// naming the current version.
        #[arg(long, value_name = "VERSION", conflicts_with = "if_absent")]
        if_version: Option<String>,
        /// Only if the key holds no value (create, never overwrite).
        #[arg(long)]
        if_absent: bool,
    },
    /// Delete one entry everywhere.
    Delete {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// The key.
        key: String,
        /// Wait until every peer acknowledged.
        #[arg(long)]
        wait: bool,
        /// Only if the entry is at exactly this version.
        #[arg(long, value_name = "VERSION")]
        if_version: Option<String>,
    },
    /// List a whole namespace.
    List {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
    },
    /// Follow every change to a namespace (or one key) live, until Ctrl-C.
    Watch {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
    },
    /// Write every entry (tombstones, versions and expiry included) to
    /// stdout as JSON lines: a backup `ctl import` takes back.
    Export {
        /// Only this namespace.
        #[arg(long = "type")]
        r#type: Option<i32>,
    },
    /// Merge a file written by `ctl export` into the cluster, by version:
    /// safe to run twice, or against a live cluster.
    Import {
        /// The file (`-` for stdin).
        file: std::path::PathBuf,
    },
    /// Show a key's versions on this node, newest first: values and
    /// deletions, who wrote them, where, when and why.
    History {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// The key.
        key: String,
    },
    /// Write the value (or the deletion) of an earlier version again, as a
    /// new version every replica converges on.
    Rollback {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// The key.
        key: String,
        /// The version to go back to (from `ctl history`).
        version: String,
        /// Wait until every peer acknowledged.
        #[arg(long)]
        wait: bool,
    },
    /// Set, show or delete a type's JSON Schema (draft 2020-12), checked
    /// on every write of the type.
    Schema {
        #[command(subcommand)]
        op: SchemaOp,
    },
    /// Show this node, its peers and their replication state.
    Cluster,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchemaOp {
    /// Set the type's schema from a file (`-` for stdin).
    Set {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// The schema's file (JSON).
        file: std::path::PathBuf,
        /// Wait until every peer acknowledged.
        #[arg(long)]
        wait: bool,
    },
    /// Print the type's schema (as JSON).
    Get {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
    },
    /// Delete the type's schema: its writes are no longer checked.
    Delete {
        /// The namespace (an int32, SyncData.type).
        r#type: i32,
        /// Wait until every peer acknowledged.
        #[arg(long)]
        wait: bool,
    },
}

/// The request of a `ctl schema` command.
fn schema_request(op: &SchemaOp) -> Result<(Method, String, String), Failure> {
    let path = |ty: i32, wait: bool| {
        let mut path = format!("/v1/schema/{ty}");
        if wait {
            path.push_str("?wait=all");
        }
        path
    };
    Ok(match op {
        SchemaOp::Set { r#type, file, wait } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| Failure::Config(format!("reading the schema from stdin: {e}")))?
            } else {
                std::fs::read_to_string(file)
                    .map_err(|e| Failure::Config(format!("{}: {e}", file.display())))?
            };
            (Method::PUT, path(*r#type, *wait), text)
        }
        SchemaOp::Get { r#type } => (Method::GET, path(*r#type, false), String::new()),
        SchemaOp::Delete { r#type, wait } => (Method::DELETE, path(*r#type, *wait), String::new()),
    })
}

pub(crate) async fn run(args: CtlArgs) -> Result<(), Failure> {
    let mut client = RestClient::new(&args.addr).map_err(|e| Failure::Config(e.to_string()))?;
    if let Some(ca) = &args.cacert {
        let identity = args.cert.as_deref().zip(args.key.as_deref());
        let config = podcache::http_tls::client_config(ca, identity)
            .map_err(|e| Failure::Config(e.to_string()))?;
        client = client.with_tls(config);
    }
    client
        .require_tls_for_https(args.cacert.is_some())
        .map_err(|e| Failure::Config(e.to_string()))?;
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| Failure::Config(format!("--token-file {}: {e}", path.display())))?;
        client = client
            .with_token(token.trim())
            .map_err(|e| Failure::Config(e.to_string()))?;
    }
    if let Some(reason) = &args.reason {
        client = client
            .with_reason(reason)
            .map_err(|e| Failure::Config(e.to_string()))?;
    }
    match &args.op {
        CtlOp::Watch { r#type, key } => {
            return ctl_watch(&client, *r#type, key.as_deref(), args.json).await;
        }
        CtlOp::Export { r#type } => return crate::backup::export(&client, *r#type).await,
        CtlOp::Import { file } => return crate::backup::import(&client, file).await,
        _ => {}
    }
    let mut headers: Vec<(&str, String)> = Vec::new();
    match &args.op {
        CtlOp::Set {
            if_version: Some(v),
            ..
        }
        | CtlOp::Delete {
            if_version: Some(v),
            ..
        } => headers.push(("If-Match", format!("\"{v}\""))),
        CtlOp::Set {
            if_absent: true, ..
        } => headers.push(("If-None-Match", "*".to_owned())),
        _ => {}
    }
    let (method, path, body) = match &args.op {
        CtlOp::Get { r#type, key } => (Method::GET, entry_path(*r#type, key), String::new()),
        CtlOp::Set {
            r#type,
            key,
            value,
            ttl,
            wait,
            ..
        } => {
            let mut query = Vec::new();
            if let Some(ttl) = ttl {
                query.push(format!("ttl={ttl}"));
            }
            if *wait {
                query.push("wait=all".to_owned());
            }
            let mut path = entry_path(*r#type, key);
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            (Method::PUT, path, value.clone())
        }
        CtlOp::Delete {
            r#type, key, wait, ..
        } => {
            let mut path = entry_path(*r#type, key);
            if *wait {
                path.push_str("?wait=all");
            }
            (Method::DELETE, path, String::new())
        }
        CtlOp::List { r#type } => (Method::GET, format!("/v1/cache/{type}"), String::new()),
        CtlOp::History { r#type, key } => (
            Method::GET,
            format!("{}/history", entry_path(*r#type, key)),
            String::new(),
        ),
        CtlOp::Rollback {
            r#type,
            key,
            version,
            wait,
        } => {
            let mut path = format!(
                "{}/rollback?version={}",
                entry_path(*r#type, key),
                podcache::client::percent_encode(version)
            );
            if *wait {
                path.push_str("&wait=all");
            }
            (Method::POST, path, String::new())
        }
        CtlOp::Watch { .. } | CtlOp::Export { .. } | CtlOp::Import { .. } => {
            return Ok(());
        }
        CtlOp::Schema { op } => schema_request(op)?,
        CtlOp::Cluster => (Method::GET, "/v1/cluster".to_owned(), String::new()),
    };
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let answer = client
        .request_with_headers(method, &path, body, &headers)
        .await
        .map_err(|e| Failure::Run(e.into()))?;
    let json = answer.json();
    if !answer.status.is_success() {
        let message = json["message"].as_str().unwrap_or("request failed");
        return Err(Failure::Run(anyhow::anyhow!(
            "{} ({})",
            message,
            answer.status
        )));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
        return Ok(());
    }
    match &args.op {
        CtlOp::Get { .. } => println!("{}", json["value"].as_str().unwrap_or_default()),
        CtlOp::Set { .. } | CtlOp::Delete { .. } | CtlOp::Rollback { .. } => {
            println!("version {}", json["version"].as_str().unwrap_or("?"));
            for report in json["replication"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} {:<22} {}",
                    report["name"].as_str().unwrap_or("?"),
                    report["peer"].as_str().unwrap_or("?"),
                    report["status"].as_str().unwrap_or("?")
                );
            }
        }
        CtlOp::List { r#type } => {
            let entries = json["entries"].as_object().filter(|e| !e.is_empty());
            // As kubectl does: nothing on stdout for nothing, a note on
            // stderr, exit 0.
            let Some(entries) = entries else {
                eprintln!("no entries in type {type}");
                return Ok(());
            };
            let width = entries.keys().map(|k| k.len()).max().unwrap_or(3).max(3);
            println!("{:<width$}  VALUE", "KEY");
            for (key, value) in entries {
                println!("{key:<width$}  {}", value.as_str().unwrap_or_default());
            }
        }
        CtlOp::History { .. } => print_history(&json),
        CtlOp::Schema {
            op: SchemaOp::Get { .. },
        } => println!(
            "{}",
            serde_json::to_string_pretty(&json["schema"]).unwrap_or_default()
        ),
        CtlOp::Schema { .. } => {
            println!("version {}", json["version"].as_str().unwrap_or("?"));
        }
        CtlOp::Cluster => print_cluster(&json),
        CtlOp::Watch { .. } | CtlOp::Export { .. } | CtlOp::Import { .. } => {}
    }
    Ok(())
}

/// Prints a key's versions, newest first (a header only above rows).
fn print_history(json: &Value) {
    let versions = json["versions"].as_array().filter(|v| !v.is_empty());
    let Some(versions) = versions else {
        eprintln!("no versions of this key on this node");
        return;
    };
    println!(
        "{:<34} {:<24} {:<16} {:<16} {:<24} VALUE",
        "VERSION", "WRITTEN AT", "AUTHOR", "ORIGIN", "REASON"
    );
    for v in versions {
        let text = |name: &str| v[name].as_str().unwrap_or("-").to_owned();
        let value = if v["deleted"].as_bool() == Some(true) {
            "(deleted)".to_owned()
        } else {
            text("value")
        };
        println!(
            "{:<34} {:<24} {:<16} {:<16} {:<24} {value}",
            text("version"),
            text("written_at"),
            text("author"),
            text("origin"),
            text("reason")
        );
    }
}

/// Prints every change event of a namespace as it arrives.
async fn ctl_watch(
    client: &RestClient,
    ty: i32,
    key: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    use http_body_util::BodyExt;
    let mut path = format!("/v1/watch/{ty}");
    if let Some(key) = key {
        path = format!("{path}?key={}", podcache::client::percent_encode(key));
    }
    let (status, mut body) = client
        .stream(&path)
        .await
        .map_err(|e| Failure::Run(e.into()))?;
    if !status.is_success() {
        return Err(Failure::Run(anyhow::anyhow!("watch refused ({status})")));
    }
    // The header goes above the first row, so an error before any change
    // (the node going away) is never printed under a header.
    let mut header = !json;
    let mut buffer = String::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let frame = tokio::select! {
            _ = &mut stop => return Ok(()),
            frame = body.frame() => frame,
        };
        let Some(frame) = frame else {
            return Err(Failure::Run(anyhow::anyhow!("the node closed the watch")));
        };
        let frame = frame.map_err(|e| Failure::Run(e.into()))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines().filter_map(|l| l.strip_prefix("data:")) {
                let Ok(event) = serde_json::from_str::<Value>(line.trim()) else {
                    continue;
                };
                if std::mem::take(&mut header) {
                    println!(
                        "{:<8} {:<24} {:<10} {:<34} VALUE",
                        "ORIGIN", "KEY", "CHANGE", "VERSION"
                    );
                }
                if json {
                    println!("{event}");
                } else if let Some(entries) = event["entries"].as_array() {
                    // A batch: one line per entry, marked as one change.
                    for entry in entries {
                        print_change(&event["origin"], entry, ["batch-set", "batch-del"]);
                    }
                } else {
                    print_change(&event["origin"], &event, ["set", "delete"]);
                }
            }
        }
    }
}

/// One line of `ctl watch`: how it arrived, the key, the change (`names`
/// of a set and of a delete), the version and the value.
fn print_change(origin: &Value, entry: &Value, names: [&str; 2]) {
    let change = names[usize::from(entry["deleted"] == true)];
    println!(
        "{:<8} {:<24} {:<10} {:<34} {}",
        origin.as_str().unwrap_or("?"),
        entry["key"].as_str().unwrap_or("?"),
        change,
        entry["version"].as_str().unwrap_or("?"),
        entry["value"].as_str().unwrap_or("")
    );
}

fn print_cluster(json: &Value) {
    let node = &json["node"];
    println!(
        "{:<28} {:<22} {:<7} {:<6} {:>6} {:>8}  LAST ERROR",
        "NAME", "GRPC", "STATUS", "OLDEST", "PENDING", "SENT"
    );
    println!(
        "{:<28} {:<22} {:<7} {:<6} {:>6} {:>8}  (this node)",
        node["name"].as_str().unwrap_or("?"),
        node["grpc_addr"].as_str().unwrap_or("?"),
        if node["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "pulling"
        },
        if node["oldest"].as_bool() == Some(true) {
            "yes"
        } else {
            ""
        },
        "-",
        "-",
    );
    for peer in json["peers"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:<22} {:<7} {:<6} {:>6} {:>8}  {}",
            peer["name"].as_str().unwrap_or("?"),
            peer["grpc_addr"].as_str().unwrap_or("?"),
            peer["status"].as_str().unwrap_or("?"),
            if peer["oldest"].as_bool() == Some(true) {
                "yes"
            } else {
                ""
            },
            peer["pending_entries"].to_string(),
            peer["sent_batches"].to_string(),
            peer["last_error"].as_str().unwrap_or(""),
        );
    }
    println!(
        "discovery: {} ({})",
        json["discovery"]["source"].as_str().unwrap_or("?"),
        json["discovery"]["state"].as_str().unwrap_or("?")
    );
}
