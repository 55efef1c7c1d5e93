//! Running an admitted run: the playbook's steps in order with their retries, each attempt
//! recorded (on disk before an attempt that may act), then the outcome, the breaker's record, and
//! the page for a failure or the resolution of earlier pages for a success.

use super::*;

impl Engine {
    /// Runs an admitted run under the playbook's concurrency limit, then reports to the breaker
    /// and escalates a failure. `unrecorded`: the run is not stored yet and this intake entry is
    /// removed once it is.
    pub(super) async fn execute(
        &self,
        run: Run,
        playbook: Arc<Playbook>,
        unrecorded: Option<u64>,
    ) -> Result<(), StoreError> {
        let span = run_span(&run);
        async {
            let _permit = match self.concurrency_limit(&playbook) {
                Some(s) => Some(s.acquire_owned().await.expect("never closed")),
                None => None,
            };
            let cancel = CancellationToken::new();
            self.in_flight.insert(
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
            let id = run.id;
            let result = match self.cluster_lock(&mut run, &playbook, &cancel).await {
                Ok(lock) => {
                    // A shadow run leaves Alertmanager as it is: the humans see the alert.
                    if playbook.silence && !self.shadow(&playbook) {
                        self.create_silence(&mut run, &playbook).await?;
                    }
                    self.run_locked(run, &playbook, cancel, unrecorded, lock)
                        .await
                }
                // Another replica acted on the target, or the lock could not be taken: settled.
                Err(()) => {
                    let mut unrecorded = unrecorded;
                    self.record(&run, &mut unrecorded).map(|()| {
                        self.metrics
                            .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
                        run
                    })
                }
            };
            let run = match result {
                // The wait left the in-flight registry (and its silence) before it began: an
                // answer may already have resumed the run, which is no longer this task's.
                Ok(run) if run.outcome == Outcome::AwaitingApproval => return Ok(()),
                other => other,
            };
            self.in_flight.remove(id);
            self.metrics.in_flight.dec();
            let run = run?;
            self.settled(run, &playbook).await
        }
        .instrument(span)
        .await
    }

    /// After a run reached its outcome: reports to the breaker, escalates a failure, and resolves
    /// earlier pages for the same alert when it succeeded.
    pub(super) async fn settled(
        &self,
        mut run: Run,
        playbook: &Playbook,
    ) -> Result<(), StoreError> {
        if !matches!(run.outcome, Outcome::Succeeded | Outcome::Verifying) {
            // Expire before paging, so the humans see the original alert too.
            self.expire_silence(&mut run).await?;
        }
        if let Some(bp) = &playbook.guards.breaker {
            if matches!(run.outcome, Outcome::Succeeded | Outcome::Failed) {
                self.guards.record_breaker(
                    &self.guard_name(playbook),
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

    /// Two replicas: takes the run's target lock in the cluster, waiting out another replica's
    /// `acting` lock (its holder died mid-run). `Ok(Some((key, episode)))` when taken, `Ok(None)`
    /// with one replica; `Err` when it may not act, with the run settled: deduplicated when
    /// another replica ran this episode or acted within the cooldown, failed (and paged) when
    /// the lock could not be taken.
    async fn cluster_lock(
        &self,
        run: &mut Run,
        playbook: &Playbook,
        cancel: &CancellationToken,
    ) -> Result<Option<(String, String)>, ()> {
        use crate::ha::{Held, LockRefused};
        let Some(locks) = self
            .target_locks
            .as_ref()
            .filter(|_| !self.shadow(playbook))
        else {
            return Ok(None);
        };
        let key = crate::guard::target_key(
            &playbook.name,
            &run.alert,
            playbook.guards.target_labels.as_deref(),
        );
        let episode = format!(
            "{}@{}",
            run.alert.fingerprint,
            run.alert.starts_at.as_nanosecond()
        );
        // An acting lock runs out within its hold plus the skew, unless renewed: wait that long.
        let give_up = Instant::now() + locks.acting_hold * 2 + locks.clock_skew;
        let refused = loop {
            let now = self.clock.now();
            match locks.take(&key, &episode, now).await {
                Ok(()) => {
                    run.note(now, "cluster lock of the target taken".to_owned());
                    return Ok(Some((key, episode)));
                }
                Err(LockRefused::HeldBy {
                    why: Held::Acting, ..
                }) if Instant::now() < give_up && !cancel.is_cancelled() => {
                    tokio::select! {
                        () = tokio::time::sleep(locks.renew_every) => {}
                        () = cancel.cancelled() => {}
                    }
                }
                Err(e) => break e,
            }
        };
        let now = self.clock.now();
        match refused {
            LockRefused::HeldBy {
                holder,
                until,
                why: why @ (Held::SameEpisode | Held::Cooldown),
            } => {
                let reason = match why {
                    Held::SameEpisode => format!("another replica ({holder}) ran this alert"),
                    _ => format!("another replica ({holder}) acted on this target within its cooldown; its lock holds until {until}"),
                };
                run.settle(Outcome::Deduplicated, &reason, now);
                self.metrics.guard_tripped(&playbook.name, "cluster_lock");
                tracing::info!(run_id = %run.id, %holder, "target locked by another replica");
            }
            LockRefused::HeldBy { holder, .. } => {
                let reason = format!("another replica ({holder}) is still acting on this target; not acting beside it");
                run.settle(Outcome::Failed, &reason, now);
            }
            LockRefused::Unavailable(e) => {
                let reason = format!(
                    "the target's lock in the cluster could not be taken ({e}); not acting"
                );
                run.settle(Outcome::Failed, &reason, now);
                tracing::warn!(run_id = %run.id, error = %e, "cluster lock unavailable");
            }
        }
        Err(())
    }

    /// Runs the steps; with a cluster lock, renews it while they run (stopping them when it is
    /// lost or this replica stops leading), then marks it `acted` with the cooldown.
    async fn run_locked(
        &self,
        run: Run,
        playbook: &Playbook,
        cancel: CancellationToken,
        unrecorded: Option<u64>,
        lock: Option<(String, String)>,
    ) -> Result<Run, StoreError> {
        let (Some(locks), Some((key, episode))) = (&self.target_locks, lock) else {
            return self.run_steps(run, playbook, cancel, unrecorded).await;
        };
        let lost = std::sync::atomic::AtomicBool::new(false);
        let steps_done = CancellationToken::new();
        let keeper = async {
            loop {
                tokio::select! {
                    () = steps_done.cancelled() => return,
                    () = tokio::time::sleep(locks.renew_every) => {}
                }
                let renewed = self.leadership.is_leader()
                    && locks.renew(&key, &episode, self.clock.now()).await.is_ok();
                if !renewed {
                    lost.store(true, std::sync::atomic::Ordering::Release);
                    cancel.cancel();
                    return;
                }
            }
        };
        let steps = async {
            let r = self
                .run_steps(run, playbook, cancel.clone(), unrecorded)
                .await;
            steps_done.cancel();
            r
        };
        let (done, ()) = tokio::join!(steps, keeper);
        let mut run = done?;
        let now = self.clock.now();
        if lost.load(std::sync::atomic::Ordering::Acquire) && run.outcome == Outcome::Cancelled {
            run.settle(
                Outcome::Interrupted,
                "this replica lost the target's cluster lock or the lead while acting; stopped",
                now,
            );
            self.store.put_run(&run)?;
        }
        // A run waiting for approval has not acted yet: its `acting` lock simply runs out.
        if !matches!(
            run.outcome,
            Outcome::Interrupted | Outcome::AwaitingApproval
        ) {
            // The cooldown of this target, and this episode, now hold in the cluster too.
            if let Err(e) = locks
                .acted(&key, &episode, playbook.guards.cooldown, now)
                .await
            {
                tracing::warn!(run_id = %run.id, error = ?e, "could not mark the target's cluster lock acted");
            }
        }
        Ok(run)
    }

    /// The steps in order; the first step that exhausts its retries fails the run.
    pub(super) async fn run_steps(
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
        let mut lost_lead = false;
        let shadow = self.shadow(playbook);
        // An approved run goes on from its approved step; the steps before it have run.
        let resume_at = run
            .approvals
            .iter()
            .filter(|a| a.decision == Some(crate::history::Decision::Approved))
            .map(|a| a.step_index)
            .max()
            .unwrap_or(0);
        let approved = Some(crate::history::Decision::Approved);
        if let Some(a) = run.approvals.last().filter(|a| a.decision == approved) {
            let same = playbook.steps.get(a.step_index).map(|s| &s.name) == Some(&a.step);
            if !same {
                run.settle(
                    Outcome::Failed,
                    &format!("the playbook changed while step {:?} waited for approval; not running a different step", a.step),
                    self.clock.now(),
                );
                self.record(&run, &mut unrecorded)?;
                return Ok(run);
            }
        }
        'steps: for (index, step) in playbook.steps.iter().enumerate().skip(resume_at) {
            let last_step = index + 1 == playbook.steps.len();
            if let Some(gate) = &step.approval {
                let dry = run.manual.as_ref().is_some_and(|m| m.dry_run);
                if shadow || dry {
                    run.note(
                        self.clock.now(),
                        format!(
                            "dry run: step {} would ask {} for approval",
                            step.name, gate.from
                        ),
                    );
                } else if !run.approved(index) {
                    if cancel.is_cancelled() {
                        // The alert resolved meanwhile: nobody is asked.
                        break 'steps;
                    }
                    return self
                        .ask_approval(run, playbook, index, gate, &mut unrecorded)
                        .await;
                }
            }
            let (params, args) = {
                let mut ctx = TemplateContext::new(&run.alert, &playbook.name);
                ctx.run_id = &run_id;
                ctx.run_url = &run_url;
                ctx.step = &step.name;
                (render_params(step, &ctx), step.action.render_args(&ctx))
            };
            for attempt in 1..=step.retries + 1 {
                if cancel.is_cancelled() {
                    break 'steps;
                }
                if !self.leadership.is_leader() {
                    // Another replica may lead now: no step starts here.
                    lost_lead = true;
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
                    dry_run: match &run.manual {
                        _ if shadow => Some(true),
                        Some(m) if m.dry_run => Some(true),
                        _ => step.dry_run,
                    },
                    cancel: Some(cancel.clone()),
                    args: args.clone(),
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
                    self.metrics.step_failed(&playbook.name, e.metric_label());
                    tracing::warn!(step = %step.name, attempt, error = %e, reason = e.metric_label(), "step attempt failed");
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
                    error: error.as_ref().map(|e| e.to_string()),
                    error_class: error.as_ref().map(|e| e.metric_label().to_owned()),
                    logs: result.logs,
                    changes: result.changes,
                });
                let retry = error
                    .as_ref()
                    .map(|e| retry_decision(e, attempt, step.retries));
                // Record progress when more follows; when this attempt ends the run, the settled
                // record below is its only write.
                let ends_run = match retry {
                    None => last_step,
                    Some(again) => again != Retry::Again || cancel.is_cancelled(),
                };
                if !ends_run {
                    self.record(&run, &mut unrecorded)?;
                }
                let Some((retry, error)) = retry.zip(error) else {
                    continue 'steps;
                };
                if retry == Retry::Again && !cancel.is_cancelled() {
                    tokio::select! {
                        _ = tokio::time::sleep(step.retry_delay) => {},
                        _ = cancel.cancelled() => {},
                    }
                } else {
                    let not_retried = match retry {
                        Retry::Final if attempt <= step.retries => {
                            format!(" (not retried: {} errors are final)", error.metric_label())
                        }
                        _ => String::new(),
                    };
                    failure = Some(format!(
                        "step {:?} failed after {attempt} attempt(s){not_retried}: {error}",
                        step.name,
                    ));
                    break 'steps;
                }
            }
        }
        let now = self.clock.now();
        if lost_lead {
            run.settle(
                Outcome::Interrupted,
                "this replica lost the leader's Lease before the step: no step starts on a standby",
                now,
            );
            tracing::warn!("run interrupted: this replica no longer leads");
        } else if cancel.is_cancelled() {
            run.settle(
                Outcome::Cancelled,
                "alert resolved while the run was in progress (on_resolved: cancel)",
                now,
            );
            tracing::info!("run cancelled: its alert resolved");
        } else if shadow {
            self.settle_shadow(&mut run, playbook, failure, now);
        } else if let Some(reason) = failure {
            run.settle(Outcome::Failed, &reason, now);
        } else if let Some(within) = playbook.verify {
            run.start_verifying(within, now);
            let deadline = crate::clock::later(now, within);
            tracing::info!(%deadline, "steps succeeded; verifying that the alert resolves");
        } else {
            run.succeed(now);
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

    /// A shadow run ends `shadow`, listing the actions its dry runs would have taken; nobody is
    /// paged, whatever its steps did.
    fn settle_shadow(
        &self,
        run: &mut Run,
        playbook: &Playbook,
        failure: Option<String>,
        now: Timestamp,
    ) {
        let mut actions = Vec::new();
        for change in run.steps.iter().flat_map(|s| &s.changes) {
            let mut action = format!("{} {}", change.verb, change.object);
            if !change.namespace.is_empty() {
                action.push_str(&format!(" in {}", change.namespace));
            }
            if change.result != "ok" {
                action.push_str(&format!(" (would fail: {})", change.result));
            }
            self.metrics
                .shadow_actions
                .get_or_create(&crate::metrics::ShadowLabels {
                    playbook: playbook.name.clone(),
                    action: change.verb.clone(),
                })
                .inc();
            actions.push(action);
        }
        let then = failure.map(|f| format!(", then {f}")).unwrap_or_default();
        let reason = format!(
            "shadow: nothing acted; {} action(s) it would have taken{then}",
            actions.len()
        );
        run.shadow_actions = actions;
        run.settle(Outcome::Shadow, &reason, now);
        tracing::info!(actions = run.shadow_actions.len(), "shadow run recorded");
    }

    /// Writes `run`; the first time for a deferred run, also takes its alert off the intake.
    pub(super) fn record(&self, run: &Run, unrecorded: &mut Option<u64>) -> Result<(), StoreError> {
        self.store.put_run(run)?;
        if let Some(seq) = unrecorded.take() {
            self.store.remove_intake(seq)?;
        }
        Ok(())
    }
}

/// Whether a failed attempt is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    Again,
    /// The step has no retries left.
    Exhausted,
    /// The error would recur: not retried, whatever retries are left.
    Final,
}

/// The retry rule: a retryable error is tried again while `attempt` (1-based) is within the
/// step's `retries`; any other error ends the step at once.
pub(super) fn retry_decision(error: &StepError, attempt: u32, retries: u32) -> Retry {
    if !error.is_retryable() {
        Retry::Final
    } else if attempt <= retries {
        Retry::Again
    } else {
        Retry::Exhausted
    }
}
