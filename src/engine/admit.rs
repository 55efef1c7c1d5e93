//! Admission: whether a run of a matching playbook may start. The guards decide (repeat
//! delivery, cooldown, attempts per window, circuit breaker); a refusal settles the run with its
//! reason and may queue a page. A corrupt guard record refuses the run rather than resetting the
//! target.

use super::*;

impl Engine {
    /// Whether `playbook`'s runs are shadow runs: its `mode`, or `mode: shadow` for all.
    pub(super) fn shadow(&self, playbook: &Playbook) -> bool {
        self.shadow_all || playbook.mode == crate::playbook::Mode::Shadow
    }

    /// The name the guards keep `playbook`'s records under: shadow runs count apart, so a
    /// playbook switched to live starts with clean counters.
    pub(super) fn guard_name<'a>(&self, playbook: &'a Playbook) -> std::borrow::Cow<'a, str> {
        if self.shadow(playbook) {
            std::borrow::Cow::Owned(format!("{}#shadow", playbook.name))
        } else {
            std::borrow::Cow::Borrowed(&playbook.name)
        }
    }

    /// Why a maintenance pause holds `run` of `playbook` at `now`, if one does.
    pub(super) fn paused(&self, run: &Run, playbook: &Playbook, now: Timestamp) -> Option<String> {
        if run.manual.is_some() {
            return None;
        }
        let p = self
            .pauses
            .holding(&run.alert.labels, &playbook.name, now)?;
        Some(format!(
            "paused by {} until {} (pause {}: {}); nothing acts and reactor pages nobody",
            p.by, p.until, p.id, p.reason
        ))
    }

    /// Decides whether `run` may remediate, as [`Engine::guarded`] does; a corrupt guard record
    /// refuses the run (skipped, counted, paged) instead of resetting the target's guards.
    pub(super) fn admit(
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
                run.settle(Outcome::Skipped, &reason, now);
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
    pub(super) fn guarded(
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
                let cancelled = self.in_flight.cancel(&alert.fingerprint, &playbook.name);
                if !cancelled.is_empty() {
                    let ids: Vec<String> = cancelled.iter().map(RunId::to_string).collect();
                    reason = format!("alert resolved: cancelled run {}", ids.join(", "));
                }
            }
            run.settle(Outcome::Skipped, &reason, now);
            return Ok(false);
        }
        // A maintenance pause holds the alerts it names, before the guards count them (a run
        // asked for by hand is not paused).
        if let Some(p) = self.paused(run, playbook, now) {
            run.settle(Outcome::Paused, &p, now);
            return Ok(false);
        }
        let policy = &playbook.guards;
        let admission = match run.manual {
            Some(_) => Admission::Target(self.guards.admit_manual(
                alert,
                &self.guard_name(playbook),
                now,
                policy,
            )?),
            None => self
                .guards
                .admit(alert, &self.guard_name(playbook), run.id, now, policy)?,
        };
        let decision = match admission {
            Admission::RepeatOf(owner) => {
                run.settle(
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
                run.settle(Outcome::Skipped, &format!("cooldown: this target was remediated recently; next run allowed at {until}"), now);
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
                run.settle(Outcome::Skipped, &reason, now);
                self.metrics.guard_tripped(&playbook.name, "loop");
                if escalate && !self.shadow(playbook) {
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
                self.guards
                    .admit_breaker(&self.guard_name(playbook), now, bp)?
            {
                let reason = format!("circuit breaker open since {since}: too many recent failures of this playbook; not remediating");
                run.settle(Outcome::Skipped, &reason, now);
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
}
