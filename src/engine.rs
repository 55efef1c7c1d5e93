//! The engine turns accepted alerts into runs: it matches each alert against the playbooks, records
//! one run per matching playbook (or one `skipped` run when none applies), executes the steps with
//! their retries, records every attempt, and escalates a failed run. It also owns crash recovery
//! at start-up and the drain at shutdown.
//!
//! Crash semantics (SIGKILL): an accepted alert is in the intake until its runs are recorded, so
//! after a restart it is processed normally. A run that was in progress is *not* re-run (its steps
//! may not be idempotent); it is recorded as `interrupted` and escalated, so a human looks at it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::escalation::Escalator;
use crate::executor::{Attempt, Executor};
use crate::history::{Intake, Outcome, Run, RunId, StepRecord, Store, StoreError};
use crate::playbook::{render_params, Playbook, Playbooks, TemplateContext};

/// Everything a run needs, shared by all runs.
pub struct Engine {
    pub store: Store,
    pub playbooks: Arc<Playbooks>,
    pub executor: Executor,
    pub escalator: Escalator,
    /// Base URL for links to runs in pages.
    pub external_url: String,
}

/// The sending side of the work queue, held by the webhook handler.
pub type Queue = mpsc::Sender<Intake>;

impl Engine {
    pub fn run_url(&self, id: RunId) -> String {
        format!("{}/api/v1/runs/{id}", self.external_url)
    }

    /// Handles one accepted alert from intake to recorded outcome.
    pub async fn process(self: &Arc<Self>, intake: Intake) {
        let seq = intake.seq;
        if let Err(e) = self.process_inner(intake).await {
            tracing::error!(seq, error = %e, "could not record a run; the alert stays in the intake for the next start");
        }
    }

    async fn process_inner(self: &Arc<Self>, intake: Intake) -> Result<(), StoreError> {
        let matched = self.playbooks.matching(&intake.alert);
        let now = Timestamp::now();
        let new_run = |index: usize, playbook: Option<&Playbook>| Run {
            id: RunId {
                seq: intake.seq,
                index: index as u16,
            },
            alert: intake.alert.clone(),
            playbook: playbook.map(|p| p.name.clone()),
            outcome: Outcome::Running,
            reason: None,
            received_at: intake.received_at,
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
            escalation: None,
        };
        if matched.is_empty() {
            let mut run = new_run(0, None);
            run.outcome = Outcome::Skipped;
            run.reason = Some("no playbook matches this alert".into());
            run.finished_at = Some(now);
            self.store.put_run(&run)?;
            self.store.remove_intake(intake.seq)?;
            return Ok(());
        }
        let mut runnable = Vec::new();
        for (i, playbook) in matched.iter().enumerate().take(u16::MAX as usize) {
            let mut run = new_run(i, Some(playbook));
            if !playbook.triggers_on(intake.alert.status) {
                run.outcome = Outcome::Skipped;
                run.reason = Some(format!(
                    "playbook does not run on {} alerts",
                    intake.alert.status
                ));
                run.finished_at = Some(now);
            } else {
                run.started_at = Some(now);
                runnable.push((run.clone(), Arc::clone(playbook)));
            }
            self.store.put_run(&run)?;
        }
        self.store.remove_intake(intake.seq)?;
        for (run, playbook) in runnable {
            let span = tracing::info_span!("run", run_id = %run.id, playbook = %playbook.name);
            self.execute(run, &playbook).instrument(span).await?;
        }
        Ok(())
    }

    /// Runs the playbook's steps in order; the first step that exhausts its retries fails the run.
    async fn execute(&self, mut run: Run, playbook: &Playbook) -> Result<(), StoreError> {
        tracing::info!(alertname = run.alert.alertname(), fingerprint = %run.alert.fingerprint, "run started");
        let run_id = run.id.to_string();
        let run_url = self.run_url(run.id);
        let mut failure = None;
        'steps: for step in &playbook.steps {
            let params = {
                let mut ctx = TemplateContext::new(&run.alert, &playbook.name);
                ctx.run_id = &run_id;
                ctx.run_url = &run_url;
                ctx.step = &step.name;
                render_params(step, &ctx)
            };
            for attempt in 1..=step.retries + 1 {
                let started_at = Timestamp::now();
                let clock = Instant::now();
                let result = self
                    .executor
                    .run(Attempt {
                        action: &step.action,
                        alert: &run.alert,
                        params: params.clone(),
                        timeout: step.timeout,
                        dry_run: step.dry_run,
                    })
                    .await;
                let (output, error) = match result.result {
                    Ok(v) => (Some(v), None),
                    Err(e) => (None, Some(e)),
                };
                let succeeded = error.is_none();
                if let Some(e) = &error {
                    tracing::warn!(step = %step.name, attempt, error = %e, "step attempt failed");
                }
                run.steps.push(StepRecord {
                    name: step.name.clone(),
                    attempt,
                    succeeded,
                    started_at,
                    duration_ms: clock.elapsed().as_millis() as u64,
                    output,
                    error: error.clone(),
                    logs: result.logs,
                });
                self.store.put_run(&run)?;
                if succeeded {
                    continue 'steps;
                }
                if attempt <= step.retries {
                    tokio::time::sleep(step.retry_delay).await;
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
        run.finished_at = Some(Timestamp::now());
        match failure {
            None => {
                run.outcome = Outcome::Succeeded;
                self.store.put_run(&run)?;
                tracing::info!("run succeeded");
            }
            Some(reason) => {
                run.outcome = Outcome::Failed;
                run.reason = Some(reason);
                self.store.put_run(&run)?;
                tracing::warn!(reason = run.reason.as_deref(), "run failed; escalating");
                self.escalate(run, Some(playbook)).await?;
            }
        }
        Ok(())
    }

    /// Pages the humans for a failed or interrupted run and records the delivery on it.
    async fn escalate(&self, mut run: Run, playbook: Option<&Playbook>) -> Result<(), StoreError> {
        let page = self
            .escalator
            .page_for(&run, playbook, &self.run_url(run.id), Timestamp::now());
        run.escalation = Some(self.escalator.deliver(&page).await);
        self.store.put_run(&run)
    }

    /// Start-up recovery: runs caught in progress become `interrupted` and are escalated; accepted
    /// alerts without runs are returned for processing.
    pub fn recover(self: &Arc<Self>, tracker: &TaskTracker) -> Result<Vec<Intake>, StoreError> {
        for mut run in self.store.running_runs()? {
            run.outcome = Outcome::Interrupted;
            run.reason = Some(
                "reactor stopped while this run was in progress; it was not re-run because its steps may not be idempotent"
                    .into(),
            );
            run.finished_at = Some(Timestamp::now());
            self.store.put_run(&run)?;
            tracing::warn!(run_id = %run.id, "run was interrupted by a restart; escalating");
            let engine = Arc::clone(self);
            tracker.spawn(async move {
                let playbook = run.playbook.as_deref().and_then(|n| engine.playbooks.get(n)).cloned();
                if let Err(e) = engine.escalate(run, playbook.as_deref()).await {
                    tracing::error!(error = %e, "could not record the escalation of an interrupted run");
                }
            });
        }
        let mut pending = Vec::new();
        for intake in self.store.pending_intake()? {
            if self.store.runs_for_seq(intake.seq)?.is_empty() {
                pending.push(intake);
            } else {
                self.store.remove_intake(intake.seq)?;
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                count = pending.len(),
                "processing alerts accepted before the last stop"
            );
        }
        Ok(pending)
    }
}

/// Takes accepted alerts off the queue and runs them, at most `max_concurrent` at a time, until
/// `shutdown` fires; then waits up to `grace` for runs in flight. What is left stays recorded in
/// sled (intake or `running`) and is recovered at the next start.
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
            "shutdown grace elapsed; runs still in flight will be recorded as interrupted at the next start"
        );
    } else {
        tracing::info!("all in-flight runs finished");
    }
}
