//! Closing the loop: silences while a run fixes its alert, the wait for the alert to resolve
//! after the steps succeeded (`verify.resolved_within`), and the resolution of pages once the
//! problem is gone.

use super::*;

impl Engine {
    /// Silences the run's alert for the run plus its verify window (`silence: true`). A failure
    /// to silence is noted and the run goes on: the humans may see the alert early, no worse.
    pub(super) async fn create_silence(
        &self,
        run: &mut Run,
        playbook: &Playbook,
    ) -> Result<(), StoreError> {
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
    pub(super) async fn expire_silence(&self, run: &mut Run) -> Result<(), StoreError> {
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
    pub(super) async fn resolve_pages(
        &self,
        fingerprint: &Fingerprint,
        why: &str,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        for id in self.outbox.resolve_for(fingerprint, now).await? {
            tracing::info!(run_id = %id, why, "resolving the page");
            self.store.update_run(id, |run| {
                run.note(now, format!("escalation resolving: {why}"))
            })?;
        }
        for id in self.notifier.resolve_for(fingerprint, now).await? {
            tracing::info!(run_id = %id, why, "resolving the notifications");
        }
        if let Some(incidents) = &self.incidents {
            match incidents
                .resolve_for_alert(fingerprint.as_str(), "reactor", now)
                .await
            {
                Ok(numbers) => {
                    for n in numbers {
                        tracing::info!(incident = n, why, "incident resolved");
                    }
                }
                Err(crate::incident::IncidentError::Store(e)) => return Err(e),
                Err(e) => tracing::error!(error = %e, "could not resolve the alert's incidents"),
            }
        }
        Ok(())
    }

    /// A resolved alert arrived (webhook or held-alert poll): verifications waiting for it
    /// succeed, and pages raised for it resolve.
    pub(super) async fn alert_resolved(&self, fingerprint: &Fingerprint) -> Result<(), StoreError> {
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
        self.withdraw_approvals(fingerprint).await?;
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
            let playbook = self.playbook_of(&run);
            if let Some(source) = source {
                run.verified(source, now);
            } else if expired {
                run.settle(Outcome::Failed, "not resolved after remediation", now);
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
    pub(super) async fn still_firing(
        &self,
        run: &Run,
    ) -> Result<bool, crate::alertmanager::ApiError> {
        let filter = vec![format!("alertname={:?}", run.alert.alertname())];
        let alerts = self.escalator.api().alerts(&filter).await?;
        Ok(alerts
            .iter()
            .any(|a| a.fingerprint == run.alert.fingerprint.as_str()))
    }
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
