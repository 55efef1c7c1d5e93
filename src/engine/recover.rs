//! What a stop or a crash leaves: start-up recovery of the intake and of runs caught in progress,
//! re-runs of idempotent playbooks and of runs that never started, runs still going when the
//! shutdown grace ends, and the runs of an alert whose processing panicked.

use super::*;

impl Engine {
    /// Records the runs of the alert accepted as `seq` as failed after processing it panicked,
    /// and pages: written as they are found, whether the panic came before or after they were
    /// first recorded.
    pub(super) async fn fail_after_panic(&self, seq: u64, panic: &str) {
        tracing::error!(seq, %panic, "processing an alert panicked; failing its runs");
        let reason = format!("reactor failed while processing this alert (a bug: {panic})");
        let stopped = self.in_flight.forget_alert(seq);
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
                    run.settle(Outcome::Failed, &reason, now);
                    failed.push(run);
                }
            }
            for run in self.store.runs_of(seq)? {
                if matches!(run.outcome, Outcome::Running) {
                    let mut run = run;
                    run.settle(Outcome::Failed, &reason, now);
                    failed.push(run);
                }
            }
            self.store.put_runs(&failed)?;
            self.store.remove_intake(seq)?;
            for run in failed {
                self.metrics
                    .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
                let playbook = self.playbook_of(&run);
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
            let playbook = self.playbook_of(&run);
            if run.outcome != Outcome::Running {
                // The page was recorded as pending but the process died before it reached the
                // outbox: queue it now (the outbox refuses a second page for the same run).
                if run.notifications.iter().any(|n| n.state == "queued") {
                    // Decided, and maybe not stored: `escalate` stores what is missing.
                    let alertname = run.escalation.as_ref().map_or(REMEDIATION_FAILED, |e| {
                        if e.alertname == REMEDIATION_LOOP {
                            REMEDIATION_LOOP
                        } else {
                            REMEDIATION_FAILED
                        }
                    });
                    let run = run.clone();
                    self.escalate(alertname, run, playbook.as_deref()).await?;
                    continue;
                }
                if run.escalation.is_none() {
                    continue;
                }
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
                    run.settle(Outcome::Interrupted,
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
        self.leadership.wait_to_lead().await;
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
    pub(super) async fn interrupt_in_flight(&self) {
        let ids: Vec<RunId> = self.in_flight.ids();
        for id in ids {
            let result = async {
                if let Some(mut run) = self.store.get_run(id)? {
                    let playbook = self.playbook_of(&run);
                    if playbook.as_ref().is_some_and(|p| p.idempotent) {
                        return Ok(()); // left `running`: re-run at the next start
                    }
                    run.settle(
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
