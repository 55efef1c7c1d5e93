//! Settings, layered: embedded defaults, then a YAML file (`--config`), then `REACTOR_*`
//! environment variables, then command-line flags. Everything the service needs to start is here,
//! validated once, so nothing deeper reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod alertmanager;
mod channels;
mod sections;

pub use alertmanager::*;
pub use channels::*;
pub use sections::*;

/// What an accepted alert survives once the webhook has answered 2xx (setting `durability`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// sled's flush: the log is written and synced with `sync_file_range`. Survives reactor
    /// being killed or crashing. A kernel crash or power loss may lose the last few seconds of
    /// answers: that call flushes neither the disk's write cache nor the file's metadata.
    #[default]
    Process,
    /// sled's flush, then one `fdatasync` of its log per group commit (each database's log
    /// after its own flushes): also survives a kernel crash or power loss, at the cost measured
    /// with the load benchmark (docs/performance.md).
    Power,
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // serde's names, so the environment and the YAML file accept the same words.
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("durability must be process or power, got {s:?}"))
    }
}

/// All of reactor's settings. See docs/operations.md, Configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// What an accepted alert survives once answered: `process` (default) or `power`.
    pub durability: Durability,
    pub playbooks_dir: PathBuf,
    pub scripts_dir: PathBuf,
    /// Teams and the services they own (`*.yaml`); a missing directory holds none.
    pub oncall_dir: PathBuf,
    /// Base URL humans use to reach reactor, for links in pages. Defaults to `http://<listen>`.
    pub external_url: Option<String>,
    pub auth: AuthSettings,
    pub alertmanager: AlertmanagerSettings,
    pub limits: Limits,
    pub sandbox: SandboxLimits,
    pub disk_cleanup: DiskCleanupSettings,
    pub exec: ExecSettings,
    pub http: HttpSettings,
    pub kubernetes: KubernetesSettings,
    pub history: HistorySettings,
    pub watchdog: WatchdogSettings,
    /// Notification channels by name, besides the built-in `alertmanager`.
    pub channels: std::collections::BTreeMap<String, ChannelSettings>,
    /// Where pages go when a playbook names no `escalate.to`.
    pub route: RouteSettings,
    pub storm: StormSettings,
    pub deadman: DeadmanSettings,
    pub incidents: IncidentSettings,
    pub ha: HaSettings,
    /// `shadow`: every playbook runs in shadow mode (`REACTOR_MODE`).
    pub mode: crate::playbook::Mode,
    /// Global dry run: scripts see `dry_run == true` and `disk_cleanup` deletes nothing.
    pub dry_run: bool,
    /// Allow listening on a non-loopback address without authentication.
    pub insecure: bool,
    /// Reload the playbooks when a file in the playbook or script directory changes.
    pub watch: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9097)),
            data_dir: "data".into(),
            durability: Durability::default(),
            playbooks_dir: "playbooks".into(),
            scripts_dir: "scripts".into(),
            oncall_dir: "oncall".into(),
            external_url: None,
            auth: AuthSettings::default(),
            alertmanager: AlertmanagerSettings::default(),
            limits: Limits::default(),
            sandbox: SandboxLimits::default(),
            disk_cleanup: DiskCleanupSettings::default(),
            exec: ExecSettings::default(),
            http: HttpSettings::default(),
            kubernetes: KubernetesSettings::default(),
            history: HistorySettings::default(),
            watchdog: WatchdogSettings::default(),
            channels: Default::default(),
            route: RouteSettings::default(),
            storm: StormSettings::default(),
            deadman: DeadmanSettings::default(),
            incidents: IncidentSettings::default(),
            ha: HaSettings::default(),
            mode: crate::playbook::Mode::Live,
            dry_run: false,
            insecure: false,
            watch: false,
        }
    }
}

/// Command-line overrides; `None` leaves the lower layers in place.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub playbooks_dir: Option<PathBuf>,
    pub scripts_dir: Option<PathBuf>,
    pub alertmanager_url: Option<String>,
    pub insecure: bool,
    pub watch: bool,
}

/// A setting outside its range: its dotted path and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub message: String,
}

/// The line of the YAML key at dotted `path` (`sandbox.max_call_levels`), found by indentation:
/// each part of the path must be a key nested under the previous one.
fn line_of(text: &str, path: &str) -> Option<u64> {
    let mut parts = path.split('.').peekable();
    let mut want = parts.next()?;
    let mut parent_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if parent_indent.is_some_and(|p| indent <= p) {
            return None; // left the parent's block without finding the key
        }
        let is_key = trimmed
            .strip_prefix(want)
            .is_some_and(|rest| rest.trim_start().starts_with(':'));
        if is_key {
            match parts.next() {
                None => return Some(i as u64 + 1),
                Some(next) => {
                    want = next;
                    parent_indent = Some(indent);
                }
            }
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}", line = line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
    Parse {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl Settings {
    /// Loads the layers in order: defaults, `file`, the process environment, `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let mut s = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                if text.trim().is_empty() {
                    Settings::default()
                } else {
                    serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
                        path: path.to_owned(),
                        line: e.location().map(|l| l.line()),
                        message: e.to_string().lines().next().unwrap_or_default().to_owned(),
                    })?
                }
            }
            None => Settings::default(),
        };
        s.apply_env(|k| std::env::var(k).ok())?;
        s.apply(overrides);
        s.alertmanager = std::mem::take(&mut s.alertmanager).validated()?;
        if let Err(e) = s.validate() {
            let path = file.map_or_else(|| PathBuf::from("settings"), Path::to_owned);
            let line = file
                .and_then(|f| std::fs::read_to_string(f).ok())
                .and_then(|text| line_of(&text, e.field));
            return Err(ConfigError::Parse {
                path,
                line,
                message: e.message,
            });
        }
        Ok(s)
    }

    /// Checks every number against its range in [`crate::bounds`], and the settings that only
    /// make sense together. `load` calls it; so does `Application::build` for settings made in
    /// code.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        use crate::bounds::*;
        let (c, d) = (in_count, in_span);
        let sb = &self.sandbox;
        c(
            "sandbox.max_operations",
            sb.max_operations as usize,
            SANDBOX_OPERATIONS,
        )?;
        c(
            "sandbox.max_call_levels",
            sb.max_call_levels,
            SANDBOX_CALL_LEVELS,
        )?;
        c(
            "sandbox.max_expr_depth",
            sb.max_expr_depth,
            SANDBOX_EXPR_DEPTH,
        )?;
        c(
            "sandbox.max_string_size",
            sb.max_string_size,
            SANDBOX_STRING_SIZE,
        )?;
        c(
            "sandbox.max_array_size",
            sb.max_array_size,
            SANDBOX_ARRAY_SIZE,
        )?;
        c("sandbox.max_map_size", sb.max_map_size, SANDBOX_MAP_SIZE)?;
        c(
            "sandbox.max_memory_bytes",
            sb.max_memory_bytes,
            SANDBOX_MEMORY,
        )?;
        c(
            "exec.max_output_bytes",
            self.exec.max_output_bytes,
            EXEC_OUTPUT_BYTES,
        )?;
        if let Some(relative) = self.exec.allow.iter().find(|p| !p.is_absolute()) {
            return Err(InvalidSetting {
                field: "exec.allow",
                message: format!(
                    "exec.allow: {} is not an absolute path (programs are never looked up in PATH)",
                    relative.display()
                ),
            });
        }
        c(
            "http.max_body_bytes",
            self.http.max_body_bytes,
            HTTP_BODY_BYTES,
        )?;
        let http = |message: String| InvalidSetting {
            field: "http",
            message,
        };
        let mut allowed = Vec::new();
        for prefix in &self.http.allow {
            allowed.push(url_prefix(prefix).map_err(|m| http(format!("http.allow: {m}")))?);
        }
        for c in &self.http.credentials {
            let prefix =
                url_prefix(&c.prefix).map_err(|m| http(format!("http.credentials: {m}")))?;
            if !allowed
                .iter()
                .any(|a| a.origin() == prefix.origin() && prefix.path().starts_with(a.path()))
            {
                return Err(http(format!(
                    "http.credentials: {} is not under a prefix in http.allow",
                    c.prefix
                )));
            }
            if reqwest::header::HeaderName::from_bytes(c.header.as_bytes()).is_err() {
                return Err(http(format!(
                    "http.credentials: {:?} is not a header name",
                    c.header
                )));
            }
            if c.value_file.is_some() == c.value_env.is_some() {
                return Err(http(format!(
                    "http.credentials for {}: set value_file or value_env (one of them)",
                    c.prefix
                )));
            }
        }
        let l = &self.limits;
        c("limits.max_body_bytes", l.max_body_bytes, MAX_BODY_BYTES)?;
        c(
            "limits.max_alerts_per_payload",
            l.max_alerts_per_payload,
            MAX_ALERTS_PER_PAYLOAD,
        )?;
        c(
            "limits.max_labels_per_alert",
            l.max_labels_per_alert,
            MAX_LABELS_PER_ALERT,
        )?;
        c("limits.max_label_bytes", l.max_label_bytes, MAX_LABEL_BYTES)?;
        c("limits.queue_capacity", l.queue_capacity, QUEUE_CAPACITY)?;
        c(
            "limits.max_concurrent_runs",
            l.max_concurrent_runs,
            MAX_CONCURRENT_RUNS,
        )?;
        c("limits.max_connections", l.max_connections, MAX_CONNECTIONS)?;
        d(
            "limits.header_read_timeout",
            l.header_read_timeout,
            CONNECTION_TIMEOUT,
        )?;
        d("limits.idle_timeout", l.idle_timeout, CONNECTION_TIMEOUT)?;
        d(
            "limits.body_read_timeout",
            l.body_read_timeout,
            CONNECTION_TIMEOUT,
        )?;
        c(
            "limits.max_buffered_body_bytes",
            l.max_buffered_body_bytes,
            BUFFERED_BODY_BYTES,
        )?;
        if l.max_buffered_body_bytes < l.max_body_bytes {
            // A body the budget could never hold would be answered 503 forever.
            return Err(InvalidSetting {
                field: "limits.max_buffered_body_bytes",
                message: format!(
                    "limits.max_buffered_body_bytes ({}) must be at least limits.max_body_bytes ({})",
                    l.max_buffered_body_bytes, l.max_body_bytes
                ),
            });
        }
        d("limits.shutdown_grace", l.shutdown_grace, SHUTDOWN_GRACE)?;
        if l.max_alerts_per_payload > l.queue_capacity {
            // A payload that can never fit the queue would be answered 503 forever.
            return Err(InvalidSetting {
                field: "limits.max_alerts_per_payload",
                message: format!(
                    "limits.max_alerts_per_payload ({}) must not exceed limits.queue_capacity ({})",
                    l.max_alerts_per_payload, l.queue_capacity
                ),
            });
        }
        let am = &self.alertmanager;
        d("alertmanager.timeout", am.timeout, PEER_TIMEOUT)?;
        d(
            "alertmanager.retry_backoff",
            am.retry_backoff,
            RETRY_BACKOFF,
        )?;
        d("alertmanager.page_ttl", am.page_ttl, PAGE_TTL)?;
        d(
            "alertmanager.poll_interval",
            am.poll_interval,
            POLL_INTERVAL,
        )?;
        let w = &self.watchdog;
        d(
            "watchdog.heartbeat_interval",
            w.heartbeat_interval,
            WATCHDOG_INTERVAL,
        )?;
        d("watchdog.stall_after", w.stall_after, WATCHDOG_INTERVAL)?;
        d("watchdog.stuck_grace", w.stuck_grace, WATCHDOG_INTERVAL)?;
        d("watchdog.backlog_after", w.backlog_after, WATCHDOG_INTERVAL)?;
        self.validate_paging()?;
        let h = &self.history;
        d("history.max_age", h.max_age, HISTORY_MAX_AGE)?;
        c("history.max_runs", h.max_runs, HISTORY_MAX_RUNS)?;
        d("history.prune_interval", h.prune_interval, PRUNE_INTERVAL)?;
        let ha = &self.ha;
        d("ha.lease_duration", ha.lease_duration, LEASE_DURATION)?;
        d("ha.renew_every", ha.renew_every, LEASE_RENEW)?;
        d("ha.clock_skew", ha.clock_skew, LEASE_SKEW)?;
        if ha.renew_every.saturating_add(ha.clock_skew) >= ha.lease_duration {
            // Renewals must land before the Lease ends, margin included.
            return Err(InvalidSetting {
                field: "ha.renew_every",
                message: format!(
                    "ha.renew_every ({}) plus ha.clock_skew ({}) must be shorter than ha.lease_duration ({})",
                    humantime::format_duration(ha.renew_every),
                    humantime::format_duration(ha.clock_skew),
                    humantime::format_duration(ha.lease_duration)
                ),
            });
        }
        if ha.enabled && !self.kubernetes.in_cluster && self.kubernetes.kubeconfig.is_empty() {
            return Err(InvalidSetting {
                field: "ha.enabled",
                message: "ha.enabled needs the Kubernetes API: run in a cluster, or set kubernetes.kubeconfig".into(),
            });
        }
        let k = &self.kubernetes;
        d(
            "kubernetes.request_timeout",
            k.request_timeout,
            PEER_TIMEOUT,
        )?;
        let j = &k.disk_cleanup;
        d(
            "kubernetes.disk_cleanup.job_deadline",
            j.job_deadline,
            JOB_DEADLINE,
        )?;
        d(
            "kubernetes.disk_cleanup.poll_interval",
            j.poll_interval,
            JOB_POLL_INTERVAL,
        )?;
        d(
            "kubernetes.disk_cleanup.ttl_after_finished",
            j.ttl_after_finished,
            JOB_TTL,
        )?;
        Ok(())
    }

    /// `REACTOR_*` variables; `get` is injected so tests need not touch the process environment.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("REACTOR_LISTEN") {
            self.listen = parse_listen(&v).map_err(|message| ConfigError::Env {
                name: "REACTOR_LISTEN",
                message,
            })?;
        }
        let path = |k: &str, target: &mut PathBuf| {
            if let Some(v) = get(k) {
                *target = v.into();
            }
        };
        path("REACTOR_DATA_DIR", &mut self.data_dir);
        if let Some(v) = get("REACTOR_DURABILITY") {
            self.durability = v.parse().map_err(|message| ConfigError::Env {
                name: "REACTOR_DURABILITY",
                message,
            })?;
        }
        path("REACTOR_PLAYBOOKS_DIR", &mut self.playbooks_dir);
        path("REACTOR_SCRIPTS_DIR", &mut self.scripts_dir);
        path("REACTOR_ONCALL_DIR", &mut self.oncall_dir);
        if let Some(v) = get("REACTOR_ALERTMANAGER_URL") {
            self.alertmanager.url = Some(v);
        }
        self.alertmanager.apply_env(&get);
        if let Some(v) = get("REACTOR_AUTH_TOKEN") {
            self.auth.bearer_token = Some(v).filter(|t| !t.is_empty());
        }
        if let Some(v) = get("REACTOR_EXTERNAL_URL") {
            self.external_url = Some(v);
        }
        if self.kubernetes.kubeconfig.is_empty() {
            if let Some(v) = get("KUBECONFIG").filter(|v| !v.is_empty()) {
                self.kubernetes.kubeconfig = std::env::split_paths(&v).collect();
            } else if get("KUBERNETES_SERVICE_HOST").is_some() {
                self.kubernetes.in_cluster = true;
            }
        }
        for c in &mut self.http.credentials {
            if let Some(var) = &c.value_env {
                let value = get(var)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| ConfigError::Env {
                        name: "http.credentials",
                        message: format!(
                            "value_env {var} is not set (the credential for {})",
                            c.prefix
                        ),
                    })?;
                c.value = Some(Secret::new(value));
            }
        }
        resolve_channels(&mut self.channels, &get).map_err(|(_, message)| ConfigError::Env {
            name: "channels",
            message,
        })?;
        if let Some(v) = get("REACTOR_MODE") {
            self.mode = match v.as_str() {
                "live" => crate::playbook::Mode::Live,
                "shadow" => crate::playbook::Mode::Shadow,
                other => {
                    return Err(ConfigError::Env {
                        name: "REACTOR_MODE",
                        message: format!("expected live or shadow, got {other:?}"),
                    })
                }
            };
        }
        if let Some(v) = get("REACTOR_HA_ENABLED") {
            self.ha.enabled = parse_bool(&v).map_err(|message| ConfigError::Env {
                name: "REACTOR_HA_ENABLED",
                message,
            })?;
        }
        if self.ha.identity.is_none() {
            self.ha.identity = get("POD_NAME").filter(|v| !v.is_empty());
        }
        if self.ha.namespace.is_none() {
            self.ha.namespace = get("POD_NAMESPACE").filter(|v| !v.is_empty());
        }
        if let Some(v) = get("REACTOR_DRY_RUN") {
            self.dry_run = parse_bool(&v).map_err(|message| ConfigError::Env {
                name: "REACTOR_DRY_RUN",
                message,
            })?;
        }
        Ok(())
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &o.playbooks_dir {
            self.playbooks_dir = v.clone();
        }
        if let Some(v) = &o.scripts_dir {
            self.scripts_dir = v.clone();
        }
        if let Some(v) = &o.alertmanager_url {
            self.alertmanager.url = Some(v.clone());
        }
        self.insecure |= o.insecure;
        self.watch |= o.watch;
    }

    /// Every channel a route may name: `alertmanager` and the configured ones.
    pub fn channel_names(&self) -> Vec<&str> {
        std::iter::once(ALERTMANAGER_CHANNEL)
            .chain(self.channels.keys().map(String::as_str))
            .collect()
    }

    /// Whether channel `name` needs a person's address to page one person (email, Slack,
    /// Opsgenie); without one the page reaches the channel's whole audience.
    pub fn channel_needs_address(&self, name: &str) -> bool {
        matches!(
            self.channels.get(name).map(|c| &c.kind),
            Some(ChannelKind::Email(_) | ChannelKind::Slack(_) | ChannelKind::Opsgenie(_))
        )
    }

    /// The base URL for links to runs.
    pub fn external_url(&self, bound: SocketAddr) -> String {
        self.external_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"))
            .trim_end_matches('/')
            .to_owned()
    }
}

/// `v` within `r`, else the setting `field` outside its range.
fn in_count(field: &'static str, v: usize, r: crate::bounds::Count) -> Result<(), InvalidSetting> {
    r.check(field, v as u64)
        .map(drop)
        .map_err(|message| InvalidSetting { field, message })
}

/// `v` within `r`, else the setting `field` outside its range.
fn in_span(field: &'static str, v: Duration, r: crate::bounds::Span) -> Result<(), InvalidSetting> {
    r.check(field, v)
        .map(drop)
        .map_err(|message| InvalidSetting { field, message })
}

/// A listen address: `IP:PORT` (`127.0.0.1:9097`, `[::1]:9097`), or `localhost:PORT` for the
/// IPv4 loopback. Other host names are refused rather than resolved: what a name resolves to can
/// change under a running service, and an address bound by accident may expose it.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected =
        || format!("expected IP:PORT or localhost:PORT, e.g. 127.0.0.1:9097, got {text:?}");
    match text.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
            let port: u16 = port.parse().map_err(|_| expected())?;
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        }
        _ => Err(expected()),
    }
}

fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen(&s).map_err(serde::de::Error::custom)
}

/// A boolean from the environment: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, in any case.
/// Anything else is an error, so that a typo cannot turn dry run off.
fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!(
            "expected true or false (also 1/0, yes/no, on/off), got {v:?}"
        )),
    }
}

/// One path or a list of paths.
fn paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// A duration setting; its range is checked by [`Settings::validate`] once every layer applied.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    crate::bounds::parse_duration("duration", &s, crate::bounds::ANY)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boolean_variable_is_read_in_any_case_and_a_typo_is_refused() {
        let with = |v: &str| {
            let mut s = Settings::default();
            let v = v.to_owned();
            s.apply_env(|k| (k == "REACTOR_DRY_RUN").then(|| v.clone()))
                .map(|()| s.dry_run)
                .map_err(|e| e.to_string())
        };
        for v in ["True", "TRUE", "1", "yes", "On"] {
            assert_eq!(with(v), Ok(true), "{v}");
        }
        for v in ["false", "False", "0", "no", "OFF"] {
            assert_eq!(with(v), Ok(false), "{v}");
        }
        let e = with("ture").unwrap_err();
        assert!(
            e.contains("REACTOR_DRY_RUN") && e.contains("\"ture\""),
            "{e}"
        );
    }

    #[test]
    fn http_prefixes_and_credentials_are_checked_and_secrets_come_from_the_environment() {
        let credential = |prefix: &str, file: bool, env: bool| HttpCredential {
            prefix: prefix.into(),
            header: "Authorization".into(),
            value_file: file.then(|| "/run/secrets/t".into()),
            value_env: env.then(|| "ADMIN_TOKEN".into()),
            value: None,
        };
        let with = |allow: &[&str], credentials: Vec<HttpCredential>| {
            let mut s = Settings::default();
            s.http.allow = allow.iter().map(|a| a.to_string()).collect();
            s.http.credentials = credentials;
            s.validate().map_err(|e| e.to_string())
        };
        assert!(with(&["https://admin.internal/"], vec![]).is_ok());
        let e = with(&["admin.internal"], vec![]).unwrap_err();
        assert!(e.contains("http.allow") && e.contains("not a URL"), "{e}");
        let e = with(
            &["https://admin.internal/api/"],
            vec![credential("https://other.internal/", true, false)],
        )
        .unwrap_err();
        assert!(e.contains("not under a prefix in http.allow"), "{e}");
        let e = with(
            &["https://admin.internal/"],
            vec![credential("https://admin.internal/", true, true)],
        )
        .unwrap_err();
        assert!(e.contains("value_file or value_env"), "{e}");

        let mut s = Settings::default();
        s.http.allow = vec!["https://admin.internal/".into()];
        s.http.credentials = vec![credential("https://admin.internal/", false, true)];
        let missing = s.clone().apply_env(|_| None).unwrap_err().to_string();
        assert!(missing.contains("ADMIN_TOKEN is not set"), "{missing}");
        s.apply_env(|k| (k == "ADMIN_TOKEN").then(|| "Bearer t0ken".to_owned()))
            .unwrap();
        let value = s.http.credentials[0].value.as_ref().unwrap();
        assert_eq!(value.expose(), "Bearer t0ken");
        assert!(!format!("{s:?}").contains("t0ken"), "never in Debug");
    }

    #[test]
    fn a_listen_address_may_name_localhost_and_nothing_else_by_name() {
        assert_eq!(
            parse_listen("localhost:9097").unwrap().to_string(),
            "127.0.0.1:9097"
        );
        assert_eq!(parse_listen("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(
            parse_listen("0.0.0.0:9097").unwrap().to_string(),
            "0.0.0.0:9097"
        );
        for bad in ["example.com:80", "localhost", "localhost:99999", ":9097"] {
            let e = parse_listen(bad).unwrap_err();
            assert!(e.contains("expected IP:PORT or localhost:PORT"), "{e}");
        }
    }

    #[test]
    fn defaults_need_no_file() {
        let s = Settings::default();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9097");
        assert_eq!(s.data_dir, PathBuf::from("data"));
        assert_eq!(s.alertmanager.severity, "critical");
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("reactor.yaml");
        std::fs::write(
            &f,
            "listen: 127.0.0.1:1000\ndata_dir: /from-file\nalertmanager:\n  url: http://file\n  page_ttl: 2h\nauth:\n  bearer_token: t\n",
        )
        .unwrap();
        let mut s = Settings::load(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(s.alertmanager.page_ttl, Duration::from_secs(7200));
        assert_eq!(s.auth.bearer_token.as_deref(), Some("t"));
        s.apply_env(|k| (k == "REACTOR_DATA_DIR").then(|| "/from-env".to_owned()))
            .unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/from-env"));
        s.apply(&Overrides {
            listen: Some("127.0.0.1:2000".parse().unwrap()),
            alertmanager_url: Some("http://flag".into()),
            ..Overrides::default()
        });
        assert_eq!(s.listen.port(), 2000);
        assert_eq!(s.alertmanager.url.as_deref(), Some("http://flag"));
    }

    #[test]
    fn kubeconfig_comes_from_the_file_then_kubeconfig_then_the_pod() {
        let mut s = Settings::default();
        s.apply_env(|k| (k == "KUBECONFIG").then(|| "/a/config:/b/config".to_owned()))
            .unwrap();
        assert_eq!(
            s.kubernetes.kubeconfig,
            vec![PathBuf::from("/a/config"), PathBuf::from("/b/config")]
        );
        assert!(!s.kubernetes.in_cluster);
        let mut s = Settings::default();
        s.apply_env(|k| (k == "KUBERNETES_SERVICE_HOST").then(|| "10.0.0.1".to_owned()))
            .unwrap();
        assert!(s.kubernetes.in_cluster && s.kubernetes.kubeconfig.is_empty());
        let mut s = Settings::default();
        s.kubernetes.kubeconfig = vec!["/from/file".into()];
        s.apply_env(|k| (k == "KUBECONFIG").then(|| "/env".to_owned()))
            .unwrap();
        assert_eq!(s.kubernetes.kubeconfig, vec![PathBuf::from("/from/file")]);
        assert_eq!(
            Settings::default().kubernetes.namespaces.deny,
            ["kube-system"]
        );
    }

    #[test]
    fn durability_is_process_unless_the_file_or_environment_says_power() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("reactor.yaml");
        assert_eq!(Settings::default().durability, Durability::Process);
        std::fs::write(&f, "durability: power\n").unwrap();
        let s = Settings::load(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(s.durability, Durability::Power);
        std::fs::write(&f, "listen: 127.0.0.1:1000\ndurability: disk\n").unwrap();
        let e = Settings::load(Some(&f), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("reactor.yaml:2:"), "{e}");
        let mut s = Settings::default();
        s.apply_env(|k| (k == "REACTOR_DURABILITY").then(|| "power".to_owned()))
            .unwrap();
        assert_eq!(s.durability, Durability::Power);
        let e = s
            .apply_env(|k| (k == "REACTOR_DURABILITY").then(|| "fsync".to_owned()))
            .unwrap_err();
        assert!(e.to_string().contains("process or power"), "{e}");
    }

    #[test]
    fn numbers_outside_their_ranges_are_refused_with_the_line_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("reactor.yaml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap();
            Settings::load(Some(&f), &Overrides::default()).map(drop)
        };
        let e = load(
            "listen: 127.0.0.1:1000\nsandbox:\n  max_operations: 10\n  max_call_levels: 600\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with(
                "reactor.yaml:4: sandbox.max_call_levels: 600 is outside the allowed range 1..=256"
            ),
            "{e}"
        );
        let e =
            load("limits:\n  queue_capacity: 10\nwatchdog:\n  heartbeat_interval: 500000000000y\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("reactor.yaml:"), "{e}");
        let e = load("alertmanager:\n  page_ttl: 99999d\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reactor.yaml:2: alertmanager.page_ttl"), "{e}");
        // A payload the queue could never hold would be answered 503 forever.
        let e = load("limits:\n  queue_capacity: 10\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_alerts_per_payload (1000) must not exceed limits.queue_capacity (10)"),
            "{e}"
        );
        assert!(load("limits:\n  queue_capacity: 10\n  max_alerts_per_payload: 10\n").is_ok());
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("reactor.yaml");
        std::fs::write(&f, "listen: 127.0.0.1:1000\nlistne: x\n").unwrap();
        let e = Settings::load(Some(&f), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("reactor.yaml:2:"), "{e}");
    }

    #[test]
    fn credentials_in_the_alertmanager_url_move_to_basic_auth() {
        let s = AlertmanagerSettings {
            url: Some("http://am%40corp:p%3Ass@127.0.0.1:9093".into()),
            ..AlertmanagerSettings::default()
        }
        .validated()
        .unwrap();
        assert_eq!(s.url.as_deref(), Some("http://127.0.0.1:9093"));
        let basic = s.basic_auth.as_ref().unwrap();
        assert_eq!(basic.username, "am@corp");
        assert_eq!(basic.password.as_ref().unwrap().expose(), "p:ss");
        let printed = format!("{s:?}");
        assert!(
            !printed.contains("p:ss") && !printed.contains("p%3Ass"),
            "{printed}"
        );
        assert!(printed.contains("<redacted>"), "{printed}");

        let plain = AlertmanagerSettings {
            url: Some("https://am.example:9093/prefix/".into()),
            ..AlertmanagerSettings::default()
        }
        .validated()
        .unwrap();
        assert_eq!(
            plain.url.as_deref(),
            Some("https://am.example:9093/prefix/")
        );
        assert!(plain.basic_auth.is_none());
    }

    #[test]
    fn loaded_settings_print_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("reactor.yaml");
        std::fs::write(&f, "alertmanager:\n  url: http://u:918273645@am:9093\n").unwrap();
        let s = Settings::load(Some(&f), &Overrides::default()).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("918273645"), "{printed}");
        std::fs::write(
            &f,
            "alertmanager:\n  basic_auth:\n    username: u\n    password: 918273645\n",
        )
        .unwrap();
        let s = Settings::load(Some(&f), &Overrides::default()).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("918273645"), "{printed}");
    }

    #[test]
    fn settings_debug_never_prints_a_secret() {
        let s = AlertmanagerSettings {
            url: Some("http://u:url-secret@am:9093".into()),
            authorization: Some(ClientAuthorization {
                credentials: Some(Secret::new("token-secret")),
                ..ClientAuthorization::default()
            }),
            basic_auth: Some(ClientBasicAuth {
                username: "u".into(),
                password: Some(Secret::new("basic-secret")),
                password_file: None,
            }),
            ..AlertmanagerSettings::default()
        };
        let printed = format!("{s:?} {}", Secret::new("display-secret"));
        for secret in [
            "url-secret",
            "token-secret",
            "basic-secret",
            "display-secret",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
    }

    #[test]
    fn userinfo_is_redacted_even_from_strings_that_are_not_urls() {
        assert_eq!(
            redact_userinfo("http://u:p@h:1/x@y"),
            "http://<redacted>@h:1/x@y"
        );
        assert_eq!(redact_userinfo("u:p@h:1"), "<redacted>@h:1");
        assert_eq!(redact_userinfo("http://h:1/a@b"), "http://h:1/a@b");
        assert_eq!(redact_userinfo("http://a:b c@h"), "http://<redacted>@h");
    }

    #[test]
    fn conflicting_or_invalid_alertmanager_settings_are_errors_naming_the_field() {
        let err = |s: AlertmanagerSettings| s.validated().unwrap_err().to_string();
        let with_url = |url: &str| AlertmanagerSettings {
            url: Some(url.into()),
            ..AlertmanagerSettings::default()
        };
        let e = err(with_url("http://u:hunter2@am:9093 x"));
        assert!(e.starts_with("alertmanager.url: not a URL"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(with_url("ftp://am"));
        assert!(e.starts_with("alertmanager.url: expected http"), "{e}");
        let e = err(AlertmanagerSettings {
            basic_auth: Some(ClientBasicAuth::default()),
            ..with_url("http://u:hunter2@am:9093")
        });
        assert!(
            e.starts_with("alertmanager.url: carries credentials"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(AlertmanagerSettings {
            basic_auth: Some(ClientBasicAuth::default()),
            authorization: Some(ClientAuthorization::default()),
            ..AlertmanagerSettings::default()
        });
        assert!(e.starts_with("alertmanager.authorization: set"), "{e}");
        let e = err(AlertmanagerSettings {
            basic_auth: Some(ClientBasicAuth {
                password: Some(Secret::new("a")),
                password_file: Some("/f".into()),
                ..ClientBasicAuth::default()
            }),
            ..AlertmanagerSettings::default()
        });
        assert!(
            e.starts_with("alertmanager.basic_auth: set password or"),
            "{e}"
        );
        let e = err(AlertmanagerSettings {
            authorization: Some(ClientAuthorization {
                scheme: "Basic".into(),
                ..ClientAuthorization::default()
            }),
            ..AlertmanagerSettings::default()
        });
        assert!(e.starts_with("alertmanager.authorization.type"), "{e}");
    }

    #[test]
    fn alertmanager_credentials_load_from_the_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("reactor.yaml");
        std::fs::write(
            &f,
            "alertmanager:\n  url: http://am:9093\n  basic_auth:\n    username: reactor\n    password_file: /run/secrets/am\n",
        )
        .unwrap();
        let s = Settings::load(Some(&f), &Overrides::default()).unwrap();
        let basic = s.alertmanager.basic_auth.as_ref().unwrap();
        assert_eq!(basic.username, "reactor");
        assert_eq!(
            basic.password_file.as_deref(),
            Some(Path::new("/run/secrets/am"))
        );
        std::fs::write(
            &f,
            "alertmanager:\n  authorization:\n    credentials_file: /t\n",
        )
        .unwrap();
        let s = Settings::load(Some(&f), &Overrides::default()).unwrap();
        assert_eq!(
            s.alertmanager.authorization.as_ref().unwrap().scheme,
            "Bearer"
        );

        let mut s = Settings::default();
        s.apply_env(|k| match k {
            "REACTOR_ALERTMANAGER_USERNAME" => Some("env-user".into()),
            "REACTOR_ALERTMANAGER_PASSWORD" => Some("env-pass".into()),
            _ => None,
        })
        .unwrap();
        let basic = s.alertmanager.basic_auth.as_ref().unwrap();
        assert_eq!(basic.username, "env-user");
        assert_eq!(basic.password.as_ref().unwrap().expose(), "env-pass");
        let mut s = Settings::default();
        s.apply_env(|k| (k == "REACTOR_ALERTMANAGER_TOKEN").then(|| "env-token".to_owned()))
            .unwrap();
        let auth = s.alertmanager.authorization.as_ref().unwrap();
        assert_eq!(auth.credentials.as_ref().unwrap().expose(), "env-token");
        assert_eq!(auth.scheme, "Bearer");
    }
}
