//! `podcache k8s-sim`: writes pod objects into etcd the way kube-apiserver
//! stores them, for demos and tests without a Kubernetes API server.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use podcache::discovery::pod::{parse_rfc3339_ms, parse_selector};
use podcache::etcd::EtcdClient;

use crate::Failure;
use crate::etcd_args::EtcdArgs;
use crate::k8s_sim::{PodEncoding, PodSimulator, SimPod};

#[derive(Debug, Args)]
pub(crate) struct K8sSimArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Which etcd API to write through (v2 writes JSON only).
    #[arg(long, default_value = "v3")]
    api: SimApi,
    /// How pods are stored (v3 only).
    #[arg(long, default_value = "protobuf")]
    encoding: SimEncoding,
    #[command(subcommand)]
    op: SimOp,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SimApi {
    V3,
    V2,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SimEncoding {
    Protobuf,
    Json,
}

#[derive(Debug, Subcommand)]
enum SimOp {
    /// Create or update a pod.
    Put {
        /// Pod name.
        #[arg(long)]
        name: String,
        /// Pod IP; without it the pod is Pending.
        #[arg(long)]
        ip: Option<String>,
        /// Host IP.
        #[arg(long, default_value = "127.0.0.1")]
        host_ip: String,
        /// Phase (Running when --ip is given, else Pending).
        #[arg(long)]
        phase: Option<String>,
        /// Labels, comma-separated key=value.
        #[arg(long, default_value = "app=hello")]
        labels: String,
        /// The container's startedAt (RFC 3339) [default: now].
        #[arg(long)]
        started_at: Option<String>,
        /// Mark the pod as being deleted.
        #[arg(long)]
        deleting: bool,
    },
    /// Delete a pod.
    Delete {
        /// Pod name.
        #[arg(long)]
        name: String,
    },
}

pub(crate) async fn run(args: K8sSimArgs) -> Result<(), Failure> {
    let settings = args.etcd.settings(Duration::from_secs(5))?;
    let namespace = args.etcd.namespace();
    let sim = match args.api {
        SimApi::V3 => {
            let client =
                EtcdClient::connect(&settings).map_err(|e| Failure::Config(e.to_string()))?;
            let encoding = match args.encoding {
                SimEncoding::Protobuf => PodEncoding::Protobuf,
                SimEncoding::Json => PodEncoding::Json,
            };
            PodSimulator::new(client, encoding)
        }
        SimApi::V2 => {
            PodSimulator::v2(&settings.endpoints[0]).map_err(|e| Failure::Config(e.to_string()))?
        }
    };
    match args.op {
        SimOp::Put {
            name,
            ip,
            host_ip,
            phase,
            labels,
            started_at,
            deleting,
        } => {
            let now = podcache::identity::unix_ms() as i64;
            let started = match started_at.as_deref() {
                None | Some("now") => now,
                Some(text) => parse_rfc3339_ms(text).ok_or_else(|| {
                    Failure::Config(format!("--started-at: {text:?} is not RFC 3339"))
                })?,
            };
            let mut label_map = std::collections::BTreeMap::new();
            for term in
                parse_selector(&labels).map_err(|e| Failure::Config(format!("--labels: {e}")))?
            {
                match term {
                    podcache::discovery::pod::LabelTerm::Equals(k, v) => {
                        label_map.insert(k, v);
                    }
                    _ => {
                        return Err(Failure::Config(
                            "--labels takes key=value terms only".into(),
                        ));
                    }
                }
            }
            let mut pod = SimPod::pending(&name, &namespace, "", started);
            pod.labels = label_map;
            if let Some(ip) = &ip {
                pod = pod.running(ip, &host_ip, started);
            }
            if let Some(phase) = phase {
                pod.phase = phase;
            }
            pod.deleting = deleting;
            let revision = sim.put(&pod).await.map_err(|e| Failure::Run(e.into()))?;
            println!(
                "{} {} ({}, revision {revision})",
                pod.key(),
                pod.phase,
                sim.describe()
            );
        }
        SimOp::Delete { name } => {
            let existed = sim
                .delete(&namespace, &name)
                .await
                .map_err(|e| Failure::Run(e.into()))?;
            if !existed {
                return Err(Failure::Run(anyhow::anyhow!(
                    "no pod {name} in namespace {namespace}"
                )));
            }
            println!("deleted {name}");
        }
    }
    Ok(())
}
