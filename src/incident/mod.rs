//! Incidents: what a human owns. Any monitoring system (or reactor itself) opens one for a
//! service; it is `OPEN` until someone claims it (`CLAIMED`) and `RESOLVED` when fixed, and can
//! be reopened. Numbers are sequential and durable; a `dedup_key` maps repeated reports of one
//! problem onto the incident still open for it. Every change is on the incident's timeline. The
//! services an incident may name come from the on-call files ([`oncall`]).

pub mod escalate;
pub mod keys;
pub mod links;
pub mod oncall;

use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::history::{Store, StoreError};
use crate::metrics::{IncidentLabels, Metrics, ServiceLabels};
use crate::notify::Notifier;
use escalate::Escalation;
use oncall::OnCall;

/// What the incident API works with: the incidents, the services they may name, the clock.
pub struct Desk {
    pub incidents: Incidents,
    /// The API keys and their scopes.
    pub keys: keys::Keys,
    pub oncall: Arc<OnCall>,
    pub clock: Arc<dyn Clock>,
    /// Signs claim links and console sessions.
    pub signer: links::Signer,
    /// reactor's base URL (the console's cookie is `Secure` under https).
    pub external_url: String,
}

/// Longest title, message, source, dedup key and note an incident keeps.
pub const TITLE_MAX: usize = 1024;
pub const MESSAGE_MAX: usize = 64 << 10;
pub const SOURCE_MAX: usize = 256;
pub const DEDUP_KEY_MAX: usize = 255;
pub const BY_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    #[serde(rename = "CRIT")]
    Crit,
    #[serde(rename = "ERR")]
    Err,
    #[serde(rename = "WARN")]
    Warn,
}

impl Severity {
    /// `CRIT`/`ERR`/`WARN`, or `critical`/`error`/`warning`, in any case.
    pub fn parse(s: &str) -> Option<Severity> {
        match s.to_ascii_lowercase().as_str() {
            "crit" | "critical" => Some(Severity::Crit),
            "err" | "error" => Some(Severity::Err),
            "warn" | "warning" => Some(Severity::Warn),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Crit => "CRIT",
            Severity::Err => "ERR",
            Severity::Warn => "WARN",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Open,
    Claimed,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Open => "OPEN",
            State::Claimed => "CLAIMED",
            State::Resolved => "RESOLVED",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        match s.to_ascii_uppercase().as_str() {
            "OPEN" => Some(State::Open),
            "CLAIMED" => Some(State::Claimed),
            "RESOLVED" => Some(State::Resolved),
            _ => None,
        }
    }
}

/// One line of an incident's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: Timestamp,
    /// `created`, `reported again`, `claimed`, `resolved`, `reopened`, `note`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub number: u64,
    pub service: String,
    pub severity: Severity,
    pub state: State,
    pub title: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub source: String,
    pub detected_at: Timestamp,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Timestamp>,
    #[serde(default)]
    pub timeline: Vec<Event>,
    /// The remediation runs behind it (reactor's own incidents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<String>,
    /// Where its escalation policy stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Escalation>,
    /// An approval request: the team or person asked, reached through the team's escalation
    /// policy (or the person alone) instead of the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<String>,
}

/// A validated request to open an incident.
#[derive(Debug, Clone)]
pub struct NewIncident {
    pub service: String,
    pub severity: Severity,
    pub title: String,
    pub message: String,
    pub source: String,
    pub detected_at: Option<Timestamp>,
    pub dedup_key: Option<String>,
    /// The run that reports it (reactor's own incidents), and the fingerprint of its alert, so
    /// the alert's resolution resolves the incident.
    pub run: Option<String>,
    pub fingerprint: Option<String>,
    /// An approval request: whom to ask (see [`Incident::approvers`]).
    pub approvers: Option<String>,
}

/// A change a human (or reactor) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Claim,
    Resolve,
    Reopen,
    Note,
}

impl Action {
    /// As in "it cannot be claimed".
    fn done(self) -> &'static str {
        match self {
            Action::Claim => "claimed",
            Action::Resolve => "resolved",
            Action::Reopen => "reopened",
            Action::Note => "noted",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error("no incident {0}")]
    NotFound(u64),
    /// The transition is not allowed from the current state.
    #[error("incident {number} is {state}: it cannot be {action}", state = state.as_str(), action = action.done())]
    Conflict {
        number: u64,
        state: State,
        action: Action,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for IncidentError {
    fn from(e: sled::Error) -> Self {
        IncidentError::Store(e.into())
    }
}

impl IncidentError {
    /// The label of a metric or log for this failure.
    pub fn label(&self) -> &'static str {
        match self {
            IncidentError::NotFound(_) => "not_found",
            IncidentError::Conflict { .. } => "conflict",
            IncidentError::Store(_) => "store",
        }
    }
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<State>,
    pub service: Option<String>,
    pub since: Option<Timestamp>,
    pub limit: usize,
}

/// The incidents in sled: one tree by number, an index of open dedup keys, and the counter.
#[derive(Clone)]
pub struct Incidents {
    store: Store,
    by_number: sled::Tree,
    /// `dedup_key` → the number of the last incident opened for it.
    by_dedup: sled::Tree,
    /// `fingerprint 0x00 number`: the incidents reactor opened for an alert.
    by_alert: sled::Tree,
    meta: sled::Tree,
    /// `due ms, number, epoch, step`: the escalation steps waiting for their time.
    pub(crate) timers: sled::Tree,
    /// Woken when a step is scheduled to fire at once (an incident opened or reopened).
    pub(crate) wake: Arc<tokio::sync::Notify>,
    /// The outbox, to resolve an incident's pages when it resolves.
    pages: Option<Notifier>,
    signer: links::Signer,
    metrics: Arc<Metrics>,
}

const NEXT: &[u8] = b"next_number";

impl Incidents {
    pub fn open(store: &Store, metrics: Arc<Metrics>) -> Result<Incidents, StoreError> {
        let meta = store.tree("incidents_meta")?;
        Ok(Incidents {
            metrics,
            store: store.clone(),
            by_number: store.tree("incidents")?,
            by_dedup: store.tree("incidents_by_dedup")?,
            by_alert: store.tree("incidents_by_alert")?,
            signer: links::Signer::open(&meta)?,
            meta,
            timers: store.tree("incident_timers")?,
            wake: Arc::default(),
            pages: None,
        })
    }

    /// The signer of claim links and sessions, with the key kept in this database.
    pub fn signer(&self) -> links::Signer {
        self.signer.clone()
    }

    /// Resolving an incident resolves the pages its escalation sent through `pages`.
    pub fn with_pages(mut self, pages: Notifier) -> Incidents {
        self.pages = Some(pages);
        self
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn get(&self, number: u64) -> Result<Option<Incident>, StoreError> {
        Ok(self
            .by_number
            .get(number.to_be_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn put(&self, i: &Incident) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(i).expect("an incident serializes");
        self.by_number.insert(i.number.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// The next number: 1, 2, 3 … never reused.
    fn next_number(&self) -> Result<u64, StoreError> {
        let v = self.meta.update_and_fetch(NEXT, |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some(n.saturating_add(1).to_be_bytes().to_vec())
        })?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(&*b).ok())
            .map_or(1, u64::from_be_bytes))
    }

    /// Opens an incident, or returns the one still open for the same `dedup_key` (noting the
    /// repeated report on it). `true` when a new one was opened. Durable when this returns.
    pub async fn create(
        &self,
        new: NewIncident,
        now: Timestamp,
    ) -> Result<(Incident, bool), IncidentError> {
        let dedup = new.dedup_key.clone();
        let mut reserved: Option<u64> = None;
        loop {
            let current = match &dedup {
                Some(k) => self.by_dedup.get(k.as_bytes())?,
                None => None,
            };
            if let Some(n) = current
                .as_ref()
                .and_then(|b| <[u8; 8]>::try_from(&**b).ok())
            {
                let number = u64::from_be_bytes(n);
                if let Some(open) = self.get(number)?.filter(|i| i.state != State::Resolved) {
                    if new.run.as_ref().is_some_and(|r| open.runs.contains(r)) {
                        // The same report again (a restart): nothing new.
                        return Ok((open, false));
                    }
                    // Atomically: the escalation engine and the API change it too.
                    let updated = self.update_if(number, &|i| i.state != State::Resolved, |i| {
                        if let Some(run) = &new.run {
                            if !i.runs.contains(run) {
                                i.runs.push(run.clone());
                            }
                        }
                        i.timeline.push(Event {
                            at: now,
                            event: "reported again".into(),
                            by: Some(new.source.clone()).filter(|s| !s.is_empty()),
                            note: None,
                        });
                    })?;
                    if let Some(open) = updated {
                        self.index_alert(&new, number)?;
                        self.store.history_durable().await?;
                        return Ok((open, false));
                    }
                    // Resolved meanwhile: a new incident.
                }
            }
            let number = match reserved {
                Some(n) => n,
                None => *reserved.insert(self.next_number()?),
            };
            let incident = Incident {
                number,
                service: new.service.clone(),
                severity: new.severity,
                state: State::Open,
                title: new.title.clone(),
                message: new.message.clone(),
                source: new.source.clone(),
                detected_at: new.detected_at.unwrap_or(now),
                created_at: now,
                dedup_key: dedup.clone(),
                claimed_by: None,
                claimed_at: None,
                resolved_by: None,
                resolved_at: None,
                timeline: vec![Event {
                    at: now,
                    event: "created".into(),
                    by: Some(new.source.clone()).filter(|s| !s.is_empty()),
                    note: None,
                }],
                runs: new.run.iter().cloned().collect(),
                // Level 1 is notified at once, by the escalation engine.
                escalation: Some(Escalation::start(0, now)),
                approvers: new.approvers.clone(),
            };
            self.put(&incident)?;
            if let Some(k) = &dedup {
                // Another report of the same key may have opened one meanwhile: it wins.
                let swapped = self.by_dedup.compare_and_swap(
                    k.as_bytes(),
                    current,
                    Some(number.to_be_bytes().to_vec()),
                )?;
                if swapped.is_err() {
                    self.by_number.remove(number.to_be_bytes())?;
                    continue;
                }
            }
            self.index_alert(&new, number)?;
            self.schedule(&incident)?;
            self.store.history_durable().await?;
            self.wake.notify_one();
            let labels = Self::labels(&incident);
            self.metrics.incidents_open.get_or_create(&labels).inc();
            self.metrics.incidents_opened.get_or_create(&labels).inc();
            return Ok((incident, true));
        }
    }

    /// Changes incident `number` with `f` while `current` holds, atomically (compare-and-swap).
    /// The incident as stored, or `None` when there is none or `current` no longer holds.
    pub(crate) fn update_if(
        &self,
        number: u64,
        current: &dyn Fn(&Incident) -> bool,
        mut f: impl FnMut(&mut Incident),
    ) -> Result<Option<Incident>, StoreError> {
        loop {
            let Some(old) = self.by_number.get(number.to_be_bytes())? else {
                return Ok(None);
            };
            let Ok(mut i) = serde_json::from_slice::<Incident>(&old) else {
                return Ok(None);
            };
            if !current(&i) {
                return Ok(None);
            }
            f(&mut i);
            let new = serde_json::to_vec(&i).expect("an incident serializes");
            if self
                .by_number
                .compare_and_swap(number.to_be_bytes(), Some(old), Some(new))?
                .is_ok()
            {
                return Ok(Some(i));
            }
        }
    }

    /// Sets the timer of every open incident's next escalation step again (at start): a crash
    /// between storing an incident and its timer must not leave a step that never fires.
    /// Returns how many were set.
    pub fn restore_timers(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.by_number.iter() {
            let (_, v) = kv?;
            if let Ok(i) = serde_json::from_slice::<Incident>(&v) {
                if i.state == State::Open && i.escalation.as_ref().is_some_and(|e| e.due.is_some())
                {
                    self.schedule(&i)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Sets the timer of `i`'s next escalation step, if it has one.
    fn schedule(&self, i: &Incident) -> Result<(), StoreError> {
        if i.state == State::Open {
            if let Some(key) = i.escalation.as_ref().and_then(|e| e.key(i.number)) {
                self.timers.insert(key, &[])?;
            }
        }
        Ok(())
    }

    fn labels(i: &Incident) -> IncidentLabels {
        IncidentLabels {
            service: i.service.clone(),
            severity: i.severity.as_str().to_owned(),
        }
    }

    /// Sets the open-incidents gauge from the store (once, at start).
    pub fn count_open(&self) -> Result<(), StoreError> {
        for kv in self.by_number.iter() {
            let (_, v) = kv?;
            if let Ok(i) = serde_json::from_slice::<Incident>(&v) {
                if i.state != State::Resolved {
                    self.metrics
                        .incidents_open
                        .get_or_create(&Self::labels(&i))
                        .inc();
                }
            }
        }
        Ok(())
    }

    fn index_alert(&self, new: &NewIncident, number: u64) -> Result<(), StoreError> {
        if let Some(fp) = &new.fingerprint {
            let mut k = fp.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&number.to_be_bytes());
            self.by_alert.insert(k, &[])?;
        }
        Ok(())
    }

    /// The alert behind `fingerprint` resolved, or a later run fixed it: the incidents reactor
    /// opened for it and not resolved yet are resolved by `by`. Returns their numbers.
    pub async fn resolve_for_alert(
        &self,
        fingerprint: &str,
        by: &str,
        now: Timestamp,
    ) -> Result<Vec<u64>, IncidentError> {
        let mut prefix = fingerprint.as_bytes().to_vec();
        prefix.push(0);
        let mut resolved = Vec::new();
        for kv in self.by_alert.scan_prefix(&prefix) {
            let (k, _) = kv?;
            self.by_alert.remove(&k)?;
            let Some(n) = <[u8; 8]>::try_from(&k[prefix.len()..]).ok() else {
                continue;
            };
            let number = u64::from_be_bytes(n);
            match self.act(number, Action::Resolve, by, None, now).await {
                Ok(_) => resolved.push(number),
                Err(IncidentError::Conflict { .. } | IncidentError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(resolved)
    }

    /// Applies `action` by `by`; a transition the state does not allow is a conflict and changes
    /// nothing. Durable when this returns.
    pub async fn act(
        &self,
        number: u64,
        action: Action,
        by: &str,
        note: Option<String>,
        now: Timestamp,
    ) -> Result<Incident, IncidentError> {
        loop {
            let old = self
                .by_number
                .get(number.to_be_bytes())?
                .ok_or(IncidentError::NotFound(number))?;
            let mut i: Incident =
                serde_json::from_slice(&old).map_err(|_| IncidentError::NotFound(number))?;
            let conflict = IncidentError::Conflict {
                number,
                state: i.state,
                action,
            };
            let event = match (action, i.state) {
                (Action::Claim, State::Open) => {
                    i.state = State::Claimed;
                    i.claimed_by = Some(by.to_owned());
                    i.claimed_at = Some(now);
                    // The pending levels are cancelled.
                    i.escalation.iter_mut().for_each(Escalation::stop);
                    "claimed"
                }
                (Action::Resolve, State::Open | State::Claimed) => {
                    i.state = State::Resolved;
                    i.resolved_by = Some(by.to_owned());
                    i.resolved_at = Some(now);
                    i.escalation.iter_mut().for_each(Escalation::stop);
                    "resolved"
                }
                (Action::Reopen, State::Resolved) => {
                    i.state = State::Open;
                    i.claimed_by = None;
                    i.claimed_at = None;
                    i.resolved_by = None;
                    i.resolved_at = None;
                    // The policy starts again from level 1.
                    let epoch = i.escalation.as_ref().map_or(0, |e| e.epoch.wrapping_add(1));
                    i.escalation = Some(Escalation::start(epoch, now));
                    "reopened"
                }
                (Action::Note, _) => "note",
                _ => return Err(conflict),
            };
            i.timeline.push(Event {
                at: now,
                event: event.into(),
                by: Some(by.to_owned()),
                note: note.clone(),
            });
            let new = serde_json::to_vec(&i).expect("an incident serializes");
            let before: Option<Incident> = serde_json::from_slice(&old).ok();
            if self
                .by_number
                .compare_and_swap(number.to_be_bytes(), Some(old), Some(new))?
                .is_ok()
            {
                // The stopped step's timer goes; a reopened incident's first step is set.
                if let Some(key) = before
                    .as_ref()
                    .and_then(|b| b.escalation.as_ref()?.key(number))
                {
                    if i.escalation.as_ref().and_then(|e| e.key(number)).as_ref() != Some(&key) {
                        self.timers.remove(key)?;
                    }
                }
                self.schedule(&i)?;
                if action == Action::Resolve {
                    if let Some(pages) = &self.pages {
                        pages
                            .close_prefix(&format!("incident/{number}/"), now)
                            .await?;
                    }
                }
                self.store.history_durable().await?;
                if action == Action::Reopen {
                    self.wake.notify_one();
                }
                self.count(&i, action, now);
                return Ok(i);
            }
        }
    }

    /// The metrics of a transition just made.
    fn count(&self, i: &Incident, action: Action, now: Timestamp) {
        let since_open =
            || (now.as_millisecond() - i.created_at.as_millisecond()).max(0) as f64 / 1000.0;
        let service = ServiceLabels {
            service: i.service.clone(),
        };
        let open = self.metrics.incidents_open.get_or_create(&Self::labels(i));
        match action {
            Action::Claim => {
                self.metrics
                    .incident_time_to_claim
                    .get_or_create(&service)
                    .observe(since_open());
            }
            Action::Resolve => {
                open.dec();
                self.metrics
                    .incident_time_to_resolve
                    .get_or_create(&service)
                    .observe(since_open());
            }
            Action::Reopen => {
                open.inc();
            }
            Action::Note => {}
        }
    }

    /// Newest first.
    pub fn list(&self, f: &Filter) -> Result<Vec<Incident>, StoreError> {
        let mut out = Vec::new();
        for kv in self.by_number.iter().rev() {
            if out.len() >= f.limit {
                break;
            }
            let (_, v) = kv?;
            let Ok(i) = serde_json::from_slice::<Incident>(&v) else {
                continue;
            };
            if f.since.is_some_and(|s| i.created_at < s) {
                break;
            }
            if f.state.is_some_and(|s| i.state != s)
                || f.service.as_ref().is_some_and(|s| &i.service != s)
            {
                continue;
            }
            out.push(i);
        }
        Ok(out)
    }
}

/// The post-incident report in Markdown: summary, time to claim and to resolve, the timeline,
/// and the remediation runs behind it with their steps and the pages they sent.
pub fn report(i: &Incident, runs: &[crate::history::Run]) -> String {
    let span = |from: Timestamp, to: Option<Timestamp>| match to {
        Some(t) => {
            let secs = (t.as_second() - from.as_second()).max(0) as u64;
            humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
        }
        None => "not yet".to_owned(),
    };
    let mut md = format!(
        "# Incident {}: {}\n\n| | |\n| --- | --- |\n| service | {} |\n| severity | {} |\n| state | {} |\n| source | {} |\n| detected | {} |\n| opened | {} |\n| time to claim | {} |\n| time to resolve | {} |\n",
        i.number,
        i.title,
        i.service,
        i.severity.as_str(),
        i.state.as_str(),
        if i.source.is_empty() { "-".to_owned() } else { i.source.replace('|', "\\|") },
        i.detected_at,
        i.created_at,
        span(i.created_at, i.claimed_at),
        span(i.created_at, i.resolved_at),
    );
    if let Some(by) = &i.claimed_by {
        md.push_str(&format!("| claimed by | {by} |\n"));
    }
    if let Some(by) = &i.resolved_by {
        md.push_str(&format!("| resolved by | {by} |\n"));
    }
    if !i.message.is_empty() {
        md.push_str(&format!("\n## Summary\n\n{}\n", i.message));
    }
    md.push_str("\n## Timeline\n\n");
    for e in &i.timeline {
        md.push_str(&format!("- {} {}", e.at, e.event));
        if let Some(by) = &e.by {
            md.push_str(&format!(" by {by}"));
        }
        if let Some(note) = &e.note {
            md.push_str(&format!(": {note}"));
        }
        md.push('\n');
    }
    if !runs.is_empty() {
        md.push_str("\n## Remediation runs\n");
    }
    for run in runs {
        md.push_str(&format!(
            "\n### Run {} ({}): {}\n\n",
            run.id,
            run.playbook.as_deref().unwrap_or("-"),
            run.outcome
        ));
        for step in &run.steps {
            let result = match &step.error {
                Some(e) => format!("failed: {e}"),
                None => "ok".to_owned(),
            };
            md.push_str(&format!(
                "- step {} attempt {} at {}: {result}\n",
                step.name, step.attempt, step.started_at
            ));
        }
        if let Some(e) = &run.escalation {
            md.push_str(&format!(
                "- page {} to alertmanager: {} ({} attempt(s))\n",
                e.alertname,
                e.status.as_str(),
                e.attempts
            ));
        }
        for n in &run.notifications {
            md.push_str(&format!(
                "- page to {}: {} ({} attempt(s), at {})\n",
                n.channel, n.state, n.attempts, n.at
            ));
        }
    }
    md
}
