//! Making a broken reactor loud. The watchdog runs the self-checks every heartbeat interval:
//! a wedged dispatcher (accepted alerts waiting with no run starting), runs stuck past their
//! deadline, database writes failing, pages stuck in the outbox, and pages Alertmanager refused
//! (nobody was paged for those runs). It keeps the latest report for `/readyz`, posts one
//! `ReactorUnhealthy` alert per failing check into Alertmanager and resolves it when the check
//! passes again.
//!
//! It also posts `ReactorHeartbeat` with `endsAt = now + 3 × interval`. The shipped Alertmanager
//! config inhibits the humans' copy of auto-remediation alerts while that heartbeat is alive, so
//! when reactor dies (or a check that stops remediation fails, when the heartbeat is withheld),
//! the heartbeat expires and the humans get the original alerts directly: it fails open.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::alertmanager::{AlertmanagerApi, PostableAlert};
use crate::clock::later;
use crate::clock::Clock;
use crate::config::WatchdogSettings;
use crate::domain::Labels;
use crate::engine::InFlightRuns;
use crate::escalation::outbox::Entry;
use crate::escalation::outbox::Outbox;
pub use crate::health::{Backlog, Check, CheckResult, DispatcherGuard, Health};
use crate::history::Store;
use crate::metrics::CheckLabels;
use crate::metrics::Metrics;
use crate::notify::{Kind, Notice, Notifier, Severity};

pub const REACTOR_HEARTBEAT: &str = "ReactorHeartbeat";
pub const REACTOR_UNHEALTHY: &str = "ReactorUnhealthy";

/// How long a page Alertmanager refused keeps `escalation_rejected` failing: long enough for the
/// `ReactorUnhealthy` page to reach someone, as long as the shipped `ReactorEscalationRejected`
/// rule's window, and short enough that one refusal does not hold `/readyz` at 503 for a day.
pub const REJECTED_PAGE_WINDOW: Duration = Duration::from_secs(3600);

/// What the watchdog looks at: the shared health state, the metrics, the database it probes, the
/// outbox, the clock and the runs in flight. Not the engine.
#[derive(Clone)]
pub struct Watched {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub outbox: Outbox,
    pub clock: Arc<dyn Clock>,
    pub in_flight: Arc<InFlightRuns>,
}

/// Refused pages a self-check's detail names; the count covers the rest.
const REJECTED_PAGES_NAMED: usize = 3;

/// Runs every check once.
pub async fn run_checks(
    watched: &Watched,
    settings: &WatchdogSettings,
    store_errors_seen: &mut u64,
) -> BTreeMap<Check, CheckResult> {
    let health = &watched.health;
    let mut report = BTreeMap::new();
    let mut put = |check, failure: Option<String>| {
        report.insert(
            check,
            CheckResult {
                ok: failure.is_none(),
                detail: failure,
            },
        );
    };

    put(
        Check::Dispatcher,
        if !health.dispatcher_alive() {
            Some(
                "the dispatcher task is not running: accepted alerts are not being processed"
                    .into(),
            )
        } else {
            health.backlog.stalled_for().filter(|d| *d >= settings.stall_after).map(|d| {
                format!(
                    "{} accepted alert(s) waited {} with no run starting: every worker is busy or wedged",
                    health.backlog.depth(),
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                )
            })
        },
    );

    let stuck = watched.in_flight.stuck(settings.stuck_grace);
    put(
        Check::StuckRuns,
        (!stuck.is_empty()).then(|| {
            let list: Vec<String> = stuck
                .iter()
                .map(|(id, over)| format!("{id} ({}s past its deadline)", over.as_secs()))
                .collect();
            format!("runs stuck past their deadline: {}", list.join(", "))
        }),
    );

    let errors = watched.metrics.store_errors.get();
    let probe = tokio::time::timeout(Duration::from_secs(5), watched.store.probe()).await;
    let storage = match probe {
        Err(_) => Some("a database write did not become durable within 5s".to_owned()),
        Ok(Err(e)) => Some(format!("database write failed: {e}")),
        Ok(Ok(())) if errors > *store_errors_seen => Some(format!(
            "{} database write(s) failed since the last check",
            errors - *store_errors_seen
        )),
        Ok(Ok(())) => None,
    };
    *store_errors_seen = errors;
    put(Check::Storage, storage);

    let now = watched.clock.now();
    let rejected_since = crate::clock::earlier(now, REJECTED_PAGE_WINDOW);
    let (backlog, rejected) = match watched.outbox.unsettled(rejected_since) {
        Err(e) => {
            let failure = format!("cannot read the escalation outbox: {e}");
            (Some(failure.clone()), Some(failure))
        }
        Ok(unsettled) => (
            escalation_backlog(watched, settings, &unsettled.pending, now),
            escalation_rejected(unsettled.rejected),
        ),
    };
    put(Check::EscalationBacklog, backlog);
    put(Check::EscalationRejected, rejected);

    for (check, result) in &report {
        watched
            .metrics
            .self_check_failing
            .get_or_create(&CheckLabels {
                check: check.as_str().into(),
            })
            .set(i64::from(!result.ok));
    }
    report
}

/// Pages waiting longer than `backlog_after`; updates the outbox gauges on the way.
fn escalation_backlog(
    watched: &Watched,
    settings: &WatchdogSettings,
    pending: &[Entry],
    now: Timestamp,
) -> Option<String> {
    let oldest = pending.iter().min_by_key(|e| e.created);
    let age = oldest
        .map(|e| now.duration_since(e.created).unsigned_abs())
        .unwrap_or_default();
    watched
        .metrics
        .escalations_pending
        .set(pending.len() as i64);
    watched
        .metrics
        .escalation_oldest_pending_age
        .set(age.as_secs_f64());
    oldest.filter(|_| age >= settings.backlog_after).map(|e| {
        format!(
            "{} page(s) not accepted by Alertmanager, the oldest for {}s: {}",
            pending.len(),
            age.as_secs(),
            e.last_error.as_deref().unwrap_or("not attempted yet")
        )
    })
}

/// Pages Alertmanager refused within [`REJECTED_PAGE_WINDOW`], newest first, naming their runs.
fn escalation_rejected(mut rejected: Vec<Entry>) -> Option<String> {
    if rejected.is_empty() {
        return None;
    }
    rejected.sort_by_key(|e| std::cmp::Reverse(e.next_attempt));
    let named: Vec<String> = rejected
        .iter()
        .take(REJECTED_PAGES_NAMED)
        .map(|e| {
            format!(
                "run {}: {}",
                e.run,
                e.last_error.as_deref().unwrap_or("refused")
            )
        })
        .collect();
    Some(format!(
        "Alertmanager refused {} page(s) in the last {}, so nobody was paged for those failed runs; {}",
        rejected.len(),
        humantime::format_duration(REJECTED_PAGE_WINDOW),
        named.join("; ")
    ))
}

/// Builds the heartbeat, alive for three intervals.
pub fn heartbeat(instance: &str, interval: Duration, now: Timestamp) -> PostableAlert {
    let mut labels = Labels::new();
    labels.insert("alertname".into(), REACTOR_HEARTBEAT.into());
    labels.insert("severity".into(), "none".into());
    labels.insert("reactor".into(), instance.into());
    let mut annotations = Labels::new();
    annotations.insert(
        "summary".into(),
        "reactor is alive; while this alert fires, Alertmanager holds back the humans' copy of auto-remediation alerts".into(),
    );
    PostableAlert {
        labels,
        annotations,
        starts_at: now,
        ends_at: later(now, interval * 3),
        generator_url: format!("{instance}/readyz"),
    }
}

/// Builds `ReactorUnhealthy` for `check`, firing (`detail` set) or resolved (`None`).
pub fn unhealthy(
    instance: &str,
    severity: &str,
    check: Check,
    detail: Option<&str>,
    since: Timestamp,
    now: Timestamp,
    interval: Duration,
) -> PostableAlert {
    let mut labels = Labels::new();
    labels.insert("alertname".into(), REACTOR_UNHEALTHY.into());
    labels.insert("severity".into(), severity.into());
    labels.insert("check".into(), check.as_str().into());
    labels.insert("reactor".into(), instance.into());
    let mut annotations = Labels::new();
    annotations.insert(
        "summary".into(),
        format!("reactor self-check {} is failing", check.as_str()),
    );
    annotations.insert(
        "description".into(),
        detail.unwrap_or("the check passes again").into(),
    );
    PostableAlert {
        labels,
        annotations,
        starts_at: since,
        // Re-posted every interval while failing, so it also ends if reactor dies (the heartbeat
        // and Prometheus' ReactorDown take over then).
        ends_at: if detail.is_some() {
            later(now, interval * 3)
        } else {
            now
        },
        generator_url: format!("{instance}/readyz"),
    }
}

/// Paging when the paging path is broken: the watchdog channels, paged directly (not through
/// Alertmanager) when Alertmanager is unreachable or the dead man's switch alert stops arriving.
#[derive(Clone)]
pub struct Paging {
    pub notifier: Notifier,
    pub deadman_after: Duration,
    /// Where a failing self-check opens an incident: the incidents and reactor's own service.
    pub incidents: Option<(crate::incident::Incidents, String)>,
}

/// Opens an incident for a self-check that started failing, or resolves it when it passes
/// again (keyed by the check, so a check failing on and off updates one incident).
async fn self_check_incident(paging: &Paging, check: Check, detail: Option<&str>, now: Timestamp) {
    let Some((incidents, service)) = &paging.incidents else {
        return;
    };
    let key = format!("reactor-unhealthy-{}", check.as_str());
    let result = match detail {
        Some(detail) => {
            let new = crate::incident::NewIncident {
                service: service.clone(),
                severity: crate::incident::Severity::Crit,
                title: format!("reactor self-check {} is failing", check.as_str()),
                message: detail.to_owned(),
                source: "reactor".into(),
                detected_at: Some(now),
                dedup_key: Some(key.clone()),
                run: None,
                fingerprint: Some(key),
                approvers: None,
            };
            incidents.create(new, now).await.map(drop)
        }
        None => incidents
            .resolve_for_alert(&key, "reactor", now)
            .await
            .map(drop),
    };
    if let Err(e) = result {
        tracing::error!(check = check.as_str(), error = %e, "could not record the self-check's incident");
    }
}

/// The page for a broken paging path: `check` names it, `summary` says what is wrong.
fn path_notice(
    check: &str,
    summary: String,
    description: String,
    instance: &str,
    now: Timestamp,
) -> Notice {
    let mut labels = Labels::new();
    labels.insert("alertname".into(), "ReactorPagingPathBroken".into());
    labels.insert("check".into(), check.into());
    labels.insert("reactor".into(), instance.into());
    let mut annotations = Labels::new();
    annotations.insert("summary".into(), summary.clone());
    annotations.insert("description".into(), description.clone());
    Notice {
        kind: Kind::Watchdog,
        dedup_key: format!("reactor/watchdog/{check}"),
        summary,
        description,
        severity: Severity::Critical,
        source: instance.into(),
        component: "reactor".into(),
        group: "reactor".into(),
        class: check.into(),
        link: format!("{instance}/readyz"),
        labels,
        annotations,
        details: [("check".to_owned(), check.into())].into_iter().collect(),
        at: now,
        to: None,
    }
}

/// Pages or resolves the two broken-path conditions on the watchdog channels.
async fn page_broken_path(
    paging: &Paging,
    settings: &WatchdogSettings,
    health: &Health,
    am_down_since: Option<Timestamp>,
    instance: &str,
    now: Timestamp,
) {
    let channels = &settings.channels;
    if channels.is_empty() {
        return;
    }
    let down_for = am_down_since.map(|since| {
        let ms = now.as_millisecond().saturating_sub(since.as_millisecond());
        Duration::from_millis(ms.max(0) as u64)
    });
    let for_ = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
    let am_down = down_for.filter(|d| *d >= settings.alertmanager_down_after);
    let conditions = [
        (
            "alertmanager_down",
            am_down.is_some(),
            "Alertmanager is unreachable: reactor cannot page through it",
            format!(
                "reactor could not post to Alertmanager for {}; pages, heartbeats and silences do not get through",
                for_(down_for.unwrap_or_default())
            ),
        ),
        (
            "deadman",
            health.deadman_age().is_some_and(|age| age >= paging.deadman_after),
            "The monitoring pipeline is broken: the dead man's switch alert stopped arriving",
            format!(
                "reactor has not received the always-firing alert for {}: Prometheus, Alertmanager or the route to reactor is broken",
                for_(health.deadman_age().unwrap_or_default())
            ),
        ),
    ];
    for (check, firing, summary, description) in conditions {
        if check == "deadman" && health.deadman_age().is_none() {
            continue;
        }
        let notice = || path_notice(check, summary.into(), description, instance, now);
        let stored = paging
            .notifier
            .watchdog(check, firing, notice, channels, now)
            .await;
        if let Err(e) = stored {
            tracing::error!(check, error = %e, "could not store the watchdog's notification");
        }
    }
}

/// Checks, heartbeats and `ReactorUnhealthy` pages every interval until `shutdown`.
pub async fn watch(
    watched: Watched,
    api: AlertmanagerApi,
    settings: WatchdogSettings,
    instance: String,
    paging: Paging,
    shutdown: CancellationToken,
) {
    let mut am_down_since: Option<Timestamp> = None;
    let interval = settings.heartbeat_interval.max(Duration::from_millis(100));
    let mut store_errors_seen = watched.metrics.store_errors.get();
    // Checks failing now (since when), and checks that passed again but whose resolve was not yet
    // accepted by Alertmanager.
    let mut failing: BTreeMap<Check, Timestamp> = BTreeMap::new();
    let mut resolving: BTreeMap<Check, Timestamp> = BTreeMap::new();
    let configured = api.settings().url.is_some();
    loop {
        let report = run_checks(&watched, &settings, &mut store_errors_seen).await;
        let now = watched.clock.now();
        let mut posts = Vec::new();
        for (check, result) in &report {
            match &result.detail {
                Some(detail) => {
                    if !failing.contains_key(check) {
                        tracing::error!(check = check.as_str(), %detail, "self-check failed");
                        self_check_incident(&paging, *check, Some(detail), now).await;
                    }
                    resolving.remove(check);
                    let since = *failing.entry(*check).or_insert(now);
                    posts.push(unhealthy(
                        &instance,
                        api.settings().severity.as_str(),
                        *check,
                        Some(detail),
                        since,
                        now,
                        interval,
                    ));
                }
                None => {
                    if let Some(since) = failing.remove(check) {
                        tracing::info!(check = check.as_str(), "self-check passes again");
                        resolving.insert(*check, since);
                        self_check_incident(&paging, *check, None, now).await;
                    }
                }
            }
        }
        for (check, since) in &resolving {
            posts.push(unhealthy(
                &instance,
                api.settings().severity.as_str(),
                *check,
                None,
                *since,
                now,
                interval,
            ));
        }
        watched.health.set_report(report);

        let withhold = failing.keys().any(|c| c.stops_remediation());
        if configured {
            if withhold {
                watched.metrics.heartbeat("withheld");
                tracing::warn!("heartbeat withheld while a self-check fails: Alertmanager will release the humans' copies of auto-remediation alerts");
            } else {
                posts.push(heartbeat(&instance, interval, now));
            }
            if !posts.is_empty() {
                match api.post_alerts(&posts).await {
                    Ok(()) => {
                        am_down_since = None;
                        resolving.clear();
                        if !withhold {
                            watched.health.heartbeat_accepted();
                            watched.metrics.heartbeat("ok");
                        }
                    }
                    Err(e) => {
                        am_down_since.get_or_insert(now);
                        if !withhold {
                            watched.metrics.heartbeat("failed");
                        }
                        tracing::warn!(error = %e, "could not post the heartbeat / self-check alerts to Alertmanager");
                    }
                }
            }
        } else {
            resolving.clear();
        }
        page_broken_path(
            &paging,
            &settings,
            &watched.health,
            am_down_since,
            &instance,
            watched.clock.now(),
        )
        .await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {},
        }
    }
    tracing::debug!("watchdog stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_lives_three_intervals_and_unhealthy_resolves_with_ends_at_now() {
        let now = Timestamp::from_second(1_000).unwrap();
        let hb = heartbeat("http://r", Duration::from_secs(10), now);
        assert_eq!(hb.labels["alertname"], REACTOR_HEARTBEAT);
        assert_eq!(hb.ends_at.as_second(), 1_030);
        let since = Timestamp::from_second(900).unwrap();
        let firing = unhealthy(
            "http://r",
            "critical",
            Check::Dispatcher,
            Some("x"),
            since,
            now,
            Duration::from_secs(10),
        );
        assert_eq!(firing.labels["check"], "dispatcher");
        assert_eq!(firing.labels["severity"], "critical");
        assert_eq!(firing.starts_at, since);
        assert!(firing.ends_at > now);
        let resolved = unhealthy(
            "http://r",
            "critical",
            Check::Dispatcher,
            None,
            since,
            now,
            Duration::from_secs(10),
        );
        assert_eq!(resolved.ends_at, now);
        assert_eq!(resolved.labels, firing.labels, "same alert, so it resolves");
    }
}
