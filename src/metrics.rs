//! Prometheus metrics, served at `/metrics` in OpenMetrics text format. One [`Metrics`] value is
//! created at start-up and shared by the routes and the engine.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub playbook: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    pub playbook: String,
    pub guard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepFailureLabels {
    pub playbook: String,
    /// The failure's class (see `executor::error::Class::label`).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaybookLabels {
    pub playbook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelResultLabels {
    pub channel: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IncidentLabels {
    pub service: String,
    pub severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub playbook: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabels {
    pub level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub check: String,
}

fn human_histogram() -> Histogram {
    // 10 s … about 3.6 days.
    Histogram::new(exponential_buckets(10.0, 3.0, 10))
}

fn step_histogram() -> Histogram {
    // 5 ms … about 22 minutes.
    Histogram::new(exponential_buckets(0.005, 4.0, 10))
}

/// Every series reactor exports.
pub struct Metrics {
    registry: Registry,
    pub alerts_received: Family<StatusLabels, Counter>,
    /// Finished history entries by playbook and outcome (`-` when no playbook matched).
    pub runs: Family<RunLabels, Counter>,
    pub deduplicated: Family<StatusLabels, Counter>,
    pub guard_trips: Family<GuardLabels, Counter>,
    pub step_duration: Family<PlaybookLabels, Histogram, fn() -> Histogram>,
    /// Failed step attempts, by playbook and the failure's class.
    pub step_failures: Family<StepFailureLabels, Counter>,
    /// Accepted alerts not yet started (waiting for a worker).
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    /// Pages by final delivery result: `delivered` or `rejected`.
    pub escalations: Family<ResultLabels, Counter>,
    pub escalation_attempts_failed: Counter,
    /// Notification attempts by channel and result: `delivered`, `resolved`, `retried`,
    /// `failed`, `rate_limited`.
    pub notifications: Family<ChannelResultLabels, Counter>,
    pub escalations_pending: Gauge,
    pub escalation_oldest_pending_age: Gauge<f64, AtomicU64>,
    pub heartbeats: Family<ResultLabels, Counter>,
    /// Incidents not resolved, by service and severity.
    pub incidents_open: Family<IncidentLabels, Gauge>,
    pub incidents_opened: Family<IncidentLabels, Counter>,
    /// From opening to the first claim, and to the resolution, by service.
    pub incident_time_to_claim: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub incident_time_to_resolve: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    /// What shadow runs would have done, by playbook and action (`delete`, `patch`, `exec`, …).
    pub shadow_actions: Family<ShadowLabels, Counter>,
    /// Escalation levels notified, by level number.
    pub incident_escalations: Family<LevelLabels, Counter>,
    /// How late an escalation step fired after its due time.
    pub incident_escalation_lateness: Histogram,
    pub heartbeat_age: Gauge<f64, AtomicU64>,
    pub self_check_failing: Family<CheckLabels, Gauge>,
    /// Webhook deliveries and alerts refused, by reason.
    pub webhook_rejections: Family<ReasonLabels, Counter>,
    /// Alerts Alertmanager held back from humans that reactor read from its API.
    pub held_alerts: Counter,
    pub store_errors: Counter,
    /// 1 when the last playbook reload put its set in force, 0 when it was refused.
    pub config_last_reload_successful: Gauge,
    pub config_last_reload_success_timestamp: Gauge<f64, AtomicU64>,
    /// Reloads by result: `success` or `failure`.
    pub config_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("reactor");
        let alerts_received = Family::default();
        registry.register(
            "alerts_received",
            "Alerts accepted from webhooks, by status",
            alerts_received.clone(),
        );
        let runs = Family::default();
        registry.register(
            "runs",
            "Runs and recorded decisions, by playbook and outcome",
            runs.clone(),
        );
        let deduplicated = Family::default();
        registry.register(
            "deduplicated_deliveries",
            "Repeat deliveries that started no run",
            deduplicated.clone(),
        );
        let guard_trips = Family::default();
        registry.register(
            "guard_trips",
            "Runs held back by a guard (cooldown, loop, circuit_breaker)",
            guard_trips.clone(),
        );
        let step_duration =
            Family::<PlaybookLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                step_histogram,
            );
        registry.register_with_unit(
            "step_duration",
            "Duration of step attempts, by playbook",
            prometheus_client::registry::Unit::Seconds,
            step_duration.clone(),
        );
        let step_failures = Family::default();
        registry.register(
            "step_failures",
            "Failed step attempts, by playbook and reason (timeout, rejected, refused, script_threw, ...)",
            step_failures.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Accepted alerts waiting for a worker",
            queue_depth.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("in_flight_runs", "Runs executing now", in_flight.clone());
        let escalations = Family::<ResultLabels, Counter>::default();
        // Both results exported from the start: Prometheus' `increase()` cannot see the first
        // rejection of a series that appears at 1 (ReactorEscalationRejected watches it).
        for result in ["delivered", "rejected"] {
            let _ = escalations.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        registry.register(
            "escalations",
            "Pages by delivery result (delivered, rejected)",
            escalations.clone(),
        );
        let notifications = Family::default();
        registry.register(
            "notifications",
            "Notification attempts by channel and result (delivered, resolved, retried, failed, rate_limited)",
            notifications.clone(),
        );
        let escalation_attempts_failed = Counter::default();
        registry.register(
            "escalation_attempts_failed",
            "Page deliveries that failed and will be retried",
            escalation_attempts_failed.clone(),
        );
        let escalations_pending = Gauge::default();
        registry.register(
            "escalations_pending",
            "Pages in the outbox not yet accepted by Alertmanager",
            escalations_pending.clone(),
        );
        let escalation_oldest_pending_age = Gauge::default();
        registry.register_with_unit(
            "escalation_oldest_pending_age",
            "Age of the oldest undelivered page (0 when none)",
            prometheus_client::registry::Unit::Seconds,
            escalation_oldest_pending_age.clone(),
        );
        let incidents_open = Family::default();
        registry.register(
            "incidents_open",
            "Incidents not resolved, by service and severity",
            incidents_open.clone(),
        );
        let incidents_opened = Family::default();
        registry.register(
            "incidents_opened",
            "Incidents opened, by service and severity",
            incidents_opened.clone(),
        );
        let incident_time_to_claim =
            Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                human_histogram,
            );
        registry.register(
            "incident_time_to_claim_seconds",
            "From an incident's opening to its claim, by service",
            incident_time_to_claim.clone(),
        );
        let incident_time_to_resolve =
            Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                human_histogram,
            );
        registry.register(
            "incident_time_to_resolve_seconds",
            "From an incident's opening to its resolution, by service",
            incident_time_to_resolve.clone(),
        );
        let shadow_actions = Family::default();
        registry.register(
            "shadow_actions",
            "Actions shadow runs would have taken, by playbook and action",
            shadow_actions.clone(),
        );
        let incident_escalations = Family::default();
        registry.register(
            "incident_escalations",
            "Escalation levels notified, by level (1 is the first)",
            incident_escalations.clone(),
        );
        let incident_escalation_lateness = Histogram::new(exponential_buckets(0.001, 4.0, 10));
        registry.register(
            "incident_escalation_lateness_seconds",
            "How long after its due time an escalation step fired",
            incident_escalation_lateness.clone(),
        );
        let heartbeats = Family::default();
        registry.register(
            "heartbeats",
            "ReactorHeartbeat posts to Alertmanager, by result (ok, failed, withheld)",
            heartbeats.clone(),
        );
        let heartbeat_age = Gauge::default();
        registry.register_with_unit(
            "heartbeat_age",
            "Time since Alertmanager last accepted the heartbeat (since start when never)",
            prometheus_client::registry::Unit::Seconds,
            heartbeat_age.clone(),
        );
        let self_check_failing = Family::default();
        registry.register(
            "self_check_failing",
            "1 while a self-check fails (dispatcher, stuck_runs, storage, escalation_backlog, escalation_rejected)",
            self_check_failing.clone(),
        );
        let webhook_rejections = Family::default();
        registry.register(
            "webhook_rejections",
            "Webhook deliveries and alerts refused, by reason (content_type, malformed, too_many_alerts, too_many_labels, label_too_long, ...)",
            webhook_rejections.clone(),
        );
        let held_alerts = Counter::default();
        registry.register(
            "held_alerts",
            "Alerts held back by the heartbeat's inhibition that reactor read from Alertmanager",
            held_alerts.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Failed database writes",
            store_errors.clone(),
        );
        let config_last_reload_successful = Gauge::default();
        registry.register(
            "config_last_reload_successful",
            "Whether the last playbook reload succeeded (1) or was refused (0)",
            config_last_reload_successful.clone(),
        );
        let config_last_reload_success_timestamp = Gauge::default();
        registry.register_with_unit(
            "config_last_reload_success_timestamp",
            "When the playbooks in force were loaded (start or last successful reload)",
            prometheus_client::registry::Unit::Seconds,
            config_last_reload_success_timestamp.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        for result in ["success", "failure"] {
            let _ = config_reloads.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        registry.register(
            "config_reloads",
            "Playbook reloads by result (success, failure)",
            config_reloads.clone(),
        );
        registry.register(
            "build",
            "reactor's version",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )]),
        );
        Metrics {
            registry,
            alerts_received,
            runs,
            deduplicated,
            guard_trips,
            step_duration,
            step_failures,
            queue_depth,
            in_flight,
            escalations,
            escalation_attempts_failed,
            notifications,
            escalations_pending,
            escalation_oldest_pending_age,
            heartbeats,
            incidents_open,
            incidents_opened,
            incident_time_to_claim,
            incident_time_to_resolve,
            shadow_actions,
            incident_escalations,
            incident_escalation_lateness,
            heartbeat_age,
            self_check_failing,
            webhook_rejections,
            held_alerts,
            store_errors,
            config_last_reload_successful,
            config_last_reload_success_timestamp,
            config_reloads,
        }
    }
}

impl Metrics {
    pub fn run_recorded(&self, playbook: Option<&str>, outcome: &str) {
        self.runs
            .get_or_create(&RunLabels {
                playbook: playbook.unwrap_or("-").to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn step_finished(&self, playbook: &str, seconds: f64) {
        self.step_duration
            .get_or_create(&PlaybookLabels {
                playbook: playbook.to_owned(),
            })
            .observe(seconds);
    }

    pub fn step_failed(&self, playbook: &str, reason: &'static str) {
        self.step_failures
            .get_or_create(&StepFailureLabels {
                playbook: playbook.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A playbook set was loaded (`ok`) or refused. The load at start counts as a success but
    /// not as a reload.
    pub fn config_reloaded(&self, ok: bool) {
        self.config_last_reload_successful.set(ok as i64);
        if ok {
            let now = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
            self.config_last_reload_success_timestamp.set(now);
        }
    }

    pub fn reload_counted(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    pub fn webhook_rejected(&self, reason: &str) {
        self.webhook_rejections
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn notification(&self, channel: &str, result: &str) {
        self.notifications
            .get_or_create(&ChannelResultLabels {
                channel: channel.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn escalation_result(&self, result: &str) {
        self.escalations
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn heartbeat(&self, result: &str) {
        self.heartbeats
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn guard_tripped(&self, playbook: &str, guard: &str) {
        self.guard_trips
            .get_or_create(&GuardLabels {
                playbook: playbook.to_owned(),
                guard: guard.to_owned(),
            })
            .inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
