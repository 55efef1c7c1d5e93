//! Prometheus metrics, served at `/metrics` in OpenMetrics text format. One [`Metrics`] value is
//! created at start-up and shared by the routes and the engine.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

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

/// Every series reactor exports.
pub struct Metrics {
    registry: Registry,
    pub alerts_received: Family<StatusLabels, Counter>,
    /// Finished history entries by playbook and outcome (`-` when no playbook matched).
    pub runs: Family<RunLabels, Counter>,
    pub deduplicated: Family<StatusLabels, Counter>,
    pub guard_trips: Family<GuardLabels, Counter>,
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
        Metrics {
            registry,
            alerts_received,
            runs,
            deduplicated,
            guard_trips,
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
