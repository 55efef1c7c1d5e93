//! The notification channels (`channels:`), where pages go (`route:`), storm control (`storm:`)
//! and the dead man's switch (`deadman:`). Secrets come from `*_file` keys (read at each send, so
//! a rotated file takes effect without a restart) or `*_env` keys (read once at start); they are
//! never part of the file itself, and print as `<redacted>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::alertmanager::Secret;
use super::{duration, InvalidSetting, Settings};

/// The name of the channel that posts pages into Alertmanager (today's behaviour).
pub const ALERTMANAGER_CHANNEL: &str = "alertmanager";

/// A secret's source: a file read at each use, or a value read from the environment at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Value(Secret),
}

impl SecretSource {
    /// The secret's value now; a file's trailing newline is dropped.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Value(s) => Ok(s.clone()),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
        }
    }
}

/// One `channels:` entry: its `type` with that type's keys, and the keys every type has.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub kind: ChannelKind,
    pub common: Common,
}

impl<'de> Deserialize<'de> for ChannelSettings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::deserialize(d)?;
        let mut take = |key: &str| map.remove(key).filter(|v| !v.is_null());
        let field = |key: &str, e: serde_json::Error| D::Error::custom(format!("{key}: {e}"));
        let send_resolved = take("send_resolved")
            .map(|v| serde_json::from_value(v).map_err(|e| field("send_resolved", e)))
            .transpose()?;
        let rate_limit_per_minute = take("rate_limit_per_minute")
            .map(|v| serde_json::from_value(v).map_err(|e| field("rate_limit_per_minute", e)))
            .transpose()?;
        let timeout = take("timeout")
            .map(|v| {
                let text: String = serde_json::from_value(v).map_err(|e| field("timeout", e))?;
                crate::bounds::parse_duration("timeout", &text, crate::bounds::PEER_TIMEOUT)
                    .map_err(D::Error::custom)
            })
            .transpose()?;
        let kind =
            serde_json::from_value(serde_json::Value::Object(map)).map_err(D::Error::custom)?;
        Ok(ChannelSettings {
            kind,
            common: Common {
                send_resolved,
                rate_limit_per_minute,
                timeout,
            },
        })
    }
}

impl ChannelSettings {
    pub fn type_name(&self) -> &'static str {
        self.kind.type_name()
    }

    /// Whether a resolved page is sent: by default services with incidents (PagerDuty,
    /// Opsgenie, webhook consumers) close them; chat and mail say nothing more, as in
    /// Alertmanager.
    pub fn send_resolved(&self) -> bool {
        self.common.send_resolved.unwrap_or(matches!(
            self.kind,
            ChannelKind::Pagerduty(_) | ChannelKind::Opsgenie(_) | ChannelKind::Webhook(_)
        ))
    }

    /// Deliveries per minute this channel may make (0: no limit of reactor's own).
    pub fn rate_per_minute(&self) -> u32 {
        self.common
            .rate_limit_per_minute
            .unwrap_or(match self.kind {
                // PagerDuty's Events API allows about 120 events a minute per routing key.
                ChannelKind::Pagerduty(_) => 120,
                // Slack's incoming webhooks: about one message a second.
                ChannelKind::Slack(_) => 60,
                _ => 0,
            })
    }

    /// One request's time limit.
    pub fn timeout(&self) -> Duration {
        self.common.timeout.unwrap_or(Duration::from_secs(10))
    }
}

/// A channel's `type` and the keys of that type.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ChannelKind {
    Pagerduty(PagerDutySettings),
    Opsgenie(OpsgenieSettings),
    Slack(ChatSettings),
    Msteams(ChatSettings),
    Webhook(WebhookSettings),
    Email(EmailSettings),
}

impl ChannelKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ChannelKind::Pagerduty(_) => "pagerduty",
            ChannelKind::Opsgenie(_) => "opsgenie",
            ChannelKind::Slack(_) => "slack",
            ChannelKind::Msteams(_) => "msteams",
            ChannelKind::Webhook(_) => "webhook",
            ChannelKind::Email(_) => "email",
        }
    }
}

/// Options every channel has.
#[derive(Debug, Clone, Default)]
pub struct Common {
    /// Send the page's resolution too (default: yes for pagerduty, opsgenie and webhook).
    pub send_resolved: Option<bool>,
    /// At most this many deliveries a minute (defaults: pagerduty 120, slack 60, others none).
    pub rate_limit_per_minute: Option<u32>,
    /// One request's time limit (default 10s).
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerDutySettings {
    /// The Events API's base URL; `/v2/enqueue` is appended.
    #[serde(default = "pagerduty_url")]
    pub url: String,
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    #[serde(default)]
    pub routing_key_env: Option<String>,
    #[serde(skip)]
    pub routing_key: Option<SecretSource>,
    /// The event's `client` (default `reactor`).
    #[serde(default = "reactor_name")]
    pub client: String,
}

fn pagerduty_url() -> String {
    "https://events.pagerduty.com".into()
}

fn reactor_name() -> String {
    "reactor".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsgenieSettings {
    /// `https://api.opsgenie.com`, `https://api.eu.opsgenie.com`, or a compatible service.
    #[serde(default = "opsgenie_url")]
    pub url: String,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(skip)]
    pub api_key: Option<SecretSource>,
    /// Opsgenie responders, as its API takes them (`{type: team, name: SRE}`).
    #[serde(default)]
    pub responders: Vec<BTreeMap<String, String>>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Page severity → priority P1–P5 (defaults: critical P1, error P2, warning P3, info P5).
    #[serde(default)]
    pub priorities: BTreeMap<String, String>,
}

fn opsgenie_url() -> String {
    "https://api.opsgenie.com".into()
}

/// Slack incoming webhooks and Microsoft Teams Workflows webhooks: the URL is the secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSettings {
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(skip)]
    pub url: Option<SecretSource>,
}

/// A JSON POST shaped like Alertmanager's webhook (version 4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    #[serde(skip)]
    pub bearer_token: Option<SecretSource>,
    #[serde(default)]
    pub basic_auth: Option<WebhookBasicAuth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBasicAuth {
    pub username: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(skip)]
    pub password: Option<SecretSource>,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: only for a relay on loopback.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    /// `host:port` of the SMTP server.
    pub smarthost: String,
    #[serde(default)]
    pub tls: SmtpTls,
    /// PEM certificates trusted besides the platform's roots (a relay with a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(skip)]
    pub password: Option<SecretSource>,
}

/// Where pages go when a playbook names no `escalate.to`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSettings {
    pub to: Vec<String>,
}

impl Default for RouteSettings {
    fn default() -> Self {
        RouteSettings {
            to: vec![ALERTMANAGER_CHANNEL.into()],
        }
    }
}

/// An alert storm must not become a page storm: past `threshold` pages to one channel within
/// `window`, the rest are folded into one summary page.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StormSettings {
    /// Pages to one channel within `window` before folding starts (0 turns storm control off).
    pub threshold: u32,
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// How long the summary gathers folded pages before it is sent.
    #[serde(deserialize_with = "duration")]
    pub summary_after: Duration,
}

impl Default for StormSettings {
    fn default() -> Self {
        StormSettings {
            threshold: 10,
            window: Duration::from_secs(300),
            summary_after: Duration::from_secs(30),
        }
    }
}

/// The dead man's switch: an always-firing alert (kube-prometheus' `Watchdog`) whose absence
/// means the monitoring pipeline is broken.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadmanSettings {
    /// The alertname to expect; unset turns the switch off.
    pub alertname: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub after: Duration,
}

impl Default for DeadmanSettings {
    fn default() -> Self {
        DeadmanSettings {
            alertname: None,
            after: Duration::from_secs(300),
        }
    }
}

/// Resolves a `*_file` / `*_env` pair into its source. `required` names the pair when one must
/// be set. Exactly one of the two may be set.
pub fn secret_source(
    what: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SecretSource>, String> {
    match (file, env) {
        (Some(_), Some(_)) => Err(format!("{what}: set {what}_file or {what}_env, not both")),
        (Some(f), None) => Ok(Some(SecretSource::File(f.clone()))),
        (None, Some(var)) => get(var)
            .filter(|v| !v.is_empty())
            .map(|v| Some(SecretSource::Value(Secret::new(v))))
            .ok_or_else(|| format!("{what}_env: the environment variable {var} is not set")),
        (None, None) => Ok(None),
    }
}

/// Fills every channel's secrets from their `*_file` / `*_env` keys and checks what each type
/// requires. Errors name the channel.
pub fn resolve_channels(
    channels: &mut BTreeMap<String, ChannelSettings>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    for (name, settings) in channels.iter_mut() {
        let kind = &mut settings.kind;
        let fail = |m: String| (name.clone(), format!("channels.{name}: {m}"));
        let required = |what: &str, s: Option<SecretSource>| {
            s.ok_or_else(|| format!("set {what}_file or {what}_env"))
        };
        if name == ALERTMANAGER_CHANNEL {
            return Err(fail(
                "the name alertmanager is the built-in channel (alertmanager: in the settings)"
                    .into(),
            ));
        }
        // A URL may carry a password: messages show it without.
        let check_url = |url: &str| -> Result<(), String> {
            let shown = super::alertmanager::redact_userinfo(url);
            let u = reqwest::Url::parse(url).map_err(|e| format!("url {shown:?}: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(format!("url {shown:?}: expected http:// or https://"));
            }
            Ok(())
        };
        match kind {
            ChannelKind::Pagerduty(c) => {
                check_url(&c.url).map_err(fail)?;
                let s = secret_source("routing_key", &c.routing_key_file, &c.routing_key_env, get)
                    .map_err(fail)?;
                c.routing_key = Some(required("routing_key", s).map_err(fail)?);
            }
            ChannelKind::Opsgenie(c) => {
                check_url(&c.url).map_err(fail)?;
                let s =
                    secret_source("api_key", &c.api_key_file, &c.api_key_env, get).map_err(fail)?;
                c.api_key = Some(required("api_key", s).map_err(fail)?);
                for (sev, p) in &c.priorities {
                    if !matches!(p.as_str(), "P1" | "P2" | "P3" | "P4" | "P5") {
                        return Err(fail(format!(
                            "priorities.{sev}: expected P1, P2, P3, P4 or P5, got {p:?}"
                        )));
                    }
                }
            }
            ChannelKind::Slack(c) | ChannelKind::Msteams(c) => {
                let s = secret_source("url", &c.url_file, &c.url_env, get).map_err(fail)?;
                c.url = Some(required("url", s).map_err(fail)?);
            }
            ChannelKind::Webhook(c) => {
                check_url(&c.url).map_err(fail)?;
                c.bearer_token = secret_source(
                    "bearer_token",
                    &c.bearer_token_file,
                    &c.bearer_token_env,
                    get,
                )
                .map_err(fail)?;
                if let Some(b) = &mut c.basic_auth {
                    let s = secret_source("password", &b.password_file, &b.password_env, get)
                        .map_err(fail)?;
                    b.password = Some(required("basic_auth.password", s).map_err(fail)?);
                }
                if c.bearer_token.is_some() && c.basic_auth.is_some() {
                    return Err(fail("set bearer_token or basic_auth, not both".into()));
                }
            }
            ChannelKind::Email(c) => {
                if c.to.is_empty() {
                    return Err(fail("to: at least one address".into()));
                }
                if !c.smarthost.contains(':') {
                    return Err(fail(format!(
                        "smarthost {:?}: expected host:port",
                        c.smarthost
                    )));
                }
                c.password = secret_source("password", &c.password_file, &c.password_env, get)
                    .map_err(fail)?;
                if c.password.is_some() != c.username.is_some() {
                    return Err(fail("username and password go together".into()));
                }
            }
        }
    }
    Ok(())
}

impl Settings {
    /// The paging settings: channel names in routes, storm control and the dead man's switch.
    pub(super) fn validate_paging(&self) -> Result<(), InvalidSetting> {
        use crate::bounds::*;
        let (c, d) = (super::in_count, super::in_span);
        let w = &self.watchdog;
        d(
            "watchdog.alertmanager_down_after",
            w.alertmanager_down_after,
            WATCHDOG_INTERVAL,
        )?;
        let names = self.channel_names();
        let known = |field: &'static str, list: &[String]| match list
            .iter()
            .find(|n| !names.contains(&n.as_str()))
        {
            Some(n) => Err(InvalidSetting {
                field,
                message: format!(
                    "{field}: unknown channel {n:?} (channels: {})",
                    names.join(", ")
                ),
            }),
            None => Ok(()),
        };
        known("route.to", &self.route.to)?;
        if self.route.to.is_empty() {
            return Err(InvalidSetting {
                field: "route.to",
                message: "route.to: name at least one channel (alertmanager is the built-in one)"
                    .into(),
            });
        }
        known("watchdog.channels", &self.watchdog.channels)?;
        if self
            .watchdog
            .channels
            .iter()
            .any(|c| c == ALERTMANAGER_CHANNEL)
        {
            return Err(InvalidSetting {
                field: "watchdog.channels",
                message: "watchdog.channels: alertmanager cannot carry the pages about a broken paging path (it reaches Alertmanager already, with ReactorUnhealthy); name channels of `channels:`".into(),
            });
        }
        c(
            "storm.threshold",
            self.storm.threshold as usize,
            STORM_THRESHOLD,
        )?;
        d("storm.window", self.storm.window, STORM_WINDOW)?;
        d(
            "storm.summary_after",
            self.storm.summary_after,
            STORM_WINDOW,
        )?;
        if self.storm.summary_after > self.storm.window {
            return Err(InvalidSetting {
                field: "storm.summary_after",
                message: "storm.summary_after must not exceed storm.window".into(),
            });
        }
        d("deadman.after", self.deadman.after, WATCHDOG_INTERVAL)?;
        Ok(())
    }
}
