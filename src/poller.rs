//! The second way alerts come in. Alertmanager's inhibition is global (it mutes an alert for
//! every receiver, prometheus/alertmanager#180), so the inhibit rule that holds the humans' copy
//! of an auto-remediation alert back while reactor's heartbeat is alive holds reactor's webhook
//! copy back too. Reactor therefore reads those held alerts from `GET /api/v2/alerts` (filtered
//! by `alertmanager.poll_filter`) and records them exactly as the webhook does: durably, then
//! queued. When a held alert disappears from Alertmanager (it resolved), reactor records its
//! resolution. Alerts that are not inhibited reach reactor by webhook and are left alone here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::alertmanager::{AlertmanagerApi, GettableAlert};
use crate::domain::{Alert, AlertStatus, Fingerprint};
use crate::engine::Queue;
use crate::health::Health;
use crate::history::Store;
use crate::metrics::{Metrics, StatusLabels};

/// Alerts reactor raises itself.
const OWN_ALERTS: [&str; 4] = [
    crate::escalation::REMEDIATION_FAILED,
    crate::escalation::REMEDIATION_LOOP,
    crate::watchdog::REACTOR_UNHEALTHY,
    crate::watchdog::REACTOR_HEARTBEAT,
];

/// Held alerts already recorded, by fingerprint.
#[derive(Default)]
pub struct Held {
    seen: HashMap<Fingerprint, Alert>,
}

impl Held {
    /// Compares one poll's answer with what was recorded: returns the alerts to record (newly
    /// held firing alerts, and resolutions of held alerts that are gone) and the updated state,
    /// applied by [`Held::commit`] once they are recorded.
    pub fn diff(
        &self,
        answer: Vec<GettableAlert>,
        now: Timestamp,
    ) -> (Vec<Alert>, HashMap<Fingerprint, Alert>) {
        let mut next = HashMap::new();
        let mut fresh = Vec::new();
        let mut present = HashSet::new();
        for a in answer {
            let Ok(fp) = Fingerprint::parse(&a.fingerprint) else {
                tracing::warn!(fingerprint = %a.fingerprint, "Alertmanager returned an alert with an unusable fingerprint; skipped");
                continue;
            };
            present.insert(fp.clone());
            if a.status.inhibited_by.is_empty() {
                continue; // delivered by webhook
            }
            if a.labels
                .get("alertname")
                .is_some_and(|n| OWN_ALERTS.contains(&n.as_str()))
            {
                continue; // reactor's own pages are never remediated
            }
            if let Some(known) = self.seen.get(&fp).filter(|k| k.starts_at == a.starts_at) {
                next.insert(fp, known.clone());
                continue;
            }
            if !a.status.silenced_by.is_empty() {
                continue; // a human silenced it
            }
            let alert = Alert {
                status: AlertStatus::Firing,
                fingerprint: fp.clone(),
                labels: a.labels,
                annotations: a.annotations,
                starts_at: a.starts_at,
                ends_at: None,
                generator_url: a.generator_url,
            };
            fresh.push(alert.clone());
            next.insert(fp, alert);
        }
        for (fp, alert) in &self.seen {
            if !present.contains(fp) {
                let mut resolved = alert.clone();
                resolved.status = AlertStatus::Resolved;
                resolved.ends_at = Some(now);
                fresh.push(resolved);
            }
        }
        (fresh, next)
    }

    pub fn commit(&mut self, next: HashMap<Fingerprint, Alert>) {
        self.seen = next;
    }
}

/// Where held alerts go: the intake, and the health and metrics that count them. Not the engine.
#[derive(Clone)]
pub struct Inbox {
    pub store: Store,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub queue: Queue,
}

/// Polls every `interval` until `shutdown`. With `catch_up` (a replica that just became the
/// leader) it first records every firing alert the filter selects, held or not: alerts delivered
/// to a leader that died before running them run here (the guards and the cluster's target locks
/// keep those it did run from running twice).
pub async fn poll_loop(
    inbox: Inbox,
    api: AlertmanagerApi,
    interval: Duration,
    filter: Vec<String>,
    catch_up: bool,
    shutdown: CancellationToken,
) {
    let mut held = Held::default();
    // Until it succeeds: an Alertmanager that does not answer, or a full queue, is tried again.
    if catch_up {
        loop {
            match catch_up_once(&inbox, &api, &filter).await {
                Ok(n) => {
                    tracing::info!(
                        alerts = n,
                        "catch-up: recorded Alertmanager's firing alerts as the new leader"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up: could not record Alertmanager's firing alerts; trying again")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {},
            }
        }
    }
    loop {
        if let Err(e) = poll_once(&inbox, &api, &filter, &mut held).await {
            tracing::warn!(error = %e, "could not read held alerts from Alertmanager; retrying");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {},
        }
    }
}

/// Records every firing alert the filter selects that is not reactor's own or silenced, held or
/// not, in chunks the queue can take. The number recorded.
async fn catch_up_once(
    inbox: &Inbox,
    api: &AlertmanagerApi,
    filter: &[String],
) -> Result<usize, String> {
    let answer = api.alerts(filter).await.map_err(|e| e.to_string())?;
    let firing: Vec<Alert> = answer
        .into_iter()
        .filter_map(|a| {
            let own = a
                .labels
                .get("alertname")
                .is_some_and(|n| OWN_ALERTS.contains(&n.as_str()));
            let fingerprint = Fingerprint::parse(&a.fingerprint).ok()?;
            (!own && a.status.silenced_by.is_empty()).then_some(Alert {
                status: AlertStatus::Firing,
                fingerprint,
                labels: a.labels,
                annotations: a.annotations,
                starts_at: a.starts_at,
                ends_at: None,
                generator_url: a.generator_url,
            })
        })
        .collect();
    let n = firing.len();
    for chunk in firing.chunks(64) {
        record(inbox, chunk.to_vec(), Timestamp::now()).await?;
    }
    Ok(n)
}

async fn poll_once(
    inbox: &Inbox,
    api: &AlertmanagerApi,
    filter: &[String],
    held: &mut Held,
) -> Result<(), String> {
    let answer = api.alerts(filter).await.map_err(|e| e.to_string())?;
    let now = Timestamp::now();
    let (fresh, next) = held.diff(answer, now);
    if fresh.is_empty() {
        held.commit(next);
        return Ok(());
    }
    record(inbox, fresh, now).await?;
    held.commit(next);
    Ok(())
}

/// Records `fresh` alerts as read from Alertmanager, durably, then queues them.
async fn record(inbox: &Inbox, fresh: Vec<Alert>, now: Timestamp) -> Result<(), String> {
    let n = fresh.len();
    if n == 0 {
        return Ok(());
    }
    let permits = inbox
        .queue
        .try_reserve_many(n)
        .map_err(|_| "work queue is full; held alerts are read again next time".to_owned())?;
    let intakes = inbox
        .store
        .accept_with(fresh, now, true)
        .await
        .map_err(|e| {
            inbox.metrics.store_errors.inc();
            e.to_string()
        })?;
    inbox.health.backlog.added(n);
    for i in &intakes {
        if i.alert.status == AlertStatus::Firing {
            inbox.metrics.held_alerts.inc();
        }
        let status = i.alert.status.as_str().to_owned();
        inbox
            .metrics
            .alerts_received
            .get_or_create(&StatusLabels { status })
            .inc();
        tracing::info!(seq = i.seq, alertname = i.alert.alertname(), status = %i.alert.status, "read a held alert from Alertmanager");
    }
    for (permit, intake) in permits.zip(intakes) {
        permit.send(intake);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alertmanager::AlertState;

    fn gettable(fp: &str, starts: i64, inhibited: bool, silenced: bool) -> GettableAlert {
        GettableAlert {
            labels: [("alertname".to_owned(), "DiskFull".to_owned())].into(),
            annotations: Default::default(),
            starts_at: Timestamp::from_second(starts).unwrap(),
            generator_url: None,
            fingerprint: fp.into(),
            status: AlertState {
                silenced_by: if silenced { vec!["s".into()] } else { vec![] },
                inhibited_by: if inhibited { vec!["h".into()] } else { vec![] },
            },
        }
    }

    #[test]
    fn records_held_alerts_once_and_their_resolution_when_gone() {
        let now = Timestamp::from_second(100).unwrap();
        let mut held = Held::default();
        let (fresh, next) = held.diff(
            vec![
                gettable("a1", 1, true, false),
                gettable("b2", 1, false, false),
                gettable("c3", 1, true, true),
            ],
            now,
        );
        let fps: Vec<&str> = fresh.iter().map(|a| a.fingerprint.as_str()).collect();
        assert_eq!(fps, ["a1"], "only inhibited, unsilenced alerts are read");
        held.commit(next);

        let (fresh, next) = held.diff(vec![gettable("a1", 1, true, false)], now);
        assert!(fresh.is_empty(), "the same held alert is recorded once");
        held.commit(next);

        let (fresh, next) = held.diff(vec![gettable("a1", 50, true, false)], now);
        assert_eq!(fresh.len(), 1, "a new firing (new startsAt) is a new alert");
        held.commit(next);

        let (fresh, next) = held.diff(vec![], now);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].status, AlertStatus::Resolved);
        assert_eq!(fresh[0].ends_at, Some(now));
        held.commit(next);
        assert!(held.diff(vec![], now).0.is_empty());
    }
}
