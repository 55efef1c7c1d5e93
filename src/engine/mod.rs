//! The engine turns accepted alerts into runs. For each alert it asks the guards, per matching
//! playbook, whether to remediate (deduplication, cooldown, attempts per window, circuit breaker),
//! records one history entry per decision, executes admitted runs with their retries, and sends
//! failures to the escalation outbox. It also owns crash recovery and the drain at shutdown.
//!
//! Crash semantics (SIGKILL): an accepted alert is in the intake until its decisions are recorded,
//! so after a restart it is processed normally. A run caught in progress is re-run when its
//! playbook declares `idempotent: true`; otherwise it is recorded as `interrupted` and escalated
//! once, so a human looks at it. A run admitted beside another run of the same alert that had not
//! started yet never acted, so it simply runs. A panic while processing an alert fails its runs
//! and pages, instead of leaving the alert to panic again at every start.
//!
//! Here: the shared [`Engine`], processing one alert, escalation and the dispatcher. [`admit`]
//! holds the guards' decision, [`run`] the steps and the outcome, [`verify`] silences and
//! verification, [`recover`] start-up recovery, the shutdown drain and panics.

mod admit;
mod approve;
mod in_flight;
mod notice;
mod recover;
mod run;
#[cfg(test)]
mod tests;
mod verify;

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use jiff::Timestamp;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::ALERTMANAGER_CHANNEL;
use crate::domain::{Alert, AlertStatus, Fingerprint};
use crate::escalation::outbox::Outbox;
use crate::escalation::{Escalator, REMEDIATION_FAILED, REMEDIATION_LOOP};
use crate::executor::{Attempt, Executor, Started, StepError};
use crate::guard::{Admission, BreakerDecision, Guards, TargetDecision};
use crate::health::Health;
use crate::history::{
    DeliveryStatus, EscalationRecord, Intake, Outcome, Run, RunId, StepRecord, Store, StoreError,
};
use crate::metrics::{Metrics, StatusLabels};
use crate::notify::Notifier;
use crate::playbook::{render_params, InForce, OnResolved, Playbook, TemplateContext};

pub use approve::{approval_loop, Answer, ApprovalError, Approver};
pub use in_flight::{InFlight, InFlightRuns};
pub use verify::verify_loop;

/// The engine's context: everything a run needs, shared by all runs. Its parts are read
/// inside the crate only: `app` hands the narrow handles (outbox, in-flight registry, health)
/// to the tasks around the engine, which never hold the engine itself.
pub struct Engine {
    pub(crate) store: Store,
    pub(crate) playbooks: Arc<InForce>,
    pub(crate) executor: Executor,
    pub(crate) escalator: Escalator,
    pub(crate) outbox: Outbox,
    /// The notification channels' outbox.
    pub(crate) notifier: Notifier,
    /// Where pages go when a playbook names no `escalate.to`.
    pub(crate) route: Vec<String>,
    /// The incidents a failed run opens, and the service when its playbook names none.
    pub(crate) incidents: Option<crate::incident::Incidents>,
    pub(crate) incident_service: Option<String>,
    pub(crate) guards: Guards,
    /// Whether this replica leads, and the cluster-held target locks (two replicas).
    pub(crate) leadership: Arc<crate::ha::Leadership>,
    pub(crate) target_locks: Option<crate::ha::TargetLocks>,
    /// `mode: shadow` (or `REACTOR_MODE=shadow`): every playbook's runs are shadow runs.
    pub(crate) shadow_all: bool,
    /// Runs waiting for approval: run id → deadline (ms), durable.
    pub(crate) approvals: sled::Tree,
    /// Woken when a run starts waiting for approval.
    pub(crate) approval_wake: Arc<Notify>,
    /// Maintenance pauses.
    pub(crate) pauses: crate::pause::Pauses,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    /// Base URL for links to runs in pages.
    pub(crate) external_url: String,
    /// The `max_concurrent` limits of playbooks that set one, by name and limit (a reload that
    /// changes the limit starts a new one).
    per_playbook: Mutex<HashMap<(String, usize), Arc<Semaphore>>>,
    /// The runs executing now; the watchdog holds it too.
    pub(crate) in_flight: Arc<InFlightRuns>,
    /// Runs waiting for their alert to resolve, and those whose resolution was seen.
    verifying: Mutex<HashMap<RunId, Fingerprint>>,
    resolved_seen: Mutex<HashSet<RunId>>,
    pub(crate) verify_wake: Notify,
}

/// The sending side of the work queue, held by the webhook handler.
pub type Queue = mpsc::Sender<Intake>;

/// An escalation decided while recording an alert's decisions, sent once they are stored.
struct Page {
    alertname: &'static str,
    run: Run,
    playbook: Option<Arc<Playbook>>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        playbooks: Arc<InForce>,
        executor: Executor,
        escalator: Escalator,
        notifier: Notifier,
        clock: Arc<dyn Clock>,
        external_url: String,
    ) -> Result<Engine, StoreError> {
        let metrics = Arc::new(Metrics::default());
        let now = clock.now();
        Ok(Engine {
            health: Arc::new(Health::new(&metrics)),
            metrics,
            outbox: Outbox::open(&store)?,
            notifier,
            route: vec![ALERTMANAGER_CHANNEL.to_owned()],
            incidents: None,
            incident_service: None,
            guards: Guards::open(&store)?,
            leadership: crate::ha::Leadership::single(),
            target_locks: None,
            shadow_all: false,
            approvals: store.tree("approvals")?,
            approval_wake: Arc::new(Notify::new()),
            pauses: crate::pause::Pauses::open(&store, now)?,
            store,
            playbooks,
            executor,
            escalator,
            clock,
            external_url,
            per_playbook: Mutex::default(),
            in_flight: Arc::default(),
            verifying: Mutex::new(HashMap::new()),
            resolved_seen: Mutex::new(HashSet::new()),
            verify_wake: Notify::new(),
        })
    }

    /// Two replicas: runs act only while this one leads, and each takes its target's lock in
    /// the cluster first.
    pub fn with_ha(
        mut self,
        leadership: Arc<crate::ha::Leadership>,
        locks: Option<crate::ha::TargetLocks>,
    ) -> Engine {
        self.leadership = leadership;
        self.target_locks = locks;
        self
    }

    /// `true`: every playbook runs in shadow mode.
    pub fn with_shadow(mut self, all: bool) -> Engine {
        self.shadow_all = all;
        self
    }

    /// Where pages go when a playbook names no `escalate.to`.
    pub fn with_route(mut self, route: Vec<String>) -> Engine {
        self.route = route;
        self
    }

    /// The incidents a failed run opens, and the default service.
    pub fn with_incidents(
        mut self,
        incidents: crate::incident::Incidents,
        service: Option<String>,
    ) -> Engine {
        self.incidents = Some(incidents);
        self.incident_service = service;
        self
    }

    /// The playbook in force that `run` names, if it is still loaded.
    fn playbook_of(&self, run: &Run) -> Option<Arc<Playbook>> {
        self.playbooks.get(run.playbook.as_deref()?)
    }

    /// The limit on concurrent runs of `playbook`, when it sets one.
    fn concurrency_limit(&self, playbook: &Playbook) -> Option<Arc<Semaphore>> {
        if playbook.max_concurrent == 0 {
            return None;
        }
        let mut limits = self.per_playbook.lock().unwrap_or_else(|p| p.into_inner());
        let key = (playbook.name.clone(), playbook.max_concurrent);
        let limit = limits
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(playbook.max_concurrent)));
        Some(Arc::clone(limit))
    }

    pub fn run_url(&self, id: RunId) -> String {
        format!("{}/api/v1/runs/{id}", self.external_url)
    }

    /// Handles one accepted alert from intake to recorded outcome. A panic while doing so fails
    /// the alert's runs (and pages), instead of leaving the alert in the intake to panic again at
    /// every start.
    pub async fn process(self: &Arc<Self>, intake: Intake) {
        // Two replicas: alerts recovered at start wait until this replica leads.
        self.leadership.wait_to_lead().await;
        let seq = intake.seq;
        let processed = AssertUnwindSafe(self.process_inner(intake))
            .catch_unwind()
            .await;
        match processed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.metrics.store_errors.inc();
                tracing::error!(seq, error = %e, "could not record a run; the alert stays in the intake for the next start");
            }
            Err(panic) => self.fail_after_panic(seq, &panic_message(&*panic)).await,
        }
    }

    async fn process_inner(self: &Arc<Self>, intake: Intake) -> Result<(), StoreError> {
        // A refused alert is a copy cut to the limits: no playbook may act on it. A run asked
        // for by hand runs the playbook asked for, whatever its matchers say.
        let matched = match (&intake.refused, &intake.manual) {
            (Some(_), _) => Vec::new(),
            (None, Some(m)) => self.playbooks.get(&m.playbook).into_iter().collect(),
            (None, None) => self.playbooks.current().matching(&intake.alert),
        };
        let now = self.clock.now();
        let Intake {
            seq,
            received_at,
            alert,
            held,
            refused,
            manual,
        } = intake;
        let status = alert.status;
        if status == AlertStatus::Firing {
            self.health.alert_seen(alert.alertname());
        }
        let resolved = (status == AlertStatus::Resolved).then(|| alert.fingerprint.clone());
        let new_run = |index, alert, playbook| {
            let mut run = new_run(seq, index, received_at, held, alert, playbook);
            if let Some(m) = &manual {
                let dry = if m.dry_run { " (dry run)" } else { "" };
                run.note(received_at, format!("asked for by {}{dry}", m.by));
                run.manual = Some(m.clone());
            }
            run
        };
        // Runs settled here (skipped, deduplicated, ...) and runs admitted to execute.
        let mut records = Vec::new();
        let mut runnable = Vec::new();
        let mut pages = Vec::new();
        if let Some(why) = refused {
            let mut run = new_run(0, alert, None);
            let reason = format!("reactor refused this alert ({why}); it is recorded here with its labels cut to the limits, and nothing remediates it");
            if status == AlertStatus::Firing {
                run.settle(Outcome::Failed, &reason, now);
                pages.push(Page {
                    alertname: REMEDIATION_FAILED,
                    run: run.clone(),
                    playbook: None,
                });
            } else {
                run.settle(Outcome::Skipped, &reason, now);
            }
            records.push(run);
        } else if let (Some(m), true) = (&manual, matched.is_empty()) {
            let mut run = new_run(0, alert, None);
            let reason = format!("playbook {:?} is not loaded", m.playbook);
            run.settle(Outcome::Skipped, &reason, now);
            records.push(run);
        } else if matched.is_empty() {
            let mut run = new_run(0, alert, None);
            if held && status == AlertStatus::Firing {
                // Alertmanager holds this alert back from humans because reactor is alive, yet
                // nothing here can fix it: page, or nobody hears of it.
                run.settle(Outcome::Failed, "no playbook matches this alert, which Alertmanager holds back from humans while reactor is alive", now);
                pages.push(Page {
                    alertname: REMEDIATION_FAILED,
                    run: run.clone(),
                    playbook: None,
                });
            } else {
                run.settle(Outcome::Skipped, "no playbook matches this alert", now);
            }
            records.push(run);
        } else {
            // Each run owns a copy of the alert; the last one takes the intake's.
            let copies = std::iter::repeat_n(alert, matched.len().min(u16::MAX as usize));
            for ((i, playbook), alert) in matched.iter().enumerate().zip(copies) {
                let mut run = new_run(i, alert, Some(playbook));
                if !self.admit(&mut run, playbook, now, &mut pages)? {
                    records.push(run);
                    continue;
                }
                // `started_at` stays unset until `execute` takes the run up: a run recorded
                // without it never started, and recovery simply runs it.
                runnable.push((run, Arc::clone(playbook)));
            }
        }
        // A lone run is recorded only once it needs to be: before its first step that can act
        // (see `run_steps`), or when it settles. A run whose steps all finish inline, which act
        // on nothing, is written once; if reactor dies first, the intake still holds the alert.
        let defer = matches!(&runnable[..], [(_, p)] if records.is_empty() && !p.silence);
        if !defer {
            self.store
                .put_runs(records.iter().chain(runnable.iter().map(|(r, _)| r)))?;
            self.store.remove_intake(seq)?;
        }
        for r in &records {
            self.metrics
                .run_recorded(r.playbook.as_deref(), r.outcome.as_str());
            if r.outcome == Outcome::Deduplicated {
                let status = r.alert.status.as_str().to_owned();
                self.metrics
                    .deduplicated
                    .get_or_create(&StatusLabels { status })
                    .inc();
            }
        }
        for page in pages {
            self.escalate(page.alertname, page.run, page.playbook.as_deref())
                .await?;
        }
        if let Some(fingerprint) = resolved {
            self.alert_resolved(&fingerprint).await?;
        }
        let unrecorded = defer.then_some(seq);
        for (run, playbook) in runnable {
            self.execute(run, playbook, unrecorded).await?;
        }
        Ok(())
    }

    /// Records that `run` pages the humans and hands the page to the durable outboxes: the
    /// Alertmanager page when its route names `alertmanager`, one notification per other channel.
    async fn escalate(
        &self,
        alertname: &str,
        mut run: Run,
        playbook: Option<&Playbook>,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let page = self
            .escalator
            .page_for(alertname, &run, playbook, &self.run_url(run.id), now);
        // A run escalated before (and caught by a crash on the way) keeps the channels it
        // recorded; a reload since must not page others for it.
        let (to_alertmanager, channels): (bool, Vec<String>) =
            if run.escalation.is_some() || !run.notifications.is_empty() {
                let recorded = run
                    .notifications
                    .iter()
                    .map(|n| n.channel.clone())
                    .collect();
                (run.escalation.is_some(), recorded)
            } else {
                let route = self.route_of(playbook);
                let others = route
                    .iter()
                    .filter(|c| *c != ALERTMANAGER_CHANNEL)
                    .cloned()
                    .collect();
                (route.iter().any(|c| c == ALERTMANAGER_CHANNEL), others)
            };
        let status = if self.escalator.configured() {
            DeliveryStatus::Pending
        } else {
            if channels.is_empty() {
                tracing::error!(run_id = %run.id, %alertname, "no Alertmanager URL is configured: nobody was paged");
            }
            DeliveryStatus::NotConfigured
        };
        let mut changed = false;
        if to_alertmanager && run.escalation.is_none() {
            run.escalation = Some(EscalationRecord {
                alertname: alertname.to_owned(),
                status,
                attempts: 0,
                at: now,
                last_error: None,
                resolved_at: None,
            });
            run.note(now, format!("escalation {alertname} queued"));
            changed = true;
        }
        for channel in &channels {
            if !run.notifications.iter().any(|n| &n.channel == channel) {
                let record = notice::queued(channel, &run, now);
                run.notifications.push(record);
                changed = true;
            }
        }
        if changed {
            self.store.put_run(&run)?;
        }
        let fingerprint = run.alert.fingerprint.clone();
        if !channels.is_empty() {
            let notice = notice::for_run(&run, &page, alertname);
            self.notifier
                .page_run(run.id, &fingerprint, &notice, &channels, now)
                .await?;
        }
        let service = self.incident_service_of(playbook);
        let mut page = page;
        if let Some(service) = service {
            if let Some((number, epoch)) =
                self.open_incident(&run, &page, alertname, service).await?
            {
                // The humans' Alertmanager page links to the incident and claims it in one click.
                let incidents = self.incidents.as_ref().expect("an incident was opened");
                let base = self.external_url.trim_end_matches('/');
                let token = incidents.signer().claim_token(
                    number,
                    epoch,
                    None,
                    crate::clock::later(now, crate::incident::escalate::CLAIM_LINK_LIFETIME),
                );
                page.annotations.insert(
                    "incident_url".into(),
                    format!("{base}/ui/incidents/{number}"),
                );
                page.annotations
                    .insert("claim_url".into(), format!("{base}/ui/claim/{token}"));
            }
        }
        if to_alertmanager
            && status == DeliveryStatus::Pending
            && !self.outbox.enqueue(run.id, page, fingerprint, now).await?
        {
            // Re-processed after a crash: this run's page was already queued, maybe delivered.
            self.outbox.sync_run(run.id, now)?;
        }
        Ok(())
    }

    /// Opens (or updates, by the page's dedup key) the incident of `service` for a failed run,
    /// and links the run to it.
    async fn open_incident(
        &self,
        run: &Run,
        page: &crate::alertmanager::PostableAlert,
        alertname: &str,
        service: String,
    ) -> Result<Option<(u64, u32)>, StoreError> {
        use crate::incident::{IncidentError, NewIncident, Severity};
        let Some(incidents) = &self.incidents else {
            return Ok(None);
        };
        let notice = notice::for_run(run, page, alertname);
        let severity = match notice.severity {
            crate::notify::Severity::Critical => Severity::Crit,
            crate::notify::Severity::Error => Severity::Err,
            _ => Severity::Warn,
        };
        let new = NewIncident {
            service,
            severity,
            title: notice.summary.clone(),
            message: format!("{}\n\nThe run: {}", notice.description, notice.link),
            source: "reactor".into(),
            detected_at: Some(run.received_at),
            dedup_key: Some(notice.dedup_key.clone()),
            run: Some(run.id.to_string()),
            fingerprint: Some(run.alert.fingerprint.to_string()),
            approvers: None,
        };
        let now = self.clock.now();
        match incidents.create(new, now).await {
            Ok((incident, opened)) => {
                let what = if opened { "opened" } else { "updated" };
                tracing::info!(run_id = %run.id, incident = incident.number, what, "incident");
                // The run as stored now: the outboxes may be writing it too.
                self.store.update_run(run.id, |stored| {
                    if stored.incident != Some(incident.number) {
                        stored.incident = Some(incident.number);
                        stored.note(now, format!("incident {} {what}", incident.number));
                    }
                })?;
                let epoch = incident.escalation.as_ref().map_or(0, |e| e.epoch);
                Ok(Some((incident.number, epoch)))
            }
            Err(IncidentError::Store(e)) => Err(e),
            Err(e) => {
                tracing::error!(run_id = %run.id, error = %e, "could not open the run's incident");
                Ok(None)
            }
        }
    }

    /// The service a run of `playbook` opens incidents for: its `escalate.incident`, else
    /// `incidents.service`.
    fn incident_service_of(&self, playbook: Option<&Playbook>) -> Option<String> {
        playbook
            .and_then(|p| p.escalate.incident.as_ref())
            .map(|(s, _)| s.clone())
            .or_else(|| self.incident_service.clone())
    }

    /// The channels a failed run of `playbook` pages: its `escalate.to`, else `route.to`.
    fn route_of(&self, playbook: Option<&Playbook>) -> Vec<String> {
        playbook
            .and_then(|p| p.escalate.to.as_ref())
            .map(|(to, _)| to.clone())
            .unwrap_or_else(|| self.route.clone())
    }
}

/// The span of a run's log lines: which run, playbook and alert. Its fields are formatted once
/// per run, not on every line.
fn run_span(run: &Run) -> tracing::Span {
    tracing::info_span!(
        "run",
        run_id = %run.id,
        playbook = %run.playbook.as_deref().unwrap_or(""),
        alertname = run.alert.alertname(),
        fingerprint = %run.alert.fingerprint,
    )
}

fn new_run(
    seq: u64,
    index: usize,
    received_at: Timestamp,
    held: bool,
    alert: Alert,
    playbook: Option<&Arc<Playbook>>,
) -> Run {
    let id = RunId {
        seq,
        index: index as u16,
    };
    let name = playbook.map(|p| p.name.clone());
    let mut run = Run::new(id, alert, name, Outcome::Running, received_at);
    run.note(
        received_at,
        if held {
            "received (read from Alertmanager: held back from humans)"
        } else {
            "received"
        },
    );
    if let Some(p) = playbook {
        run.note(Timestamp::now(), format!("matched playbook {}", p.name));
    }
    run
}

/// A panic's message, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Takes accepted alerts off the queue and runs them, at most `max_concurrent` at a time, until
/// `shutdown` fires; then waits up to `grace` for runs in flight and records the rest as
/// interrupted. Alerts still queued stay in the intake and are processed at the next start.
pub async fn dispatch(
    engine: Arc<Engine>,
    mut queue: mpsc::Receiver<Intake>,
    max_concurrent: usize,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_concurrent.max(1)));
    loop {
        let intake = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = queue.recv() => match next {
                Some(i) => i,
                None => break,
            },
        };
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore is never closed"),
        };
        engine.health.backlog.started();
        let engine = Arc::clone(&engine);
        tracker.spawn(async move {
            engine.process(intake).await;
            drop(permit);
        });
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "shutdown grace elapsed; recording runs still in flight as interrupted"
        );
        engine.interrupt_in_flight().await;
    } else {
        tracing::info!("all in-flight runs finished");
    }
}
