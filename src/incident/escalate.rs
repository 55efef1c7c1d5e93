//! The escalation engine: an open incident walks its service's team's escalation policy. Level 1
//! is notified when the incident opens; each level then waits its timeout for a claim before the
//! next is notified, through the policy's levels `repeat + 1` times. A claim or resolution stops
//! it, a reopening starts it again from level 1.
//!
//! Each pending step is a timer in sled (`incident_timers`, keyed by due time), so a step that
//! came due while reactor was down fires at once after a restart. A step fires at most once: its
//! notifications are stored in the outbox under keys naming the incident, the opening (epoch),
//! the step, the channel and the person, so firing again after a crash stores nothing new, and
//! the incident moves to the next step with a compare-and-swap that only one firing wins. Time
//! comes from the injected clock.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::links::Signer;
use super::oncall::{OnCall, Recipient};
use super::{Event, Incident, IncidentError, Incidents, Severity, State};
use crate::clock::{later, Clock};
use crate::history::StoreError;
use crate::metrics::LevelLabels;
use crate::notify::{self, Kind, Notice, Notifier};

/// Where an incident's escalation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escalation {
    /// Raised at each reopening: a timer of an earlier opening is stale.
    pub epoch: u32,
    /// The next step (0 is level 1 of the first round), and when it is due; `None` when the
    /// escalation has stopped (claimed, resolved, or the policy is exhausted).
    pub next: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<Timestamp>,
    /// The highest level notified in this opening (0 before level 1).
    pub level: u32,
}

impl Escalation {
    /// Level 1, due at `now`.
    pub fn start(epoch: u32, now: Timestamp) -> Escalation {
        Escalation {
            epoch,
            next: 0,
            due: Some(now),
            level: 0,
        }
    }

    /// No more steps.
    pub fn stop(&mut self) {
        self.due = None;
    }

    /// The timer key of its next step, if it has one.
    pub fn key(&self, number: u64) -> Option<Vec<u8>> {
        Some(timer_key(self.due?, number, self.epoch, self.next))
    }
}

/// `due ms (8) | number (8) | epoch (4) | step (4)`, big-endian so keys sort by due time.
pub fn timer_key(due: Timestamp, number: u64, epoch: u32, step: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&(due.as_millisecond().max(0) as u64).to_be_bytes());
    k.extend_from_slice(&number.to_be_bytes());
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&step.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Option<(Timestamp, u64, u32, u32)> {
    let due = u64::from_be_bytes(k.get(0..8)?.try_into().ok()?);
    let number = u64::from_be_bytes(k.get(8..16)?.try_into().ok()?);
    let epoch = u32::from_be_bytes(k.get(16..20)?.try_into().ok()?);
    let step = u32::from_be_bytes(k.get(20..24)?.try_into().ok()?);
    Some((
        Timestamp::from_millisecond(due as i64).ok()?,
        number,
        epoch,
        step,
    ))
}

/// How long a claim link in a page opens.
pub const CLAIM_LINK_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How many due steps one pass fires before making them durable.
const BATCH: usize = 512;
/// The longest the loop sleeps before looking at the clock again (a manual clock in tests, a
/// step set by another task).
const POLL: Duration = Duration::from_millis(200);

/// The escalation engine's parts: the incidents, the outbox, the on-call files, the clock.
#[derive(Clone)]
pub struct Escalations {
    incidents: Incidents,
    notifier: Notifier,
    oncall: Arc<OnCall>,
    clock: Arc<dyn Clock>,
    /// reactor's base URL, for the incident's link.
    external_url: String,
    /// Signs the claim links.
    signer: Signer,
}

/// A step that fired: how late, and the level it notified.
#[derive(Debug, Clone, Copy)]
pub struct Fired {
    pub lateness: jiff::SignedDuration,
    pub level: u32,
}

impl Escalations {
    pub fn new(
        incidents: Incidents,
        notifier: Notifier,
        oncall: Arc<OnCall>,
        clock: Arc<dyn Clock>,
        external_url: String,
        signer: Signer,
    ) -> Escalations {
        Escalations {
            incidents,
            notifier,
            oncall,
            clock,
            external_url,
            signer,
        }
    }

    /// When the earliest pending step is due.
    pub fn next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(match self.incidents.timers.first()? {
            Some((k, _)) => parse_key(&k).map(|(due, ..)| due),
            None => None,
        })
    }

    /// Fires the steps due by now, at most [`BATCH`], and makes them durable.
    pub async fn fire_due(&self) -> Result<Vec<Fired>, IncidentError> {
        let now = self.clock.now();
        let end = (now.as_millisecond().max(0) as u64).saturating_add(1);
        let keys: Vec<sled::IVec> = self
            .incidents
            .timers
            .range(..end.to_be_bytes().to_vec())
            .keys()
            .take(BATCH)
            .collect::<Result<_, _>>()?;
        let mut fired = Vec::new();
        for key in keys {
            if let Some(f) = self.fire(&key, now)? {
                fired.push(f);
            }
            self.incidents.timers.remove(&key)?;
        }
        if !fired.is_empty() {
            // One flush for the batch: the outbox entries, the incidents and the timers.
            self.notifier.commit().await?;
        }
        let metrics = self.incidents.metrics();
        for f in &fired {
            metrics
                .incident_escalation_lateness
                .observe(f.lateness.as_secs_f64().max(0.0));
            metrics
                .incident_escalations
                .get_or_create(&LevelLabels {
                    level: f.level.to_string(),
                })
                .inc();
        }
        Ok(fired)
    }

    /// Fires the step of timer `key` if it is still the incident's next step.
    fn fire(&self, key: &[u8], now: Timestamp) -> Result<Option<Fired>, IncidentError> {
        let Some((due, number, epoch, step)) = parse_key(key) else {
            return Ok(None);
        };
        let Some(incident) = self.incidents.get(number)? else {
            return Ok(None);
        };
        let current = |i: &Incident| {
            i.state == State::Open
                && i.escalation.as_ref().is_some_and(|e| {
                    // The timer of this very step: not one left from a crash or a retry.
                    e.epoch == epoch
                        && e.next == step
                        && e.due.map(|d| d.as_millisecond().max(0)) == Some(due.as_millisecond())
                })
        };
        if !current(&incident) {
            return Ok(None);
        }
        // An approval asks its approvers; any other incident its service's team.
        let route = match &incident.approvers {
            Some(from) => self.oncall.approval_route(from),
            None => self
                .oncall
                .policy_of(&incident.service)
                .map(|(t, p)| (t.clone(), p.clone())),
        };
        let Some((team, policy)) = route.as_ref().map(|(t, p)| (t, p)) else {
            // No policy: nobody to notify.
            self.incidents.update_if(number, &current, |i| {
                i.escalation.iter_mut().for_each(Escalation::stop)
            })?;
            return Ok(None);
        };
        if step >= policy.steps() {
            self.incidents.update_if(number, &current, |i| {
                i.escalation.iter_mut().for_each(Escalation::stop)
            })?;
            return Ok(None);
        }
        let index = (step as usize) % policy.levels.len();
        let level = &policy.levels[index];
        let number_of_level = index as u32 + 1;
        let recipients = self.oncall.recipients(team, level, now);
        let prefix = format!("incident/{number}/{epoch}/{step}/");
        for r in &recipients {
            // One entry (and one dedup key on the service) per person and address.
            let key = format!(
                "{prefix}{}/{}/{}",
                r.channel,
                r.person.as_deref().unwrap_or("-"),
                r.address.as_deref().unwrap_or("-")
            );
            let notice = self.notice(&incident, r, &key, number_of_level, now);
            self.notifier.stage(&key, &r.channel, &notice, now)?;
        }
        let next = step + 1;
        let next_due = (next < policy.steps()).then(|| {
            let round_ends = (next as usize).is_multiple_of(policy.levels.len());
            if recipients.is_empty() && !round_ends {
                // Nobody at this level now: the next one at once, but a round where nobody is
                // on duty still waits, so a gap in the rota does not use up the policy at once.
                now
            } else {
                later(now, level.timeout)
            }
        });
        // The next timer before the incident moves on: a crash in between leaves a timer that
        // is stale (dropped when it comes due), never a step without one.
        let next_key = next_due.map(|due| timer_key(due, number, epoch, next));
        if let Some(k) = &next_key {
            self.incidents.timers.insert(k.as_slice(), &[])?;
        }
        let round = step as usize / policy.levels.len() + 1;
        let advanced = self.incidents.update_if(number, &current, |i| {
            if step > 0 {
                i.timeline.push(Event {
                    at: now,
                    event: "escalated".into(),
                    by: Some("reactor".into()),
                    note: Some(if round > 1 {
                        format!("level {number_of_level}, round {round}")
                    } else {
                        format!("level {number_of_level}")
                    }),
                });
            }
            if recipients.is_empty() {
                i.timeline.push(Event {
                    at: now,
                    event: "nobody to notify".into(),
                    by: Some("reactor".into()),
                    note: Some(format!(
                        "level {number_of_level}: nobody is on duty for it at this time"
                    )),
                });
            }
            for r in &recipients {
                i.timeline.push(Event {
                    at: now,
                    event: "notified".into(),
                    by: Some(r.person.clone().unwrap_or_else(|| r.channel.clone())),
                    note: Some(format!(
                        "level {number_of_level} via {} ({})",
                        r.channel, r.role
                    )),
                });
            }
            if let Some(e) = &mut i.escalation {
                e.level = e.level.max(number_of_level);
                e.next = next;
                e.due = next_due;
            }
        })?;
        if advanced.is_none() {
            // Claimed or resolved meanwhile: nothing of this step goes out.
            self.notifier.cancel_staged(&prefix, now)?;
            if let Some(k) = next_key {
                self.incidents.timers.remove(k)?;
            }
            return Ok(None);
        }
        Ok(Some(Fired {
            lateness: now.duration_since(due),
            level: number_of_level,
        }))
    }

    /// The page for one recipient of one level.
    fn notice(&self, i: &Incident, r: &Recipient, key: &str, level: u32, now: Timestamp) -> Notice {
        let severity = match i.severity {
            Severity::Crit => notify::Severity::Critical,
            Severity::Err => notify::Severity::Error,
            Severity::Warn => notify::Severity::Warning,
        };
        let base = self.external_url.trim_end_matches('/');
        let person = r.person.clone().unwrap_or_default();
        // The one-click claim link: claims as the person paged (changeable on its page).
        let token = self.signer.claim_token(
            i.number,
            i.escalation.as_ref().map_or(0, |e| e.epoch),
            Some(person.clone()).filter(|p| !p.is_empty()),
            later(now, CLAIM_LINK_LIFETIME),
        );
        let link = format!("{base}/ui/claim/{token}");
        let incident_url = format!("{base}/ui/incidents/{}", i.number);
        let mut labels = crate::domain::Labels::new();
        for (k, v) in [
            ("alertname", "ReactorIncident".to_owned()),
            ("incident", i.number.to_string()),
            ("service", i.service.clone()),
            ("severity", severity.as_str().to_owned()),
            ("level", level.to_string()),
            ("person", person.clone()),
        ] {
            if !v.is_empty() {
                labels.insert(k.to_owned(), v);
            }
        }
        let mut annotations = crate::domain::Labels::new();
        annotations.insert("summary".into(), i.title.clone());
        annotations.insert("description".into(), i.message.clone());
        annotations.insert("incident_url".into(), incident_url);
        annotations.insert("claim_url".into(), link.clone());
        let details = [
            ("incident", serde_json::Value::from(i.number)),
            ("service", i.service.clone().into()),
            ("level", level.into()),
            ("person", person.into()),
            ("role", r.role.clone().into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Notice {
            kind: Kind::Incident,
            dedup_key: format!("reactor/{key}"),
            summary: format!(
                "[{}] incident {} on {}: {}",
                i.severity.as_str(),
                i.number,
                i.service,
                i.title
            ),
            description: i.message.clone(),
            severity,
            source: if i.source.is_empty() {
                i.service.clone()
            } else {
                i.source.clone()
            },
            component: i.service.clone(),
            group: self
                .oncall
                .service(&i.service)
                .map(|s| s.team.clone())
                .unwrap_or_default(),
            class: "incident".into(),
            link,
            labels,
            annotations,
            details,
            at: now,
            to: r.address.clone(),
        }
    }

    /// Fires due steps until `shutdown`: woken when an incident opens, otherwise at the next due
    /// time (looking at the clock at least every 200 ms).
    pub async fn run(self, shutdown: CancellationToken) {
        self.run_with(shutdown, |_| {}).await
    }

    /// [`Escalations::run`], handing each batch of fired steps to `on_fire` (the lateness
    /// benchmark).
    pub async fn run_with(self, shutdown: CancellationToken, mut on_fire: impl FnMut(&[Fired])) {
        let wake = Arc::clone(&self.incidents.wake);
        loop {
            let fired = match self.fire_due().await {
                Ok(f) => {
                    on_fire(&f);
                    f.len()
                }
                Err(e) => {
                    tracing::error!(error = %e, reason = e.label(), "escalation steps could not fire; trying again in 1s");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            if fired >= BATCH {
                continue;
            }
            let wait = match self.next_due() {
                Ok(Some(due)) => {
                    let ms = due.as_millisecond() - self.clock.now().as_millisecond();
                    Duration::from_millis(ms.max(0) as u64).min(POLL)
                }
                _ => POLL,
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
