//! The records the history keeps: a run ([`Run`]) with its steps, changes, page and timeline,
//! its id ([`RunId`], the alert's intake sequence number and the playbook's index), its outcome,
//! and an accepted alert waiting in the intake ([`Intake`]). The JSON they serialize to is what
//! `GET /api/v1/runs` serves.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::domain::Alert;

/// One call that changed (or, in a dry run, would have changed) the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// `delete`, `patch` or `create`.
    pub verb: String,
    /// `pods/web-7d9c-abcde`, `deployments.apps/web`, …
    pub object: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub dry_run: bool,
    /// `ok`, or the error.
    pub result: String,
    /// What changed: replicas before and after, the annotation set, …
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// A run's identity: the alert's intake sequence number and the index of the matching playbook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId {
    pub seq: u64,
    pub index: u16,
}

impl RunId {
    /// The sled key: big-endian, so keys sort by sequence number.
    pub fn key(self) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[..8].copy_from_slice(&self.seq.to_be_bytes());
        k[8..].copy_from_slice(&self.index.to_be_bytes());
        k
    }

    pub fn from_key(k: &[u8]) -> Option<RunId> {
        Some(RunId {
            seq: u64::from_be_bytes(k.get(..8)?.try_into().ok()?),
            index: u16::from_be_bytes(k.get(8..10)?.try_into().ok()?),
        })
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.seq, self.index)
    }
}

impl FromStr for RunId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("run id must look like 42-0, got {s:?}");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        Ok(RunId {
            seq: a.parse().map_err(|_| bad())?,
            index: b.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An accepted alert, durable before the webhook answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Intake {
    pub seq: u64,
    pub received_at: Timestamp,
    pub alert: Alert,
    /// Read from Alertmanager's API because its inhibition holds the alert back from humans
    /// (and from reactor's webhook) while reactor's heartbeat is alive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// Why reactor refused the alert (it was over a size limit); `alert` is then a copy cut to
    /// the limits. A refused alert is recorded and paged, and never remediated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Asked for by hand (`reactor run`, `reactor runs rerun`, `POST /api/v1/runs`): only this
    /// playbook runs, through the guards but for the repeat-delivery check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<Manual>,
}

/// A run someone asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manual {
    /// Who asked, as they said.
    pub by: String,
    pub playbook: String,
    /// Every step runs as a dry run.
    #[serde(default)]
    pub dry_run: bool,
    /// The run this one runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<RunId>,
}

/// How a run ended, or that it has not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
    Skipped,
    /// The process stopped while the run was in progress; see docs/operations.md for what follows.
    Interrupted,
    /// A repeat delivery of an alert another run already handles; `reason` names that run.
    Deduplicated,
    /// Stopped because the alert resolved and the playbook says `on_resolved: cancel`.
    Cancelled,
    /// The steps succeeded; waiting (until `verifyDeadline`) for the alert to resolve.
    Verifying,
    /// A shadow playbook's run: every step a dry run, nobody paged; `shadowActions` lists what
    /// it would have done.
    Shadow,
    /// A maintenance pause held this alert: nothing acted, nobody paged; `reason` names it.
    Paused,
    /// A step's approval gate asked a human; the run waits (no worker, no thread) until an
    /// answer, its deadline, or the alert's resolution. `approvals` shows the request.
    #[serde(rename = "awaiting_approval")]
    AwaitingApproval,
    /// A human denied a step's approval: nothing of it acted.
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
            Outcome::Deduplicated => "deduplicated",
            Outcome::Cancelled => "cancelled",
            Outcome::Verifying => "verifying",
            Outcome::Shadow => "shadow",
            Outcome::Paused => "paused",
            Outcome::AwaitingApproval => "awaiting_approval",
            Outcome::Denied => "denied",
        }
    }
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("outcome must be one of running, verifying, succeeded, failed, skipped, interrupted, deduplicated, cancelled, shadow, paused, awaiting_approval, denied; got {s:?}"))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub name: String,
    pub attempt: u32,
    pub succeeded: bool,
    pub started_at: Timestamp,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure's class, e.g. `timeout`, `rejected`, `refused`, `script_threw`: what decided
    /// whether the step was tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<String>,
    /// Kubernetes mutations: object, verb, dry run and result of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
}

/// Whether the humans were told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Stored in the outbox; not yet accepted by Alertmanager.
    Pending,
    Delivered,
    Failed,
    /// No Alertmanager URL is configured: nobody could be paged.
    NotConfigured,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::NotConfigured => "not_configured",
        }
    }
}

/// The page a failed run raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EscalationRecord {
    pub alertname: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When reactor resolved the page (the alert resolved, or a later run fixed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Timestamp>,
}

/// The Alertmanager silence a run holds over its alert while it fixes it (`silence: true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SilenceRecord {
    pub id: String,
    pub created_at: Timestamp,
    pub ends_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<Timestamp>,
}

/// Something that happened to a run, for its timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: Timestamp,
    pub event: String,
}

/// One alert handled by one playbook (or recorded as skipped when none applied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub id: RunId,
    pub alert: Alert,
    pub playbook: Option<String>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub received_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    #[serde(default)]
    pub steps: Vec<StepRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationRecord>,
    /// Until when the run waits for its alert to resolve (playbook `verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_deadline: Option<Timestamp>,
    /// Set when the alert was seen resolved after the steps succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence: Option<SilenceRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Event>,
    /// Set on a run asked for by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<Manual>,
    /// The pages this run raised on notification channels other than Alertmanager.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<NotificationRecord>,
    /// The incident this run opened or updated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<u64>,
    /// A shadow run: the actions it would have taken (`delete pods/web-1 in shop`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow_actions: Vec<String>,
    /// The approvals its gated steps asked for, and the answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
}

/// A gated step's request for approval, and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    pub step: String,
    pub step_index: usize,
    /// The team or person asked.
    pub from: String,
    pub requested_at: Timestamp,
    /// Without an answer by then, the run fails and escalates.
    pub deadline: Timestamp,
    /// The incident that asks the approvers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Timestamp>,
}

/// How an approval request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approved,
    Denied,
    /// Nobody answered before the deadline.
    TimedOut,
    /// The alert resolved while the run waited: the request was withdrawn.
    Withdrawn,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approved => "approved",
            Decision::Denied => "denied",
            Decision::TimedOut => "timed_out",
            Decision::Withdrawn => "withdrawn",
        }
    }
}

/// One page on one notification channel: where it stands, as the run shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRecord {
    pub channel: String,
    /// The key the service groups updates by (PagerDuty's `dedup_key`, Opsgenie's alias).
    pub dedup_key: String,
    /// `pending`, `checking`, `delivered`, `failed`, `folded`, `resolving`, `resolved`,
    /// `cancelled`.
    pub state: String,
    pub attempts: u32,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The service's id for the request (Opsgenie's `requestId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The storm summary this page was folded into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folded_into: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Timestamp>,
}

impl Run {
    /// A run with no steps, timestamps past `received_at`, escalation or timeline yet.
    pub fn new(
        id: RunId,
        alert: Alert,
        playbook: Option<String>,
        outcome: Outcome,
        received_at: Timestamp,
    ) -> Run {
        Run {
            id,
            alert,
            playbook,
            outcome,
            reason: None,
            received_at,
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
            escalation: None,
            verify_deadline: None,
            verified_at: None,
            silence: None,
            timeline: Vec::new(),
            manual: None,
            notifications: Vec::new(),
            incident: None,
            shadow_actions: Vec::new(),
            approvals: Vec::new(),
        }
    }

    /// Adds an event to the timeline.
    pub fn note(&mut self, at: Timestamp, event: impl Into<String>) {
        self.timeline.push(Event {
            at,
            event: event.into(),
        });
    }

    /// Ends the run with `outcome` (skipped, deduplicated, failed, cancelled, interrupted...)
    /// and the reason, on its timeline too.
    pub fn settle(&mut self, outcome: Outcome, reason: &str, now: Timestamp) {
        self.outcome = outcome;
        self.reason = Some(reason.to_owned());
        self.finished_at = Some(now);
        self.note(now, format!("{outcome}: {reason}"));
    }

    /// The approval request the run waits on, if it waits.
    pub fn pending_approval(&mut self) -> Option<&mut Approval> {
        (self.outcome == Outcome::AwaitingApproval)
            .then(|| self.approvals.last_mut())
            .flatten()
            .filter(|a| a.decision.is_none())
    }

    /// Whether step `index` was approved.
    pub fn approved(&self, index: usize) -> bool {
        self.approvals
            .iter()
            .any(|a| a.step_index == index && a.decision == Some(Decision::Approved))
    }

    /// Its steps succeeded and nothing is left to verify.
    pub fn succeed(&mut self, now: Timestamp) {
        self.outcome = Outcome::Succeeded;
        self.finished_at = Some(now);
        self.note(now, "succeeded");
    }

    /// Its steps succeeded; it now waits until `deadline` (`within` from now) for the alert to
    /// resolve.
    pub fn start_verifying(&mut self, within: std::time::Duration, now: Timestamp) {
        let deadline = crate::clock::later(now, within);
        self.outcome = Outcome::Verifying;
        self.verify_deadline = Some(deadline);
        self.note(
            now,
            format!(
                "verify started: waiting up to {} for the alert to resolve",
                humantime::format_duration(within)
            ),
        );
    }

    /// Its alert resolved while it was verifying; `source` says how reactor saw that.
    pub fn verified(&mut self, source: &str, now: Timestamp) {
        self.note(now, format!("resolved seen ({source})"));
        self.outcome = Outcome::Succeeded;
        self.verified_at = Some(now);
        self.finished_at = Some(now);
        self.reason = Some("verified: the alert resolved after remediation".into());
        self.note(now, "succeeded (verified)");
    }
}

/// Which runs to list.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunFilter {
    pub playbook: Option<String>,
    pub outcome: Option<Outcome>,
    pub alertname: Option<String>,
    /// `shadow`: shadow runs only; `live`: every other run.
    #[serde(default)]
    pub mode: Option<RunMode>,
    pub limit: Option<usize>,
}

/// Shadow runs, or live ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    Live,
    Shadow,
}

impl RunFilter {
    pub const DEFAULT_LIMIT: usize = 50;
    pub const MAX_LIMIT: usize = 10_000;

    pub(super) fn accepts(&self, r: &Run) -> bool {
        self.playbook
            .as_ref()
            .is_none_or(|p| r.playbook.as_ref() == Some(p))
            && self.outcome.is_none_or(|o| r.outcome == o)
            && self
                .mode
                .is_none_or(|m| (m == RunMode::Shadow) == (r.outcome == Outcome::Shadow))
            && self
                .alertname
                .as_ref()
                .is_none_or(|a| r.alert.alertname() == a)
    }
}
