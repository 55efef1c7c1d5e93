//! Kubernetes remediation actions through kube-rs: restart a pod, rollout-restart a workload,
//! scale one up within a bound, clean a node's disk with a short-lived Job. This module owns the
//! client (created once from in-cluster config or a kubeconfig, then injected), the namespace
//! policy, server-side dry run, and the [`Change`] record every mutation leaves on the run.
//! [`actions`] holds the API calls, [`cleanup_job`] the Job and `find` command it runs.

pub mod actions;
pub mod cleanup_job;
pub mod names;

use std::time::Duration;

use crate::config::KubernetesSettings;
pub use crate::history::Change;
pub use crate::playbook::kubernetes::{Request, ACTIONS};
pub use names::{InvalidName, Namespace, ObjectName};

/// The text a kubernetes step fails with when no cluster is configured.
pub const NOT_CONFIGURED: &str =
    "kubernetes is not configured (set kubernetes.kubeconfig or KUBECONFIG, or run in a cluster)";

/// A connected cluster and the rules reactor follows in it; cheap to clone.
#[derive(Clone)]
pub struct Kubernetes {
    client: kube::Client,
    settings: KubernetesSettings,
}

/// Why an action did not do what it was asked. Its retry class: [`KubeError::class`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KubeError {
    #[error("{NOT_CONFIGURED}")]
    NotConfigured,
    #[error("namespace {0:?} is not allowed (kubernetes.namespaces)")]
    NamespaceDenied(String),
    /// A name or namespace that is not a valid Kubernetes name: refused before any call.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The action's own safety rules said no.
    #[error("refused: {0}")]
    Refused(String),
    #[error("{verb} {object}: {message} (HTTP {code})")]
    Api {
        verb: &'static str,
        object: String,
        code: u16,
        message: String,
    },
    #[error("{verb} {object}: {message}")]
    Client {
        verb: &'static str,
        object: String,
        message: String,
    },
    #[error("{verb} {object}: no answer within {}", humantime::format_duration(*.after))]
    Timeout {
        verb: &'static str,
        object: String,
        after: Duration,
    },
    #[error("bad parameters: {0}")]
    Params(String),
}

/// Errors creating the client at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("in-cluster config: {0}")]
    InCluster(String),
    #[error("kubernetes client: {0}")]
    Client(String),
}

impl Kubernetes {
    /// Creates the client from settings: a kubeconfig when one is set (`kubernetes.kubeconfig`,
    /// or `KUBECONFIG` folded into it by the config layer), else the pod's service account when
    /// `in_cluster`. `Ok(None)` when neither is configured: reactor then runs without Kubernetes.
    pub async fn connect(
        settings: &KubernetesSettings,
    ) -> Result<Option<Kubernetes>, ConnectError> {
        let mut config = if !settings.kubeconfig.is_empty() {
            let mut merged: Option<kube::config::Kubeconfig> = None;
            for path in &settings.kubeconfig {
                let err = |e: &dyn std::fmt::Display| ConnectError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                };
                let next = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
                merged = Some(match merged {
                    None => next,
                    Some(m) => m.merge(next).map_err(|e| err(&e))?,
                });
            }
            let kubeconfig = merged.expect("at least one path");
            let options = kube::config::KubeConfigOptions {
                context: settings.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| ConnectError::Kubeconfig {
                    path: settings
                        .kubeconfig
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":"),
                    message: e.to_string(),
                })?
        } else if settings.in_cluster {
            kube::Config::incluster().map_err(|e| ConnectError::InCluster(e.to_string()))?
        } else {
            return Ok(None);
        };
        // Each call is bounded by `request_timeout` in `actions`; the client's own timeouts
        // are a backstop a little later, so a slow API reads as a timeout, not a socket error.
        let backstop = settings
            .request_timeout
            .saturating_add(Duration::from_secs(1));
        config.connect_timeout = Some(settings.request_timeout);
        config.read_timeout = Some(backstop);
        config.write_timeout = Some(backstop);
        let client =
            kube::Client::try_from(config).map_err(|e| ConnectError::Client(e.to_string()))?;
        Ok(Some(Kubernetes::new(client, settings.clone())))
    }

    /// Wraps an existing client (tests inject one served by the fake API).
    pub fn new(client: kube::Client, settings: KubernetesSettings) -> Kubernetes {
        Kubernetes { client, settings }
    }

    pub fn settings(&self) -> &KubernetesSettings {
        &self.settings
    }

    /// The client, for the Leases of leader election and the cluster-held guards.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Deny wins; an empty allow list allows every namespace not denied. Only a valid
    /// [`Namespace`] gets here, so the lists compare with what the API server will act on.
    pub fn check_namespace(&self, namespace: &Namespace) -> Result<(), KubeError> {
        let namespace = namespace.as_str();
        let ns = &self.settings.namespaces;
        let denied = ns.deny.iter().any(|d| d == namespace);
        let allowed = ns.allow.is_empty() || ns.allow.iter().any(|a| a == namespace);
        if denied || !allowed {
            return Err(KubeError::NamespaceDenied(namespace.to_owned()));
        }
        Ok(())
    }
}

/// Runs a request against the cluster (or fails with `kubernetes is not configured`). Every name
/// and namespace is checked first ([`names`]): a refused one fails the request before any call.
/// Every mutation, successful or not, is appended to `changes`; `deadline` is the step's.
pub async fn run(
    kube: Option<&Kubernetes>,
    request: &Request,
    dry_run: bool,
    deadline: std::time::Instant,
    changes: &mut Vec<Change>,
) -> Result<serde_json::Value, KubeError> {
    let Some(kube) = kube else {
        return Err(KubeError::NotConfigured);
    };
    let mut ctx = actions::Ctx {
        kube,
        dry_run,
        deadline,
        changes,
    };
    match request {
        Request::RestartPod {
            namespace,
            pod,
            allow_standalone,
        } => {
            let ns = Namespace::parse("namespace", namespace)?;
            let pod = ObjectName::parse("pod", pod)?;
            ctx.restart_pod(&ns, &pod, *allow_standalone).await
        }
        Request::RolloutRestart {
            namespace,
            kind,
            name,
        } => {
            let ns = Namespace::parse("namespace", namespace)?;
            let name = ObjectName::parse("name", name)?;
            ctx.rollout_restart(&ns, kind, &name).await
        }
        Request::ScaleUp {
            namespace,
            kind,
            name,
            by,
            factor,
            max_replicas,
        } => {
            let ns = Namespace::parse("namespace", namespace)?;
            let name = ObjectName::parse("name", name)?;
            let by = actions::ScaleBy::new(*by, *factor).map_err(KubeError::Params)?;
            ctx.scale_up(&ns, kind, &name, by, *max_replicas).await
        }
        Request::DiskCleanup {
            node,
            path,
            glob,
            older_than,
        } => {
            let node = ObjectName::parse("node", node)?;
            ctx.disk_cleanup(&node, path, glob, older_than).await
        }
    }
}
