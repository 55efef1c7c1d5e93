//! Approval gates. Before a step with `approval:` runs, the run is stored waiting
//! (`awaiting_approval`) and an incident asks the approvers through their escalation policy.
//! Nothing holds a worker or a thread while it waits: the wait is the run's record plus an entry
//! in the sled tree `approvals` (run id → deadline), which [`approval_loop`] times out and which
//! survives restarts. An answer, the deadline and the alert's resolution race; the first to
//! change the run's record (compare-and-swap) wins, and the others find nothing waiting.

use super::*;
use crate::history::{Approval, Decision};
use crate::playbook::ApprovalGate;

/// A human's answer to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Approve,
    Deny,
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no run {0}")]
    NotFound(RunId),
    #[error("run {id} is {outcome}: it waits for no approval (or not for this one)")]
    NotWaiting { id: RunId, outcome: Outcome },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The narrow handle the HTTP edge holds to answer approval requests.
#[derive(Clone)]
pub struct Approver(pub(crate) Arc<Engine>);

impl Approver {
    /// Records `answer` by `by` for the run `id`: approve runs the step (on a task of its own),
    /// deny ends the run `denied`. The run as stored after the answer.
    /// `meant`: the request the answer was given for (the step named, the incident whose link
    /// was used); an answer meant for another request of the run changes nothing.
    pub async fn decide(
        &self,
        id: RunId,
        answer: Answer,
        by: &str,
        meant: impl Fn(&Approval) -> bool,
    ) -> Result<Run, ApprovalError> {
        let decision = match answer {
            Answer::Approve => Decision::Approved,
            Answer::Deny => Decision::Denied,
        };
        let run = self.0.end_wait(id, decision, by, meant).await?;
        if answer == Answer::Approve {
            let engine = Arc::clone(&self.0);
            let resumed = run.clone();
            tokio::spawn(async move { engine.run_approved(resumed).await });
        }
        Ok(run)
    }
}

/// What the target of a run is, for the approvers: its guards' target labels, else its alert.
fn target_of(run: &Run, playbook: &Playbook) -> String {
    let labels = &run.alert.labels;
    let shown: Vec<String> = match playbook.guards.target_labels.as_deref() {
        Some(names) => names
            .iter()
            .map(|n| format!("{n}={}", labels.get(n).map_or("", String::as_str)))
            .collect(),
        None => ["namespace", "pod", "instance", "job"]
            .iter()
            .filter_map(|n| Some(format!("{n}={}", labels.get(*n)?)))
            .collect(),
    };
    if shown.is_empty() {
        format!("{} ({})", run.alert.alertname(), run.alert.fingerprint)
    } else {
        shown.join(", ")
    }
}

impl Engine {
    /// Asks for the approval of step `index` of `playbook`: the run waits, its deadline is set,
    /// and an incident asks the approvers. Returns the waiting run.
    pub(super) async fn ask_approval(
        &self,
        mut run: Run,
        playbook: &Playbook,
        index: usize,
        gate: &ApprovalGate,
        unrecorded: &mut Option<u64>,
    ) -> Result<Run, StoreError> {
        let now = self.clock.now();
        let deadline = crate::clock::later(now, gate.timeout);
        let step = &playbook.steps[index];
        run.approvals.push(Approval {
            step: step.name.clone(),
            step_index: index,
            from: gate.from.clone(),
            requested_at: now,
            deadline,
            incident: None,
            decision: None,
            decided_by: None,
            decided_at: None,
        });
        run.outcome = Outcome::AwaitingApproval;
        run.reason = Some(format!(
            "waiting until {deadline} for {} to approve step {:?}",
            gate.from, step.name
        ));
        run.note(
            now,
            format!("approval of step {} asked of {}", step.name, gate.from),
        );
        // The incident first, so the waiting run names it; after a crash before the run is
        // stored, the alert is processed again and the same dedup key finds the same incident.
        if let Some(number) = self.open_approval(&run, playbook, index, gate).await? {
            if let Some(a) = run.approvals.last_mut() {
                a.incident = Some(number);
            }
        }
        // The wait holds nothing: the run leaves the in-flight registry, and its silence ends so
        // the humans see the alert, before the wait is on record (an answer may resume it at once).
        self.in_flight.remove(run.id);
        self.metrics.in_flight.dec();
        self.expire_silence(&mut run).await?;
        // The deadline before the run: a crash between them leaves an entry that finds no
        // waiting run, never a waiting run without a deadline.
        let mut entry = deadline.as_millisecond().max(0).to_be_bytes().to_vec();
        entry.extend_from_slice(run.alert.fingerprint.as_str().as_bytes());
        self.approvals.insert(run.id.key(), entry)?;
        self.record(&run, unrecorded)?;
        self.store.history_durable().await?;
        self.approval_wake.notify_one();
        tracing::info!(step = %step.name, from = %gate.from, %deadline, "waiting for approval");
        Ok(run)
    }

    /// Opens the incident that asks `gate.from` to approve; `None` without incidents.
    async fn open_approval(
        &self,
        run: &Run,
        playbook: &Playbook,
        index: usize,
        gate: &ApprovalGate,
    ) -> Result<Option<u64>, StoreError> {
        use crate::incident::{IncidentError, NewIncident, Severity};
        let Some(incidents) = &self.incidents else {
            return Ok(None);
        };
        let step = &playbook.steps[index];
        let target = target_of(run, playbook);
        let deadline = run.approvals.last().map(|a| a.deadline);
        let summary = run
            .alert
            .annotations
            .get("summary")
            .map(|s| format!("\n{s}"))
            .unwrap_or_default();
        let message = format!(
            "reactor asks to run step {:?} of playbook {:?} on {target}, for alert {}.{summary}\n\n\
             Approve or deny before {}: the console's run page {}, \
             `reactor approve {id}` / `reactor deny {id}`, or \
             POST /api/v1/runs/{id}/approval {{\"decision\": \"approve\"|\"deny\", \"by\": ...}}. \
             Without an answer the run fails and pages.",
            step.name,
            playbook.name,
            run.alert.alertname(),
            deadline.map_or_else(String::new, |d| d.to_string()),
            self.run_url(run.id),
            id = run.id,
        );
        let service = self
            .incident_service_of(Some(playbook))
            .unwrap_or_else(|| "reactor".into());
        let new = NewIncident {
            service,
            severity: Severity::Warn,
            title: format!("approve {} of {} for {target}?", step.name, playbook.name),
            message,
            source: "reactor".into(),
            detected_at: Some(run.received_at),
            dedup_key: Some(format!("approval/{}/{index}", run.id)),
            run: Some(run.id.to_string()),
            fingerprint: None,
            approvers: Some(gate.from.clone()),
        };
        match incidents.create(new, self.clock.now()).await {
            Ok((incident, _)) => Ok(Some(incident.number)),
            Err(IncidentError::Store(e)) => Err(e),
            Err(e) => {
                tracing::error!(run_id = %run.id, error = %e, "could not open the approval's incident");
                Ok(None)
            }
        }
    }

    /// Ends run `id`'s wait with `decision` by `by`, if it still waits: the run's record, its
    /// deadline entry and the approval's incident. The run as stored.
    pub(super) async fn end_wait(
        &self,
        id: RunId,
        decision: Decision,
        by: &str,
        meant: impl Fn(&Approval) -> bool,
    ) -> Result<Run, ApprovalError> {
        let now = self.clock.now();
        let mut ended = false;
        let stored = self.store.update_run(id, |r| {
            ended = false;
            let Some(a) = r.pending_approval().filter(|a| meant(a)) else {
                return;
            };
            a.decision = Some(decision);
            a.decided_by = Some(by.to_owned());
            a.decided_at = Some(now);
            let (step, from, deadline) = (a.step.clone(), a.from.clone(), a.deadline);
            ended = true;
            match decision {
                Decision::Approved => {
                    r.outcome = Outcome::Running;
                    r.reason = None;
                    r.note(now, format!("step {step} approved by {by}"));
                }
                Decision::Denied => r.settle(
                    Outcome::Denied,
                    &format!("step {step:?} denied by {by}; nothing of it acted"),
                    now,
                ),
                Decision::TimedOut => r.settle(
                    Outcome::Failed,
                    &format!("no answer from {from} to the approval of step {step:?} by {deadline}; nothing of it acted"),
                    now,
                ),
                Decision::Withdrawn => r.settle(
                    Outcome::Cancelled,
                    &format!("the alert resolved while step {step:?} waited for approval; the request is withdrawn"),
                    now,
                ),
            }
        })?;
        let forget = || {
            self.approvals
                .remove(id.key())
                .map_err(|e| ApprovalError::Store(e.into()))
        };
        let Some(run) = stored else {
            forget()?;
            return Err(ApprovalError::NotFound(id));
        };
        // A timeout's entry stays until its page is queued (see `approval_pass`), so a crash in
        // between still pages after the restart.
        if ended && decision != Decision::TimedOut {
            forget()?;
        }
        if !ended {
            return Err(ApprovalError::NotWaiting {
                id,
                outcome: run.outcome,
            });
        }
        self.store.history_durable().await?;
        tracing::info!(run_id = %id, decision = decision.as_str(), by, "approval answered");
        if decision != Decision::Approved {
            self.metrics
                .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
        }
        // The request is answered: its incident resolves, which stops its escalation.
        let incident = run.approvals.last().and_then(|a| a.incident);
        if let (Some(incidents), Some(number)) = (&self.incidents, incident) {
            let note = Some(format!("approval {}", decision.as_str()));
            let who = if matches!(decision, Decision::Approved | Decision::Denied) {
                by
            } else {
                "reactor"
            };
            match incidents
                .act(number, crate::incident::Action::Resolve, who, note, now)
                .await
            {
                Ok(_) | Err(crate::incident::IncidentError::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(run_id = %id, incident = number, error = %e, "could not resolve the approval's incident")
                }
            }
        }
        Ok(run)
    }

    /// Runs an approved run on from its approved step.
    async fn run_approved(self: Arc<Self>, run: Run) {
        let Some(playbook) = self.playbook_of(&run) else {
            let mut run = run;
            run.settle(
                Outcome::Failed,
                "its playbook is no longer loaded; the approved step did not run",
                self.clock.now(),
            );
            if self.store.put_run(&run).is_ok() {
                let _ = self.escalate(REMEDIATION_FAILED, run, None).await;
            }
            return;
        };
        let now = self.clock.now();
        if let Some(why) = self.paused(&run, &playbook, now) {
            // A pause began while the run waited: the approved step does not run either.
            let mut run = run;
            run.settle(Outcome::Paused, &why, now);
            if self.store.put_run(&run).is_ok() {
                self.metrics
                    .run_recorded(run.playbook.as_deref(), run.outcome.as_str());
            }
            return;
        }
        self.resume(run, playbook).await;
    }

    /// The runs waiting for an answer: id, deadline and the alert's fingerprint, from the
    /// `approvals` tree (an entry that does not parse is dropped).
    fn waiting(&self) -> Result<Vec<(RunId, Timestamp, String)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.approvals.iter() {
            let (k, v) = kv?;
            let parsed = RunId::from_key(&k).zip(v.split_first_chunk::<8>());
            let Some((id, (ms, fingerprint))) = parsed else {
                self.approvals.remove(k)?;
                continue;
            };
            let deadline =
                Timestamp::from_millisecond(i64::from_be_bytes(*ms)).unwrap_or(Timestamp::MIN);
            out.push((
                id,
                deadline,
                String::from_utf8_lossy(fingerprint).into_owned(),
            ));
        }
        Ok(out)
    }

    /// Times out every wait whose deadline has passed; returns the next deadline.
    pub async fn approval_pass(&self) -> Result<Option<Timestamp>, StoreError> {
        let now = self.clock.now();
        let mut next: Option<Timestamp> = None;
        let mut due = Vec::new();
        for (id, deadline, _) in self.waiting()? {
            if deadline <= now {
                due.push(id);
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        for id in due {
            let run = match self
                .end_wait(id, Decision::TimedOut, "reactor", |_| true)
                .await
            {
                Ok(run) => Some(run),
                // Timed out before a crash that came before its page: page now.
                Err(ApprovalError::NotWaiting { .. }) => self.store.get_run(id)?.filter(|r| {
                    r.escalation.is_none()
                        && r.notifications.is_empty()
                        && r.approvals.last().and_then(|a| a.decision) == Some(Decision::TimedOut)
                }),
                Err(ApprovalError::Store(e)) => return Err(e),
                Err(ApprovalError::NotFound(_)) => None,
            };
            if let Some(run) = run {
                tracing::warn!(run_id = %id, "approval timed out; escalating");
                match self.playbook_of(&run) {
                    Some(p) => self.settled(run, &p).await?,
                    None => self.escalate(REMEDIATION_FAILED, run, None).await?,
                }
            }
            self.approvals.remove(id.key())?;
        }
        Ok(next)
    }

    /// The alert behind `fingerprint` resolved: every run of it still waiting for approval is
    /// cancelled, and its request withdrawn.
    pub(super) async fn withdraw_approvals(
        &self,
        fingerprint: &Fingerprint,
    ) -> Result<(), StoreError> {
        for (id, _, of) in self.waiting()? {
            if of != fingerprint.as_str() {
                continue;
            }
            match self
                .end_wait(id, Decision::Withdrawn, "reactor", |_| true)
                .await
            {
                Ok(_) | Err(ApprovalError::NotFound(_) | ApprovalError::NotWaiting { .. }) => {}
                Err(ApprovalError::Store(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Times out approvals at their deadlines, on the leader only; woken when a new wait starts.
pub async fn approval_loop(engine: Arc<Engine>, shutdown: CancellationToken) {
    const IDLE: Duration = Duration::from_secs(60);
    loop {
        let mut wait = IDLE;
        if engine.leadership.is_leader() {
            match engine.approval_pass().await {
                Ok(Some(next)) => {
                    let until = next.duration_since(engine.clock.now());
                    wait = Duration::try_from(until).unwrap_or_default().min(IDLE);
                }
                Ok(None) => {}
                Err(e) => {
                    engine.metrics.store_errors.inc();
                    tracing::error!(error = %e, "could not time out approvals");
                    wait = Duration::from_secs(1);
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = engine.approval_wake.notified() => {}
        }
    }
}
