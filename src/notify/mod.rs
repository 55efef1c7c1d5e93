//! Notification channels: paging humans where they are (PagerDuty, Opsgenie, Slack, Microsoft
//! Teams, a generic webhook, email), besides the page reactor posts into Alertmanager
//! (`escalation`). A page is a channel-neutral [`Notice`]; each service's module turns it into
//! that service's request and reads its answer into [`Sent`] or a [`SendError`] that says
//! whether trying again can help. Pages go through the durable [`outbox`], one entry per page and
//! channel, which retries per each service's rules, limits each channel's rate, folds a storm of
//! pages into one summary, and resolves what it triggered.

mod chat;
mod email;
mod opsgenie;
pub mod outbox;
mod pagerduty;
mod webhook;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::{ChannelKind, ChannelSettings};
use crate::domain::Labels;

pub use outbox::{Notifier, State};

/// How urgent a page is, in PagerDuty's words (the other services map from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Error,
    Warning,
    Info,
}

impl Severity {
    /// A page's `severity` label as PagerDuty knows it; other words (`page`, `high`) are critical,
    /// unknown ones warning.
    pub fn from_label(s: &str) -> Severity {
        match s.to_ascii_lowercase().as_str() {
            "critical" | "page" | "high" | "p1" | "crit" => Severity::Critical,
            "error" | "err" | "major" | "p2" => Severity::Error,
            "info" | "informational" | "low" | "p5" => Severity::Info,
            _ => Severity::Warning,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// What a page is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A remediation failed.
    Run,
    /// reactor's paging path is broken (Alertmanager down, the dead man's switch).
    Watchdog,
    /// Many pages folded into one.
    Storm,
    /// An incident's escalation reaching a person (or a team's channel).
    Incident,
    /// `reactor channels test`.
    Test,
}

/// A page, whatever the channel. Stored in the outbox; it holds no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    pub kind: Kind,
    /// Stable for one problem: repeated failures of one target update one page.
    pub dedup_key: String,
    /// One line (PagerDuty's `summary`, Opsgenie's `message`, the chat title).
    pub summary: String,
    pub description: String,
    pub severity: Severity,
    /// What is affected: the alert's instance, pod or job; `reactor` for its own pages.
    pub source: String,
    /// The playbook (PagerDuty's `component`).
    pub component: String,
    /// The namespace or job (PagerDuty's `group`).
    pub group: String,
    /// The alert's name (PagerDuty's `class`).
    pub class: String,
    /// The run's page in reactor.
    pub link: String,
    /// The labels of the page as Alertmanager would see them.
    pub labels: Labels,
    pub annotations: Labels,
    /// The run: playbook, failed step, error, attempts, the alert's labels.
    pub details: serde_json::Map<String, serde_json::Value>,
    pub at: Timestamp,
    /// The person's address on this channel (an email address, a Slack member id, an Opsgenie
    /// user), when the page is for one person rather than the channel's audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl Notice {
    /// What its link does, as a button or a line says it.
    pub fn link_label(&self) -> &'static str {
        match self.kind {
            Kind::Incident => "Claim the incident",
            _ => "Open the run",
        }
    }

    /// The facts a chat message or an email lists, in order.
    pub fn facts(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for key in [
            "incident",
            "service",
            "level",
            "person",
            "playbook",
            "failed_step",
            "error",
            "attempts",
            "alertname",
        ] {
            if let Some(v) = self.details.get(key) {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if !text.is_empty() {
                    out.push((key.replace('_', " "), text));
                }
            }
        }
        if !self.source.is_empty() {
            out.push(("target".into(), self.source.clone()));
        }
        out
    }
}

/// Trigger a page, or resolve one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Trigger,
    Resolve,
}

/// A service took the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// The service processes it later under this id (Opsgenie): check it before calling it done.
    pub request_id: Option<String>,
}

/// A service refused the request, or it did not get through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct SendError {
    /// Trying again can help (network errors, 429, 5xx).
    pub retryable: bool,
    /// The service said when to try again (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// What the service answered, or why nothing was sent. Never holds a secret.
    pub reason: String,
}

impl SendError {
    pub fn final_(reason: impl Into<String>) -> SendError {
        SendError {
            retryable: false,
            retry_after: None,
            reason: reason.into(),
        }
    }

    pub fn retry(reason: impl Into<String>) -> SendError {
        SendError {
            retryable: true,
            retry_after: None,
            reason: reason.into(),
        }
    }

    /// The label of `reactor_notifications_total{result}` for this failure.
    pub fn result_label(&self) -> &'static str {
        if self.retryable {
            "retried"
        } else {
            "failed"
        }
    }
}

/// What the service says of a request it took for later (Opsgenie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestStatus {
    /// Not processed yet: ask again.
    Processing,
    Succeeded,
    Failed(String),
}

/// The configured channels and the HTTP client they share.
#[derive(Clone, Default)]
pub struct Channels {
    client: reqwest::Client,
    map: Arc<BTreeMap<String, ChannelSettings>>,
}

impl Channels {
    pub fn new(client: reqwest::Client, map: BTreeMap<String, ChannelSettings>) -> Channels {
        Channels {
            client,
            map: Arc::new(map),
        }
    }

    pub fn get(&self, name: &str) -> Option<&ChannelSettings> {
        self.map.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Sends `notice` on channel `name`: one attempt.
    pub async fn send(
        &self,
        name: &str,
        notice: &Notice,
        action: Action,
    ) -> Result<Sent, SendError> {
        let channel = self
            .get(name)
            .ok_or_else(|| SendError::final_(format!("no channel named {name:?} is configured")))?;
        let timeout = channel.timeout();
        let client = &self.client;
        let attempt = async {
            match &channel.kind {
                ChannelKind::Pagerduty(c) => pagerduty::send(client, c, notice, action).await,
                ChannelKind::Opsgenie(c) => opsgenie::send(client, c, notice, action).await,
                ChannelKind::Slack(c) => {
                    chat::send(client, c, chat::slack_body(notice, action), "Slack").await
                }
                ChannelKind::Msteams(c) => {
                    chat::send(client, c, chat::teams_body(notice, action), "Teams").await
                }
                ChannelKind::Webhook(c) => webhook::send(client, c, name, notice, action).await,
                ChannelKind::Email(c) => email::send(c, notice, action, timeout).await,
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(SendError::retry(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))),
        }
    }

    /// Asks the service how a request it took for later ended (Opsgenie).
    pub async fn request_status(
        &self,
        name: &str,
        request_id: &str,
    ) -> Result<RequestStatus, SendError> {
        let Some(channel) = self.get(name) else {
            return Ok(RequestStatus::Succeeded);
        };
        let ChannelKind::Opsgenie(c) = &channel.kind else {
            return Ok(RequestStatus::Succeeded);
        };
        let timeout = channel.timeout();
        tokio::time::timeout(
            timeout,
            opsgenie::request_status(&self.client, c, request_id),
        )
        .await
        .unwrap_or_else(|_| {
            Err(SendError::retry(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )))
        })
    }
}

/// The answer of an HTTP service: status, `Retry-After`, and the body (at most 4 KiB kept).
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    pub retry_after: Option<Duration>,
    pub body: String,
}

/// Sends `request`; a network error is retryable and its message carries no URL (the URL of a
/// Slack or Teams webhook is its secret).
pub(crate) async fn call(request: reqwest::RequestBuilder) -> Result<Answer, SendError> {
    let response = request
        .send()
        .await
        .map_err(|e| SendError::retry(format!("request failed: {}", e.without_url())))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(3600)));
    let body = response
        .text()
        .await
        .map_err(|e| SendError::retry(format!("reading the answer failed: {}", e.without_url())))?;
    Ok(Answer {
        status,
        retry_after,
        body: truncate(&body, 4096).to_owned(),
    })
}

impl Answer {
    /// The common rules: 2xx ok; 429 and 5xx retried (honouring `Retry-After`); any other 4xx
    /// final. `what` names the service in the reason.
    pub fn classify(self, what: &str) -> Result<Answer, SendError> {
        let s = self.status;
        if s.is_success() {
            return Ok(self);
        }
        let reason = format!("{what} answered {}: {}", s.as_u16(), self.body.trim());
        if s == reqwest::StatusCode::TOO_MANY_REQUESTS || s.is_server_error() {
            Err(SendError {
                retryable: true,
                retry_after: self.retry_after,
                reason,
            })
        } else {
            Err(SendError::final_(reason))
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` cut to `max` characters, with `…` when cut.
pub(crate) fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}
