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
use crate::domain::{Alert, AlertStatus, Fingerprint};
use crate::escalation::outbox::Outbox;
use crate::escalation::{Escalator, REMEDIATION_FAILED, REMEDIATION_LOOP};
use crate::executor::{Attempt, Executor, Started};
use crate::guard::{Admission, BreakerDecision, Guards, TargetDecision};
use crate::health::Health;
use crate::history::{
    DeliveryStatus, EscalationRecord, Intake, Outcome, Run, RunId, StepRecord, Store, StoreError,
};
use crate::metrics::{Metrics, StatusLabels};
use crate::playbook::{render_params, OnResolved, Playbook, Playbooks, TemplateContext};

/// A run in progress, for cancellation and for the shutdown drain.
struct InFlight {
    fingerprint: Fingerprint,
    playbook: String,
    cancel: CancellationToken,
    started: Instant,
    /// The longest the run's steps may take: timeouts, retries and retry delays.
    budget: Duration,
}

/// Everything a run needs, shared by all runs.
pub struct Engine {
    pub store: Store,
    pub playbooks: Arc<Playbooks>,
    pub executor: Executor,
    pub escalator: Escalator,
    pub outbox: Outbox,
    pub guards: Guards,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Base URL for links to runs in pages.
    pub external_url: String,
    per_playbook: HashMap<String, Arc<Semaphore>>,
    in_flight: Mutex<HashMap<RunId, InFlight>>,
    /// Runs waiting for their alert to resolve, and those whose resolution was seen.
    verifying: Mutex<HashMap<RunId, Fingerprint>>,
    resolved_seen: Mutex<HashSet<RunId>>,
    pub verify_wake: Notify,
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
        playbooks: Arc<Playbooks>,
        executor: Executor,
        escalator: Escalator,
        clock: Arc<dyn Clock>,
        external_url: String,
    ) -> Result<Engine, StoreError> {
        let per_playbook = playbooks
            .iter()
            .filter(|p| p.max_concurrent > 0)
            .map(|p| (p.name.clone(), Arc::new(Semaphore::new(p.max_concurrent))))
            .collect();
        let metrics = Arc::new(Metrics::default());
        Ok(Engine {
            health: Arc::new(Health::new(&metrics)),
            metrics,
            outbox: Outbox::open(&store)?,
            guards: Guards::open(&store)?,
            store,
            playbooks,
            executor,
            escalator,
            clock,
            external_url,
            per_playbook,
            in_flight: Mutex::new(HashMap::new()),
            verifying: Mutex::new(HashMap::new()),
            resolved_seen: Mutex::new(HashSet::new()),
            verify_wake: Notify::new(),
        })
    }

    pub fn run_url(&self, id: RunId) -> String {
        format!("{}/api/v1/runs/{id}", self.external_url)
    }

    /// Handles one accepted alert from intake to recorded outcome. A panic while doing so fails
    /// the alert's runs (and pages), instead of leaving the alert in the intake to panic again at
    /// every start.
    pub async fn process(self: &Arc<Self>, intake: Intake) {
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

    /// Records the runs of the alert accepted as `seq` as failed after processing it panicked,
    /// and pages: written as they are found, whether the panic came before or after they were
    /// first recorded.
    async fn fail_after_panic(&self, seq: u64, panic: &str) {
        tracing::error!(seq, %panic, "processing an alert panicked; failing its runs");
        let reason = format!("reactor failed while processing this alert (a bug: {panic})");
        let stopped = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let before = in_flight.len();
            in_flight.retain(|id, _| id.seq != seq);
            before - in_flight.len()
        };
        for _ in 0..stopped {
            self.metrics.in_flight.dec();
        }
        let result = async {
            let now = self.clock.now();
            let mut failed = Vec::new();
            if let Some(intake) = self.store.get_intake(seq)? {
                if !self.store.intake_recorded(seq)? {
                    let mut run =
                        new_run(seq, 0, intake.received_at, intake.held, intake.alert, None);
                    settle(&mut run, Outcome::Failed, &reason, now);
                    failed.push(run);
                }
            }
            for run in self.store.runs_of(seq)? {
                if matches!(run.outcome, Outcome::Running) {
                    let mut run = run;
                    settle(&mut run, Outcome::Failed, &reason, now);
                    failed.push(run);
                }
            }
            self.store.put_runs(&failed)?;
            self.store.remove_intake(seq)?;
            for run in failed {
                self.metrics
                    .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
                let playbook = run
                    .playbook
                    .as_deref()
                    .and_then(|n| self.playbooks.get(n))
                    .cloned();
                self.escalate(REMEDIATION_FAILED, run, playbook.as_deref())
                    .await?;
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = result.await {
            self.metrics.store_errors.inc();
            tracing::error!(seq, error = %e, "could not record the runs of an alert whose processing panicked");
        }
    }

    async fn process_inner(self: &Arc<Self>, intake: Intake) -> Result<(), StoreError> {
        let matched = self.playbooks.matching(&intake.alert);
        let now = self.clock.now();
        let Intake {
            seq,
            received_at,
            alert,
            held,
        } = intake;
        let status = alert.status;
        let resolved = (status == AlertStatus::Resolved).then(|| alert.fingerprint.clone());
        let new_run =
            |index, alert, playbook| new_run(seq, index, received_at, held, alert, playbook);
        // Runs settled here (skipped, deduplicated, ...) and runs admitted to execute.
        let mut records = Vec::new();
        let mut runnable = Vec::new();
        let mut pages = Vec::new();
        if matched.is_empty() {
            let mut run = new_run(0, alert, None);
            if held && status == AlertStatus::Firing {
                // Alertmanager holds this alert back from humans because reactor is alive, yet
                // nothing here can fix it: page, or nobody hears of it.
                settle(&mut run, Outcome::Failed, "no playbook matches this alert, which Alertmanager holds back from humans while reactor is alive", now);
                pages.push(Page {
                    alertname: REMEDIATION_FAILED,
                    run: run.clone(),
                    playbook: None,
                });
            } else {
                settle(
                    &mut run,
                    Outcome::Skipped,
                    "no playbook matches this alert",
                    now,
                );
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

    /// Decides whether `run` may remediate, as [`Engine::guarded`] does; a corrupt guard record
    /// refuses the run (skipped, counted, paged) instead of resetting the target's guards.
    fn admit(
        &self,
        run: &mut Run,
        playbook: &Arc<Playbook>,
        now: Timestamp,
        pages: &mut Vec<Page>,
    ) -> Result<bool, StoreError> {
        match self.guarded(run, playbook, now, pages) {
            Err(StoreError::Corrupt { key, source }) => {
                self.metrics.store_errors.inc();
                self.metrics.guard_tripped(&playbook.name, "corrupt_record");
                tracing::error!(run_id = %run.id, %key, error = %source, "a guard record is corrupt; refusing to remediate");
                let reason = format!("guard record {key} is corrupt ({source}); not remediating until it is repaired or removed");
                settle(run, Outcome::Skipped, &reason, now);
                pages.push(Page {
                    alertname: REMEDIATION_FAILED,
                    run: run.clone(),
                    playbook: Some(Arc::clone(playbook)),
                });
                Ok(false)
            }
            other => other,
        }
    }

    /// Decides whether `run` may remediate. When not, settles it with the reason (and may queue a
    /// page); when it may, the guards have recorded the attempt.
    fn guarded(
        &self,
        run: &mut Run,
        playbook: &Arc<Playbook>,
        now: Timestamp,
        pages: &mut Vec<Page>,
    ) -> Result<bool, StoreError> {
        let alert = &run.alert;
        if !playbook.triggers_on(alert.status) {
            let mut reason = format!("playbook does not run on {} alerts", alert.status);
            if alert.status == AlertStatus::Resolved && playbook.on_resolved == OnResolved::Cancel {
                let cancelled = self.cancel_in_flight(&alert.fingerprint, &playbook.name);
                if !cancelled.is_empty() {
                    let ids: Vec<String> = cancelled.iter().map(RunId::to_string).collect();
                    reason = format!("alert resolved: cancelled run {}", ids.join(", "));
                }
            }
            settle(run, Outcome::Skipped, &reason, now);
            return Ok(false);
        }
        let policy = &playbook.guards;
        let decision = match self
            .guards
            .admit(alert, &playbook.name, run.id, now, policy)?
        {
            Admission::RepeatOf(owner) => {
                settle(
                    run,
                    Outcome::Deduplicated,
                    &format!("repeat delivery of run {owner}"),
                    now,
                );
                tracing::debug!(run_id = %run.id, %owner, "repeat delivery deduplicated");
                return Ok(false);
            }
            Admission::Target(decision) => decision,
        };
        match decision {
            TargetDecision::Run => {}
            TargetDecision::Cooldown { until } => {
                settle(run, Outcome::Skipped, &format!("cooldown: this target was remediated recently; next run allowed at {until}"), now);
                self.metrics.guard_tripped(&playbook.name, "cooldown");
                return Ok(false);
            }
            TargetDecision::LoopGuard {
                escalate,
                attempts,
                until,
            } => {
                let reason = format!(
                    "loop guard: {attempts} runs for this target within {}; no more until {until}",
                    humantime::format_duration(policy.window)
                );
                settle(run, Outcome::Skipped, &reason, now);
                self.metrics.guard_tripped(&playbook.name, "loop");
                if escalate {
                    tracing::warn!(run_id = %run.id, playbook = %playbook.name, "remediation loop detected; escalating once");
                    pages.push(Page {
                        alertname: REMEDIATION_LOOP,
                        run: run.clone(),
                        playbook: Some(Arc::clone(playbook)),
                    });
                }
                return Ok(false);
            }
        }
        if let Some(bp) = &policy.breaker {
            if let BreakerDecision::Open { since } =
                self.guards.admit_breaker(&playbook.name, now, bp)?
            {
                let reason = format!("circuit breaker open since {since}: too many recent failures of this playbook; not remediating");
                settle(run, Outcome::Skipped, &reason, now);
                self.metrics
                    .guard_tripped(&playbook.name, "circuit_breaker");
                pages.push(Page {
                    alertname: REMEDIATION_FAILED,
                    run: run.clone(),
                    playbook: Some(Arc::clone(playbook)),
                });
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs in flight longer than their time budget plus `grace`, with how far past they are.
    pub fn stuck_runs(&self, grace: Duration) -> Vec<(RunId, Duration)> {
        let in_flight = self.in_flight.lock().unwrap();
        in_flight
            .iter()
            .filter_map(|(id, f)| {
                let over = f
                    .started
                    .elapsed()
                    .checked_sub(f.budget.saturating_add(grace))?;
                Some((*id, over))
            })
            .collect()
    }

    fn cancel_in_flight(&self, fingerprint: &Fingerprint, playbook: &str) -> Vec<RunId> {
        let in_flight = self.in_flight.lock().unwrap();
        in_flight
            .iter()
            .filter(|(_, f)| &f.fingerprint == fingerprint && f.playbook == playbook)
            .map(|(id, f)| {
                f.cancel.cancel();
                *id
            })
            .collect()
    }

    /// Runs an admitted run under the playbook's concurrency limit, then reports to the breaker
    /// and escalates a failure. `unrecorded`: the run is not stored yet and this intake entry is
    /// removed once it is.
    async fn execute(
        &self,
        run: Run,
        playbook: Arc<Playbook>,
        unrecorded: Option<u64>,
    ) -> Result<(), StoreError> {
        let span = run_span(&run);
        async {
            let _permit = match self.per_playbook.get(&playbook.name) {
                Some(s) => Some(Arc::clone(s).acquire_owned().await.expect("never closed")),
                None => None,
            };
            let cancel = CancellationToken::new();
            self.in_flight.lock().unwrap().insert(
                run.id,
                InFlight {
                    fingerprint: run.alert.fingerprint.clone(),
                    playbook: playbook.name.clone(),
                    cancel: cancel.clone(),
                    started: Instant::now(),
                    budget: playbook.time_budget(),
                },
            );
            self.metrics.in_flight.inc();
            let mut run = run;
            if run.started_at.is_none() {
                run.started_at = Some(self.clock.now());
            }
            if playbook.silence {
                self.create_silence(&mut run, &playbook).await?;
            }
            let id = run.id;
            let result = self.run_steps(run, &playbook, cancel, unrecorded).await;
            self.in_flight.lock().unwrap().remove(&id);
            self.metrics.in_flight.dec();
            let run = result?;
            self.settled(run, &playbook).await
        }
        .instrument(span)
        .await
    }

    /// After a run reached its outcome: reports to the breaker, escalates a failure, and resolves
    /// earlier pages for the same alert when it succeeded.
    async fn settled(&self, mut run: Run, playbook: &Playbook) -> Result<(), StoreError> {
        if !matches!(run.outcome, Outcome::Succeeded | Outcome::Verifying) {
            // Expire before paging, so the humans see the original alert too.
            self.expire_silence(&mut run).await?;
        }
        if let Some(bp) = &playbook.guards.breaker {
            if matches!(run.outcome, Outcome::Succeeded | Outcome::Failed) {
                self.guards.record_breaker(
                    &playbook.name,
                    run.outcome == Outcome::Failed,
                    self.clock.now(),
                    bp,
                )?;
            }
        }
        match run.outcome {
            Outcome::Failed => {
                tracing::warn!(reason = run.reason.as_deref(), "run failed; escalating");
                self.escalate(REMEDIATION_FAILED, run, Some(playbook))
                    .await?;
            }
            Outcome::Succeeded => {
                self.resolve_pages(&run.alert.fingerprint, "a later run fixed it")
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Silences the run's alert for the run plus its verify window (`silence: true`). A failure
    /// to silence is noted and the run goes on: the humans may see the alert early, no worse.
    async fn create_silence(&self, run: &mut Run, playbook: &Playbook) -> Result<(), StoreError> {
        if !self.escalator.configured() {
            return Ok(());
        }
        let now = self.clock.now();
        let span = playbook
            .time_budget()
            .saturating_add(playbook.verify.unwrap_or_default())
            .saturating_add(Duration::from_secs(60));
        let ends = crate::clock::later(now, span);
        let comment = format!(
            "reactor run {} ({}) is remediating this alert: {}",
            run.id,
            playbook.name,
            self.run_url(run.id)
        );
        let silence =
            crate::alertmanager::PostableSilence::for_labels(&run.alert.labels, now, ends, comment);
        match self.escalator.api().create_silence(&silence).await {
            Ok(id) => {
                run.note(now, format!("silence {id} created until {ends}"));
                run.silence = Some(crate::history::SilenceRecord {
                    id,
                    created_at: now,
                    ends_at: ends,
                    expired_at: None,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not silence the alert while fixing it");
                run.note(now, format!("silence not created: {e}"));
            }
        }
        self.store.put_run(run)
    }

    /// Expires the run's silence, if it holds one that has not been expired.
    async fn expire_silence(&self, run: &mut Run) -> Result<(), StoreError> {
        let Some(silence) = run.silence.as_mut().filter(|s| s.expired_at.is_none()) else {
            return Ok(());
        };
        let now = self.clock.now();
        match self.escalator.api().expire_silence(&silence.id).await {
            Ok(()) => {
                silence.expired_at = Some(now);
                let id = silence.id.clone();
                run.note(now, format!("silence {id} expired"));
            }
            Err(e) => {
                tracing::warn!(run_id = %run.id, error = %e, "could not expire the run's silence; it ends by itself");
                run.note(now, format!("silence not expired: {e}"));
            }
        }
        self.store.put_run(run)
    }

    /// Resolves every open page for `fingerprint` and notes it on the pages' runs.
    async fn resolve_pages(&self, fingerprint: &Fingerprint, why: &str) -> Result<(), StoreError> {
        let now = self.clock.now();
        for id in self.outbox.resolve_for(fingerprint, now).await? {
            tracing::info!(run_id = %id, why, "resolving the page");
            if let Some(mut run) = self.store.get_run(id)? {
                run.note(now, format!("escalation resolving: {why}"));
                self.store.put_run(&run)?;
            }
        }
        Ok(())
    }

    /// A resolved alert arrived (webhook or held-alert poll): verifications waiting for it
    /// succeed, and pages raised for it resolve.
    async fn alert_resolved(&self, fingerprint: &Fingerprint) -> Result<(), StoreError> {
        let waiting: Vec<RunId> = self
            .verifying
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, fp)| *fp == fingerprint)
            .map(|(id, _)| *id)
            .collect();
        if !waiting.is_empty() {
            self.resolved_seen.lock().unwrap().extend(waiting);
            self.verify_wake.notify_one();
        }
        self.resolve_pages(fingerprint, "the alert resolved").await
    }

    /// Ends verifications: resolved alerts succeed (verified), expired deadlines fail and page.
    /// Returns when the next deadline is due.
    pub async fn verify_pass(&self) -> Result<(), StoreError> {
        let waiting: Vec<RunId> = self.verifying.lock().unwrap().keys().copied().collect();
        let configured = self.escalator.configured();
        for id in waiting {
            let Some(mut run) = self.store.get_run(id)? else {
                self.verifying.lock().unwrap().remove(&id);
                continue;
            };
            if run.outcome != Outcome::Verifying {
                self.verifying.lock().unwrap().remove(&id);
                continue;
            }
            let seen = self.resolved_seen.lock().unwrap().remove(&id);
            let now = self.clock.now();
            let expired = run.verify_deadline.is_none_or(|d| now >= d);
            // Confirm with Alertmanager: a firing alert is listed, a resolved one is not.
            let mut source = seen.then_some("resolved notification");
            if source.is_none() && configured {
                match self.still_firing(&run).await {
                    Ok(false) => source = Some("Alertmanager no longer lists it"),
                    Ok(true) => {}
                    Err(e) => {
                        tracing::warn!(run_id = %id, error = %e, "could not ask Alertmanager whether the alert resolved")
                    }
                }
            }
            let playbook = run
                .playbook
                .as_deref()
                .and_then(|n| self.playbooks.get(n))
                .cloned();
            if let Some(source) = source {
                run.note(now, format!("resolved seen ({source})"));
                run.outcome = Outcome::Succeeded;
                run.verified_at = Some(now);
                run.finished_at = Some(now);
                run.reason = Some("verified: the alert resolved after remediation".into());
                run.note(now, "succeeded (verified)");
            } else if expired {
                settle(
                    &mut run,
                    Outcome::Failed,
                    "not resolved after remediation",
                    now,
                );
            } else {
                continue;
            }
            self.verifying.lock().unwrap().remove(&id);
            self.store.put_run(&run)?;
            self.metrics
                .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
            let span = run_span(&run);
            async {
                tracing::info!(outcome = %run.outcome, "verification ended");
                match playbook {
                    Some(p) => self.settled(run, &p).await,
                    None if run.outcome == Outcome::Failed => {
                        self.escalate(REMEDIATION_FAILED, run, None).await
                    }
                    None => Ok(()),
                }
            }
            .instrument(span)
            .await?;
        }
        Ok(())
    }

    /// Whether Alertmanager still lists the run's alert as active.
    async fn still_firing(&self, run: &Run) -> Result<bool, crate::alertmanager::ApiError> {
        let filter = vec![format!("alertname={:?}", run.alert.alertname())];
        let alerts = self.escalator.api().alerts(&filter).await?;
        Ok(alerts
            .iter()
            .any(|a| a.fingerprint == run.alert.fingerprint.as_str()))
    }

    /// The steps in order; the first step that exhausts its retries fails the run.
    async fn run_steps(
        &self,
        mut run: Run,
        playbook: &Playbook,
        cancel: CancellationToken,
        mut unrecorded: Option<u64>,
    ) -> Result<Run, StoreError> {
        // One info line per run, when it ends (below); at thousands of alerts per second a second
        // line per run costs a measurable share of the CPU. The alert's identity is on the span.
        tracing::debug!("run started");
        let run_id = run.id.to_string();
        let run_url = self.run_url(run.id);
        let mut failure = None;
        'steps: for (index, step) in playbook.steps.iter().enumerate() {
            let last_step = index + 1 == playbook.steps.len();
            let params = {
                let mut ctx = TemplateContext::new(&run.alert, &playbook.name);
                ctx.run_id = &run_id;
                ctx.run_url = &run_url;
                ctx.step = &step.name;
                render_params(step, &ctx)
            };
            for attempt in 1..=step.retries + 1 {
                if cancel.is_cancelled() {
                    break 'steps;
                }
                let started_at = self.clock.now();
                run.note(
                    started_at,
                    format!("step {} attempt {attempt} started", step.name),
                );
                let clock = Instant::now();
                let result = match self.executor.start(Attempt {
                    action: &step.action,
                    alert: &run.alert,
                    params: params.clone(),
                    timeout: step.timeout,
                    dry_run: step.dry_run,
                    cancel: Some(cancel.clone()),
                }) {
                    Started::Done(r) => r,
                    Started::Pending(attempt) => {
                        // This attempt may act: the run must be on record, on disk, first.
                        self.record(&run, &mut unrecorded)?;
                        self.store.history_durable().await?;
                        attempt.await
                    }
                };
                let (output, error) = match result.result {
                    Ok(v) => (Some(v), None),
                    Err(e) => (None, Some(e)),
                };
                let succeeded = error.is_none();
                self.metrics
                    .step_finished(&playbook.name, clock.elapsed().as_secs_f64());
                if let Some(e) = &error {
                    tracing::warn!(step = %step.name, attempt, error = %e, "step attempt failed");
                }
                run.note(
                    self.clock.now(),
                    format!(
                        "step {} attempt {attempt} {}",
                        step.name,
                        if succeeded { "succeeded" } else { "failed" }
                    ),
                );
                run.steps.push(StepRecord {
                    name: step.name.clone(),
                    attempt,
                    succeeded,
                    started_at,
                    duration_ms: clock.elapsed().as_millis() as u64,
                    output,
                    error: error.clone(),
                    logs: result.logs,
                    changes: result.changes,
                });
                // Record progress when more follows; when this attempt ends the run, the settled
                // record below is its only write.
                let ends_run = if succeeded {
                    last_step
                } else {
                    attempt > step.retries || cancel.is_cancelled()
                };
                if !ends_run {
                    self.record(&run, &mut unrecorded)?;
                }
                if succeeded {
                    continue 'steps;
                }
                if attempt <= step.retries && !cancel.is_cancelled() {
                    tokio::select! {
                        _ = tokio::time::sleep(step.retry_delay) => {},
                        _ = cancel.cancelled() => {},
                    }
                } else {
                    failure = Some(format!(
                        "step {:?} failed after {attempt} attempt(s): {}",
                        step.name,
                        error.unwrap_or_default()
                    ));
                    break 'steps;
                }
            }
        }
        let now = self.clock.now();
        if cancel.is_cancelled() {
            settle(
                &mut run,
                Outcome::Cancelled,
                "alert resolved while the run was in progress (on_resolved: cancel)",
                now,
            );
            tracing::info!("run cancelled: its alert resolved");
        } else if let Some(reason) = failure {
            settle(&mut run, Outcome::Failed, &reason, now);
        } else if let Some(within) = playbook.verify {
            let deadline = crate::clock::later(now, within);
            run.outcome = Outcome::Verifying;
            run.verify_deadline = Some(deadline);
            run.note(
                now,
                format!(
                    "verify started: waiting up to {} for the alert to resolve",
                    humantime::format_duration(within)
                ),
            );
            tracing::info!(%deadline, "steps succeeded; verifying that the alert resolves");
        } else {
            run.outcome = Outcome::Succeeded;
            run.finished_at = Some(now);
            run.note(now, "succeeded");
            tracing::info!("run succeeded");
        }
        self.record(&run, &mut unrecorded)?;
        if run.outcome == Outcome::Verifying {
            self.verifying
                .lock()
                .unwrap()
                .insert(run.id, run.alert.fingerprint.clone());
            self.verify_wake.notify_one();
            return Ok(run);
        }
        self.metrics
            .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
        Ok(run)
    }

    /// Writes `run`; the first time for a deferred run, also takes its alert off the intake.
    fn record(&self, run: &Run, unrecorded: &mut Option<u64>) -> Result<(), StoreError> {
        self.store.put_run(run)?;
        if let Some(seq) = unrecorded.take() {
            self.store.remove_intake(seq)?;
        }
        Ok(())
    }

    /// Records that `run` pages the humans and hands the page to the durable outbox.
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
        let status = if self.escalator.configured() {
            DeliveryStatus::Pending
        } else {
            tracing::error!(run_id = %run.id, %alertname, "no Alertmanager URL is configured: nobody was paged");
            DeliveryStatus::NotConfigured
        };
        if run.escalation.is_none() {
            run.escalation = Some(EscalationRecord {
                alertname: alertname.to_owned(),
                status,
                attempts: 0,
                at: now,
                last_error: None,
                resolved_at: None,
            });
            run.note(now, format!("escalation {alertname} queued"));
            self.store.put_run(&run)?;
        }
        let fingerprint = run.alert.fingerprint.clone();
        if status == DeliveryStatus::Pending
            && !self.outbox.enqueue(run.id, page, fingerprint, now).await?
        {
            // Re-processed after a crash: this run's page was already queued, maybe delivered.
            self.outbox.sync_run(run.id, now)?;
        }
        Ok(())
    }

    /// Start-up recovery. Runs caught in progress are re-run (idempotent playbooks, and runs that
    /// never started, returned as the second list) or recorded `interrupted` and escalated;
    /// accepted alerts without runs are returned for processing.
    pub async fn recover(
        self: &Arc<Self>,
    ) -> Result<(Vec<Intake>, Vec<(Run, Arc<Playbook>)>), StoreError> {
        let now = self.clock.now();
        // First the intake, so that a partial set of an alert's runs (a crash while they were
        // written) is removed before the unfinished runs are looked at: those never started.
        let mut pending = Vec::new();
        for intake in self.store.pending_intake()? {
            if self.store.intake_recorded(intake.seq)? {
                self.store.remove_intake(intake.seq)?;
            } else {
                pending.push(intake);
            }
        }
        let mut rerun = Vec::new();
        for mut run in self.store.unfinished_runs()? {
            if run.outcome == Outcome::Verifying {
                tracing::info!(run_id = %run.id, "resuming the verification of a run");
                self.verifying
                    .lock()
                    .unwrap()
                    .insert(run.id, run.alert.fingerprint.clone());
                continue;
            }
            let playbook = run
                .playbook
                .as_deref()
                .and_then(|n| self.playbooks.get(n))
                .cloned();
            if run.outcome != Outcome::Running {
                // The page was recorded as pending but the process died before it reached the
                // outbox: queue it now (the outbox refuses a second page for the same run).
                if self.outbox.get(run.id)?.is_none() {
                    let looping = run
                        .escalation
                        .as_ref()
                        .is_some_and(|e| e.alertname == REMEDIATION_LOOP);
                    let alertname = if looping {
                        REMEDIATION_LOOP
                    } else {
                        REMEDIATION_FAILED
                    };
                    tracing::warn!(run_id = %run.id, "queueing a page that a crash kept from the outbox");
                    let page = self.escalator.page_for(
                        alertname,
                        &run,
                        playbook.as_deref(),
                        &self.run_url(run.id),
                        now,
                    );
                    self.outbox
                        .enqueue(run.id, page, run.alert.fingerprint.clone(), now)
                        .await?;
                } else {
                    self.outbox.sync_run(run.id, now)?;
                }
                continue;
            }
            match playbook {
                Some(p) if run.started_at.is_none() => {
                    // Admitted beside another run of the same alert, and a crash came before its
                    // turn: it never acted, so it simply runs now.
                    tracing::info!(run_id = %run.id, "running a run that a restart kept from starting");
                    rerun.push((run, p));
                }
                Some(p) if p.idempotent => {
                    tracing::info!(run_id = %run.id, "re-running a run interrupted by a restart (playbook is idempotent)");
                    run.reason = Some(
                        "re-run after a restart interrupted it (playbook is idempotent)".into(),
                    );
                    self.store.put_run(&run)?;
                    rerun.push((run, p));
                }
                _ => {
                    settle(
                        &mut run,
                        Outcome::Interrupted,
                        "reactor stopped while this run was in progress; not re-run because the playbook does not declare idempotent: true",
                        now,
                    );
                    self.store.put_run(&run)?;
                    self.expire_silence(&mut run).await?;
                    self.metrics
                        .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
                    tracing::warn!(run_id = %run.id, "run was interrupted by a restart; escalating");
                    self.escalate(REMEDIATION_FAILED, run, playbook.as_deref())
                        .await?;
                }
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                count = pending.len(),
                "processing alerts accepted before the last stop"
            );
        }
        Ok((pending, rerun))
    }

    /// Runs a recovered run: one of an idempotent playbook caught in progress, or one admitted
    /// that never started.
    pub async fn resume(self: &Arc<Self>, run: Run, playbook: Arc<Playbook>) {
        let id = run.id;
        match AssertUnwindSafe(self.execute(run, playbook, None))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(run_id = %id, error = %e, "could not record a resumed run")
            }
            Err(panic) => self.fail_after_panic(id.seq, &panic_message(&*panic)).await,
        }
    }

    /// At shutdown, after the grace period: records runs still in flight as interrupted and
    /// queues their pages (delivered by the outbox at the next start).
    async fn interrupt_in_flight(&self) {
        let ids: Vec<RunId> = self.in_flight.lock().unwrap().keys().copied().collect();
        for id in ids {
            let result = async {
                if let Some(mut run) = self.store.get_run(id)? {
                    let playbook = run
                        .playbook
                        .as_deref()
                        .and_then(|n| self.playbooks.get(n))
                        .cloned();
                    if playbook.as_ref().is_some_and(|p| p.idempotent) {
                        return Ok(()); // left `running`: re-run at the next start
                    }
                    settle(
                        &mut run,
                        Outcome::Interrupted,
                        "shutdown grace elapsed while this run was in progress",
                        self.clock.now(),
                    );
                    self.store.put_run(&run)?;
                    self.expire_silence(&mut run).await?;
                    self.escalate(REMEDIATION_FAILED, run, playbook.as_deref())
                        .await?;
                }
                Ok::<_, StoreError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::error!(run_id = %id, error = %e, "could not record an interrupted run");
            }
        }
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

fn settle(run: &mut Run, outcome: Outcome, reason: &str, now: Timestamp) {
    run.outcome = outcome;
    run.reason = Some(reason.to_owned());
    run.finished_at = Some(now);
    run.note(now, format!("{outcome}: {reason}"));
}

/// Ends verifications as their alerts resolve or their deadlines pass, until `shutdown`.
pub async fn verify_loop(engine: Arc<Engine>, poll: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = engine.verify_pass().await {
            engine.metrics.store_errors.inc();
            tracing::error!(error = %e, "could not record a verification");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = engine.verify_wake.notified() => {},
            _ = tokio::time::sleep(poll) => {},
        }
    }
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
