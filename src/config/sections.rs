//! The settings of each part of reactor: authentication of the API, limits of the webhook and
//! the runs, the Rhai sandbox, Kubernetes, history retention and the watchdog. Their defaults
//! are here; their ranges are checked by [`super::Settings::validate`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::alertmanager::Secret;

use super::{duration, paths};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// When set, requests (except `/healthz`) may authenticate with `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// When set, requests may authenticate with HTTP basic auth (Alertmanager's `basic_auth`).
    pub basic: Option<BasicAuth>,
}

impl AuthSettings {
    pub fn enabled(&self) -> bool {
        self.bearer_token.is_some() || self.basic.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

/// Self-checks, the heartbeat and `ReactorUnhealthy`. See docs/operations.md, "When reactor itself
/// breaks".
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchdogSettings {
    /// How often the self-checks run and `ReactorHeartbeat` is posted (it lives 3 intervals).
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Accepted alerts waiting this long with no run starting: the `dispatcher` check fails.
    #[serde(deserialize_with = "duration")]
    pub stall_after: Duration,
    /// A run this long past its own deadline (steps' timeouts, retries, delays): `stuck_runs`.
    #[serde(deserialize_with = "duration")]
    pub stuck_grace: Duration,
    /// A page undelivered for this long: the `escalation_backlog` check fails.
    #[serde(deserialize_with = "duration")]
    pub backlog_after: Duration,
    /// Channels paged directly when the paging path itself is broken: Alertmanager unreachable,
    /// or the dead man's switch alert missing.
    pub channels: Vec<String>,
    /// Alertmanager unreachable this long: the watchdog channels are paged.
    #[serde(deserialize_with = "duration")]
    pub alertmanager_down_after: Duration,
}

impl Default for WatchdogSettings {
    fn default() -> Self {
        WatchdogSettings {
            heartbeat_interval: Duration::from_secs(10),
            stall_after: Duration::from_secs(60),
            stuck_grace: Duration::from_secs(60),
            backlog_after: Duration::from_secs(300),
            channels: Vec::new(),
            alertmanager_down_after: Duration::from_secs(120),
        }
    }
}

/// Retention of the run history, enforced by a background task.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    pub max_runs: usize,
    #[serde(deserialize_with = "duration")]
    pub prune_interval: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            max_age: Duration::from_secs(30 * 86_400),
            max_runs: 1_000_000,
            prune_interval: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest webhook body accepted; larger is 413.
    pub max_body_bytes: usize,
    /// Most alerts in one webhook payload; more is 413.
    pub max_alerts_per_payload: usize,
    /// Most labels on one alert; more is 400.
    pub max_labels_per_alert: usize,
    /// Longest label name or value, and longest annotation value, in bytes; longer is 400.
    pub max_label_bytes: usize,
    /// Accepted alerts waiting for a worker; when full, webhooks get 503 with Retry-After.
    pub queue_capacity: usize,
    /// Runs executing at once.
    pub max_concurrent_runs: usize,
    /// On SIGTERM, how long in-flight runs may finish before the process exits anyway; open
    /// HTTP connections get as long to finish their requests.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Open HTTP connections at most; also kept 128 below the file-descriptor limit. At the cap
    /// the connection idle longest is closed to make room, or, with none idle, new connections
    /// wait in the listen backlog.
    pub max_connections: usize,
    /// From a request's first byte to the end of its headers; slower, the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress (new, or kept alive after one) that sends nothing
    /// for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Reading a whole webhook body; slower is 408 and the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// Webhook bodies being received at once, in bytes, all connections together; a body that
    /// does not fit is 503 with Retry-After (Alertmanager retries it).
    pub max_buffered_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_alerts_per_payload: 1_000,
            max_labels_per_alert: 128,
            max_label_bytes: 16 * 1024,
            queue_capacity: 10_000,
            max_concurrent_runs: 64,
            shutdown_grace: Duration::from_secs(10),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            max_buffered_body_bytes: 64 << 20,
        }
    }
}

/// Limits of the Rhai sandbox, applied to every script.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxLimits {
    /// Operations per evaluation; 0 means unlimited (the wall-clock timeout still applies).
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    /// Bytes one evaluation may hold at once (strings, arrays, maps, the engine's own), checked
    /// as it grows: Rhai's size limits apply to each value, not to their sum.
    pub max_memory_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            max_operations: 5_000_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 1 << 20,
            max_array_size: 100_000,
            max_map_size: 10_000,
            max_memory_bytes: 32 << 20,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskCleanupSettings {
    /// Directories `disk_cleanup` may delete under. Empty: the helper refuses every call.
    pub allowed_roots: Vec<PathBuf>,
}

/// The programs scripts (`exec()`) and `command:` steps may run. Empty: every call is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecSettings {
    /// Absolute paths of the programs allowed, compared exactly.
    pub allow: Vec<PathBuf>,
    /// Bytes kept of each of a program's stdout and stderr; the rest is dropped.
    pub max_output_bytes: usize,
}

impl Default for ExecSettings {
    fn default() -> Self {
        ExecSettings {
            allow: Vec::new(),
            max_output_bytes: 64 << 10,
        }
    }
}

/// The URLs scripts may call with `http::get/post/put/delete`. Empty: every call is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// URL prefixes (`https://admin.internal/api/`): scheme, host, port and the start of the path.
    pub allow: Vec<String>,
    /// Bytes kept of a response body; the rest is dropped.
    pub max_body_bytes: usize,
    /// Headers added to the requests under a prefix, with values from a file or the environment.
    pub credentials: Vec<HttpCredential>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            allow: Vec::new(),
            max_body_bytes: 1 << 20,
            credentials: Vec::new(),
        }
    }
}

/// A header with a secret value, added to every request under `prefix`. The value is read from
/// `value_file` at each request, or from the environment variable `value_env` at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCredential {
    pub prefix: String,
    pub header: String,
    #[serde(default)]
    pub value_file: Option<PathBuf>,
    #[serde(default)]
    pub value_env: Option<String>,
    /// `value_env`'s value, read when the settings are loaded.
    #[serde(skip)]
    pub value: Option<Secret>,
}

/// Parses a URL prefix of `http.allow` or `http.credentials`: an http or https URL with a host,
/// without credentials, query or fragment; normalized as every request URL is.
pub fn url_prefix(prefix: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(prefix).map_err(|e| format!("{prefix:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{prefix:?}: expected an http:// or https:// URL with a host"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{prefix:?}: a prefix may not carry credentials (use http.credentials)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{prefix:?}: a prefix has no query or fragment"));
    }
    Ok(url)
}

/// The cluster reactor acts on. Nothing here set (and no `KUBECONFIG`, not in a pod): reactor
/// runs without Kubernetes and kubernetes steps fail with `kubernetes is not configured`.
/// `~/.kube/config` is never read implicitly: a remediation engine must not act on whichever
/// cluster a workstation happens to point at.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesSettings {
    /// Kubeconfig file(s), merged in order. `KUBECONFIG` (colon-separated) fills it when unset.
    #[serde(deserialize_with = "paths")]
    pub kubeconfig: Vec<PathBuf>,
    /// Kubeconfig context; its current-context when unset.
    pub context: Option<String>,
    /// Use the pod's service account. Set automatically when `KUBERNETES_SERVICE_HOST` is in the
    /// environment and no kubeconfig is configured.
    pub in_cluster: bool,
    /// Bound on every API call (and the client's connect/read/write timeouts).
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    pub namespaces: NamespacePolicy,
    pub disk_cleanup: CleanupJobSettings,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        KubernetesSettings {
            kubeconfig: Vec::new(),
            context: None,
            in_cluster: false,
            request_timeout: Duration::from_secs(10),
            namespaces: NamespacePolicy::default(),
            disk_cleanup: CleanupJobSettings::default(),
        }
    }
}

/// Namespaces kubernetes actions may change. Deny wins; an empty allow list allows the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespacePolicy {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        NamespacePolicy {
            allow: Vec::new(),
            deny: vec!["kube-system".into()],
        }
    }
}

/// The `disk_cleanup` kubernetes action's Job.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanupJobSettings {
    /// Namespace the Jobs run in (subject to `kubernetes.namespaces`).
    pub namespace: String,
    pub image: String,
    /// Host directories a Job may delete under. Empty: every cleanup Job is refused.
    pub allowed_host_paths: Vec<PathBuf>,
    /// Longest a Job may run (also bounded by the step's timeout).
    #[serde(deserialize_with = "duration")]
    pub job_deadline: Duration,
    /// How often the Job's status is read while waiting.
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// `ttlSecondsAfterFinished`: removes the Job if reactor could not.
    #[serde(deserialize_with = "duration")]
    pub ttl_after_finished: Duration,
}

impl Default for CleanupJobSettings {
    fn default() -> Self {
        CleanupJobSettings {
            namespace: "reactor".into(),
            image: "busybox:1.36".into(),
            allowed_host_paths: Vec::new(),
            job_deadline: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
            ttl_after_finished: Duration::from_secs(600),
        }
    }
}

/// reactor's own incidents: the service a failed run opens an incident for when its playbook
/// names none (`escalate.incident.service`). Unset: only playbooks that name one open incidents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncidentSettings {
    pub service: Option<String>,
    /// The service reactor's own failing self-checks (`ReactorUnhealthy`) open incidents for.
    pub reactor_service: Option<String>,
}

/// Two or more replicas with one leader, elected through a Kubernetes Lease: only the leader takes
/// alerts, runs playbooks, sends heartbeats and pages; the others answer 503 until they lead.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HaSettings {
    pub enabled: bool,
    /// The leader's Lease (`coordination.k8s.io/v1`).
    pub lease_name: String,
    /// Where the Leases live; default the pod's namespace (in a cluster), else `default`.
    pub namespace: Option<String>,
    /// How long a Lease holds without renewal.
    #[serde(deserialize_with = "duration")]
    pub lease_duration: Duration,
    #[serde(deserialize_with = "duration")]
    pub renew_every: Duration,
    /// Subtracted from the Lease's end before a step acts: clocks of two nodes may differ.
    #[serde(deserialize_with = "duration")]
    pub clock_skew: Duration,
    /// This replica's name in the Lease; default `POD_NAME`, else the host name.
    pub identity: Option<String>,
    /// Label this replica's own pod (named by the identity) `reactor.dev/role: leader` or
    /// `standby`, so a Service can select the leader while both pods stay Ready.
    pub label_pod: bool,
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            enabled: false,
            lease_name: "reactor".into(),
            namespace: None,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            clock_skew: Duration::from_secs(2),
            identity: None,
            label_pod: true,
        }
    }
}
