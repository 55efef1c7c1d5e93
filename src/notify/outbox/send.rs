//! Sending: one task per channel with due entries, each entry one attempt within the channel's
//! rate limit, the service's answer applied to the entry as it is when the answer comes (see the
//! outbox's `update`), and the storm summary's text written from what was folded into it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::{Entry, Notifier, State};
use crate::clock::{later, Clock};
use crate::history::StoreError;
use crate::metrics::Metrics;
use crate::notify::{Action, Kind, RequestStatus, SendError, Sent};

const MAX_BACKOFF: Duration = Duration::from_secs(60);
const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// How often a request the service took for later is asked about before reactor gives up.
const MAX_CHECKS: u32 = 20;

impl Notifier {
    /// Sends `e` (one attempt) and stores what came of it. The entry may have changed while the
    /// request was out (the alert resolved, pages were folded into a summary): what came of the
    /// attempt is applied to the entry as it is then.
    async fn deliver(
        &self,
        mut e: Entry,
        clock: &dyn Clock,
        metrics: &Metrics,
    ) -> Result<(), StoreError> {
        // The entry as it is now: the alert may have resolved since the pass read it.
        let due = |x: &Entry| x.state.due() && x.next_attempt <= clock.now();
        match self.get(&e.key)? {
            Some(fresh) if fresh.state == e.state && fresh.action == e.action && due(&fresh) => {
                e = fresh
            }
            _ => return Ok(()),
        }
        if e.notice.kind == Kind::Storm && e.action == Action::Trigger {
            self.describe_storm(&mut e);
        }
        let (start_state, start_action) = (e.state, e.action);
        let action = if e.state == State::Resolving {
            Action::Resolve
        } else {
            e.action
        };
        let checking = e.state == State::Checking;
        let attempts = e.attempts + 1;
        let result = if checking {
            let id = e.request_id.clone().unwrap_or_default();
            match self.channels.request_status(&e.channel, &id).await {
                Ok(RequestStatus::Succeeded) => Ok(Sent::default()),
                Ok(RequestStatus::Processing) if attempts < MAX_CHECKS => Err(SendError::retry(
                    "the service has not processed the request yet",
                )),
                Ok(RequestStatus::Processing) => Err(SendError::final_(format!(
                    "request {id} was still not processed after {MAX_CHECKS} checks"
                ))),
                Ok(RequestStatus::Failed(why)) => Err(SendError::final_(format!(
                    "the service rejected request {id}: {why}"
                ))),
                Err(err) => Err(err),
            }
        } else {
            self.channels.send(&e.channel, &e.notice, action).await
        };
        let now = clock.now();
        let channel = e.channel.clone();
        let send_resolved = self
            .channels
            .get(&channel)
            .is_some_and(|c| c.send_resolved());
        let storm_text = (e.notice.kind == Kind::Storm).then(|| e.notice.clone());
        let outcome = |x: &mut Entry| {
            if let Some(n) = &storm_text {
                x.notice = n.clone();
            }
            if x.state != start_state || x.action != start_action {
                // Changed while the request was out: the alert resolved. A trigger that got
                // through after all must be resolved too.
                let sent_trigger = action == Action::Trigger && result.is_ok();
                let taken_for_later = match &result {
                    Ok(Sent {
                        request_id: Some(id),
                    }) if !checking => Some(id.clone()),
                    _ => None,
                };
                if sent_trigger && matches!(x.state, State::Cancelled) {
                    if let Some(id) = taken_for_later {
                        // Check the create first, then close it.
                        x.state = State::Checking;
                        x.action = Action::Trigger;
                        x.request_id = Some(id);
                        x.resolve_after = true;
                        x.attempts = 0;
                        x.next_attempt = later(now, Duration::from_millis(200));
                        x.resolved_at = None;
                    } else if send_resolved {
                        x.resolve_next(now);
                    } else {
                        x.state = State::Resolved;
                    }
                }
                return;
            }
            x.attempts = attempts;
            match &result {
                Ok(Sent {
                    request_id: Some(id),
                }) if !checking => {
                    // Taken for later: check the request before calling it delivered.
                    x.request_id = Some(id.clone());
                    x.state = State::Checking;
                    x.action = action;
                    x.attempts = 0;
                    x.last_error = None;
                    x.next_attempt = later(now, Duration::from_millis(200));
                }
                Ok(_) => {
                    x.last_error = None;
                    if action == Action::Resolve {
                        x.state = State::Resolved;
                        x.resolved_at = Some(now);
                    } else if x.resolve_after {
                        // Processed, and the problem was fixed meanwhile.
                        x.resolve_after = false;
                        if send_resolved {
                            x.resolve_next(now);
                        } else {
                            x.state = State::Resolved;
                            x.resolved_at = Some(now);
                        }
                    } else {
                        x.state = State::Delivered;
                    }
                }
                Err(err) if err.retryable => {
                    // `Retry-After` is honoured, but never below a second: `Retry-After: 0`
                    // must not turn into a hot loop.
                    let delay = err
                        .retry_after
                        .map(|d| d.max(Duration::from_secs(1)))
                        .unwrap_or_else(|| backoff(attempts));
                    x.next_attempt = later(now, delay.max(Duration::from_millis(10)));
                    if !checking {
                        x.last_error = Some(err.reason.clone());
                    }
                }
                Err(err) => {
                    x.last_error = Some(err.reason.clone());
                    x.resolve_after = false;
                    x.state = if action == Action::Resolve {
                        State::Resolved
                    } else {
                        State::Failed
                    };
                }
            }
        };
        let Some(stored) = self.update(&e.key, outcome)? else {
            return Ok(());
        };
        match &result {
            Ok(Sent {
                request_id: Some(_),
            }) if !checking => {}
            Ok(_) => {
                let label = if action == Action::Resolve {
                    "resolved"
                } else {
                    "delivered"
                };
                metrics.notification(&channel, label);
                tracing::info!(key = %e.key, %channel, attempts, ?action, "notification delivered");
            }
            Err(err) if checking && err.retryable => {}
            Err(err) => {
                metrics.notification(&channel, err.result_label());
                if err.retryable {
                    tracing::warn!(key = %e.key, %channel, attempts, error = %err, "notification not delivered yet; will retry");
                } else {
                    tracing::error!(key = %e.key, %channel, error = %err, "the channel refused the notification for good");
                }
            }
        }
        if !stored.state.due() || stored.state == State::Checking {
            self.store.history_durable().await?;
        }
        self.record_on_run(&stored, now)
    }

    /// Whether `channel` may send now; if not, when it may.
    pub(super) fn rate_wait(&self, channel: &str, now: Timestamp) -> Option<Timestamp> {
        let per_minute = self
            .channels
            .get(channel)
            .map_or(0, |c| c.rate_per_minute());
        if per_minute == 0 {
            return None;
        }
        let minute_ago = crate::clock::earlier(now, Duration::from_secs(60));
        let mut windows = self.windows.lock().unwrap();
        let w = windows.entry(channel.to_owned()).or_default();
        while w.sent.front().is_some_and(|t| *t <= minute_ago) {
            w.sent.pop_front();
        }
        if w.sent.len() >= per_minute as usize {
            return w.sent.front().map(|t| later(*t, Duration::from_secs(60)));
        }
        w.sent.push_back(now);
        None
    }
}

fn backoff(attempt: u32) -> Duration {
    crate::escalation::backoff(BASE_BACKOFF, attempt, MAX_BACKOFF)
}

/// Delivers due entries until `shutdown`. Each channel's due entries go out in order on a task of
/// their own, so a channel that hangs until its timeout, or fails, never holds back another; a
/// channel is not given a second task while its first is at work.
pub async fn send_loop(
    notifier: Notifier,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut at_work: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    // The channels at work, by their task.
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut busy: HashSet<String> = std::collections::HashSet::new();
    loop {
        let next = match due_by_channel(&notifier, clock.now(), &busy) {
            Ok((due, next)) => {
                for (channel, entries) in due {
                    busy.insert(channel.clone());
                    let (n, c, m) = (notifier.clone(), Arc::clone(&clock), Arc::clone(&metrics));
                    let name = channel.clone();
                    let task = at_work.spawn(async move {
                        if let Err(e) = deliver_in_order(&n, entries, c.as_ref(), &m).await {
                            tracing::error!(channel = %name, error = %e, "notification outbox failed; retrying");
                        }
                    });
                    tasks.insert(task.id(), channel);
                }
                next
            }
            Err(e) => {
                tracing::error!(error = %e, "notification outbox failed; retrying");
                Some(later(clock.now(), Duration::from_secs(1)))
            }
        };
        let woken =
            crate::escalation::wait_for_due(next, clock.as_ref(), &notifier.wake, &shutdown);
        tokio::select! {
            go_on = woken => if !go_on { break },
            Some(done) = at_work.join_next_with_id(), if !at_work.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "a notification task failed");
                        e.id()
                    }
                };
                if let Some(channel) = tasks.remove(&id) {
                    busy.remove(&channel);
                }
            }
        }
    }
    // What is in flight stays pending in the outbox: the next start sends it.
    at_work.shutdown().await;
    tracing::debug!("notification sender stopped");
}

/// The due entries of channels not at work, by channel, and when the next entry is due.
#[allow(clippy::type_complexity)]
fn due_by_channel(
    notifier: &Notifier,
    now: Timestamp,
    busy: &HashSet<String>,
) -> Result<(BTreeMap<String, Vec<Entry>>, Option<Timestamp>), StoreError> {
    let mut next: Option<Timestamp> = None;
    let mut due: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for e in notifier.pending()? {
        if busy.contains(&e.channel) {
            continue;
        }
        if e.next_attempt > now {
            next = Some(next.map_or(e.next_attempt, |n| n.min(e.next_attempt)));
        } else {
            due.entry(e.channel.clone()).or_default().push(e);
        }
    }
    Ok((due, next))
}

/// Delivers one channel's due entries, oldest first, within its rate limit: past the limit, the
/// rest wait (not counted as attempts) until it allows them.
async fn deliver_in_order(
    notifier: &Notifier,
    mut entries: Vec<Entry>,
    clock: &dyn Clock,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    entries.sort_by_key(|e| (e.next_attempt, e.created));
    let mut held_until: Option<Timestamp> = None;
    for e in entries {
        let checking = e.state == State::Checking;
        if !checking {
            if held_until.is_none() {
                held_until = notifier.rate_wait(&e.channel, clock.now());
            }
            if let Some(at) = held_until {
                metrics.notification(&e.channel, "rate_limited");
                notifier.update(&e.key, |x| {
                    if x.state == e.state {
                        x.next_attempt = x.next_attempt.max(at);
                    }
                })?;
                continue;
            }
        }
        notifier.deliver(e, clock, metrics).await?;
    }
    Ok(())
}
