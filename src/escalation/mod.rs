//! Paging humans: when a run fails, reactor posts one `RemediationFailed` alert into Alertmanager
//! (`POST /api/v2/alerts`), carrying the run's context, and retries delivery with backoff.
//!
//! Identity of a page: its labels are the original alert's labels (so the humans' routing by
//! team, namespace, etc. keeps working) with `alertname` moved to `original_alertname` and
//! `severity` to `original_severity`, plus `alertname="RemediationFailed"`, the configured
//! `severity` and `playbook`. The run id lives in annotations, not labels, so repeated failures for
//! the same target update one page instead of raising a storm of them. Labels whose names
//! Alertmanager refuses move to the `invalid_labels` annotation, so the page is still accepted.
//!
//! Pages are not sent from the run: they go through the durable [`outbox`], which retries until
//! Alertmanager accepts them, across restarts and outages.

pub mod outbox;

use std::time::Duration;

use jiff::Timestamp;

use crate::alertmanager::{valid_label_name, AlertmanagerApi};
use crate::config::AlertmanagerSettings;
use crate::domain::Labels;
use crate::history::Run;
use crate::playbook::matcher::parse_matchers;
use crate::playbook::{Playbook, TemplateContext};

pub const REMEDIATION_FAILED: &str = "RemediationFailed";
pub const REMEDIATION_LOOP: &str = "RemediationLoop";
/// Annotation of a page carrying the alert's labels whose names Alertmanager refuses, as a JSON
/// object of name to value.
pub const INVALID_LABELS: &str = "invalid_labels";

pub use crate::alertmanager::PostableAlert;

/// Posts pages to Alertmanager. The HTTP client is injected.
#[derive(Clone)]
pub struct Escalator {
    api: AlertmanagerApi,
    /// Label names in `poll_filter`, renamed `original_<name>` on pages.
    routing_labels: Vec<String>,
}

impl Escalator {
    pub fn new(client: reqwest::Client, settings: AlertmanagerSettings) -> Self {
        let routing_labels = settings
            .poll_filter
            .iter()
            .filter_map(|m| parse_matchers(m).ok())
            .flatten()
            .map(|m| m.name().to_owned())
            .filter(|n| n != "alertname" && n != "severity")
            .collect();
        Escalator {
            api: AlertmanagerApi::new(client, settings),
            routing_labels,
        }
    }

    /// The Alertmanager API the pages go to.
    pub fn api(&self) -> &AlertmanagerApi {
        &self.api
    }

    pub fn severity(&self) -> &str {
        &self.settings().severity
    }

    /// Builds the page for a failed run. `run_url` links to the run in reactor's API.
    pub fn page_for(
        &self,
        alertname: &str,
        run: &Run,
        playbook: Option<&Playbook>,
        run_url: &str,
        now: Timestamp,
    ) -> PostableAlert {
        let failed_step = run.steps.iter().rev().find(|s| !s.succeeded);
        let step_name = failed_step.map(|s| s.name.as_str()).unwrap_or("");
        let error = failed_step
            .and_then(|s| s.error.as_deref())
            .or(run.reason.as_deref())
            .unwrap_or("");
        let playbook_name = run.playbook.as_deref().unwrap_or("");
        let run_id = run.id.to_string();
        let ctx = TemplateContext {
            alert: &run.alert,
            playbook: playbook_name,
            run_id: &run_id,
            run_url,
            step: step_name,
            error,
        };
        let spec = playbook.map(|p| &p.escalate);

        let mut labels = run.alert.labels.clone();
        if let Some(v) = labels.remove("alertname") {
            labels.insert("original_alertname".into(), v);
        }
        if let Some(v) = labels.remove("severity") {
            labels.insert("original_severity".into(), v);
        }
        // The labels that route an alert to auto-remediation (`alertmanager.poll_filter`) must not
        // route the page there too: the heartbeat's inhibition would hold it back from humans.
        for name in &self.routing_labels {
            if let Some(v) = labels.remove(name) {
                labels.insert(format!("original_{name}"), v);
            }
        }
        // Alertmanager refuses a whole alert for one label name outside `[a-zA-Z_][a-zA-Z0-9_]*`,
        // and an alert posted to reactor's webhook can carry any name: those labels travel in one
        // annotation, exactly as they were, so the page is accepted and nothing is lost.
        let (mut labels, invalid): (Labels, Labels) = labels
            .into_iter()
            .partition(|(name, _)| valid_label_name(name));
        let severity = spec
            .and_then(|s| s.severity.clone())
            .unwrap_or_else(|| self.settings().severity.clone());
        labels.insert("alertname".into(), alertname.into());
        labels.insert("severity".into(), severity);
        labels.insert("playbook".into(), playbook_name.into());

        let summary = spec
            .and_then(|s| s.summary.as_ref())
            .map(|t| t.render(&ctx))
            .unwrap_or_else(|| {
                format!(
                    "Remediation {playbook_name} failed for {} {}",
                    run.alert.alertname(),
                    target_hint(&run.alert.labels)
                )
                .trim_end()
                .to_owned()
            });
        let description = spec
            .and_then(|s| s.description.as_ref())
            .map(|t| t.render(&ctx))
            .unwrap_or_else(|| match failed_step {
                Some(s) => format!(
                    "Step {:?} failed after {} attempt(s): {error}",
                    s.name, s.attempt
                ),
                None => error.to_owned(),
            });
        let mut annotations = Labels::new();
        annotations.insert("summary".into(), summary);
        annotations.insert("description".into(), description);
        annotations.insert("run_id".into(), run_id.clone());
        annotations.insert("run_url".into(), run_url.into());
        annotations.insert("outcome".into(), run.outcome.to_string());
        if !step_name.is_empty() {
            annotations.insert("failed_step".into(), step_name.into());
        }
        if !error.is_empty() {
            annotations.insert("error".into(), error.into());
        }
        if let Some(src) = run.alert.annotations.get("summary") {
            annotations.insert("original_summary".into(), src.clone());
        }
        if !invalid.is_empty() {
            let json = serde_json::to_string(&invalid).expect("a string map serializes");
            annotations.insert(INVALID_LABELS.into(), json);
        }
        let ttl = jiff::SignedDuration::try_from(self.settings().page_ttl)
            .unwrap_or(jiff::SignedDuration::from_hours(24));
        PostableAlert {
            labels,
            annotations,
            starts_at: now,
            ends_at: now.checked_add(ttl).unwrap_or(now),
            // Alertmanager answers 422 to a generatorURL that is not a URI; `run_url` is also
            // in the annotations.
            generator_url: if reqwest::Url::parse(run_url).is_ok() {
                run_url.into()
            } else {
                String::new()
            },
        }
    }

    /// True when an Alertmanager URL is configured, so pages can be delivered at all.
    pub fn configured(&self) -> bool {
        self.settings().url.is_some()
    }

    pub fn settings(&self) -> &AlertmanagerSettings {
        self.api.settings()
    }

    /// One delivery attempt. `Err((retryable, reason))` on failure.
    pub async fn post_once(&self, page: &PostableAlert) -> Result<(), (bool, String)> {
        self.api
            .post_alerts(std::slice::from_ref(page))
            .await
            .map_err(|e| (e.retryable, e.reason))
    }
}

/// Waits until `next` (at most a minute; a minute when nothing is due), a wake-up, or
/// `shutdown`; returns false on shutdown. The senders of both outboxes wait this way.
pub async fn wait_for_due(
    next: Option<Timestamp>,
    clock: &dyn crate::clock::Clock,
    wake: &tokio::sync::Notify,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let wait = next
        .map(|t| {
            let ms = t.as_millisecond() - clock.now().as_millisecond();
            Duration::from_millis(ms.clamp(10, 60_000) as u64)
        })
        .unwrap_or(Duration::from_secs(60));
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = wake.notified() => true,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Exponential backoff: `base`, 2×, 4×, … capped at `cap`.
pub fn backoff(base: Duration, attempt: u32, cap: Duration) -> Duration {
    base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)))
        .min(cap)
}

fn target_hint(labels: &Labels) -> String {
    ["instance", "pod", "namespace", "job"]
        .iter()
        .filter_map(|k| labels.get(*k).map(|v| format!("{k}={v}")))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::decode_webhook;
    use crate::history::{Outcome, RunId, StepRecord};

    fn escalator() -> Escalator {
        crate::tls::install_crypto_provider();
        Escalator::new(reqwest::Client::new(), AlertmanagerSettings::default())
    }

    fn failed_run() -> Run {
        let body = include_str!("../../tests/fixtures/alertmanager-0.25-firing.json");
        let alert = decode_webhook(body.as_bytes()).unwrap().alerts.remove(0);
        let mut run = Run::new(
            RunId { seq: 7, index: 0 },
            alert,
            Some("selftest-fail".into()),
            Outcome::Failed,
            Timestamp::now(),
        );
        run.reason = Some("step \"boom\" failed".into());
        run.steps.push(StepRecord {
            name: "boom".into(),
            attempt: 2,
            succeeded: false,
            started_at: Timestamp::now(),
            duration_ms: 1,
            output: None,
            error: Some("script threw: no".into()),
            error_class: Some("script_threw".into()),
            logs: vec![],
            changes: vec![],
        });
        run
    }

    #[test]
    fn page_carries_the_original_labels_and_run_context() {
        let esc = escalator();
        let mut run = failed_run();
        run.alert.labels.insert("remediation".into(), "auto".into());
        let page = esc.page_for(
            REMEDIATION_FAILED,
            &run,
            None,
            "http://r/api/v1/runs/7-0",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(page.labels["alertname"], "RemediationFailed");
        assert_eq!(page.labels["severity"], "critical");
        assert_eq!(page.labels["original_alertname"], "HarnessCurl");
        assert_eq!(page.labels["original_severity"], "critical");
        assert_eq!(page.labels["instance"], "curl-test");
        assert_eq!(page.labels["playbook"], "selftest-fail");
        assert!(!page.labels.contains_key("remediation"));
        assert_eq!(page.labels["original_remediation"], "auto");
        assert!(
            !page.labels.contains_key("run_id"),
            "one page per target, not per run"
        );
        assert_eq!(page.annotations["run_id"], "7-0");
        assert_eq!(page.annotations["failed_step"], "boom");
        assert_eq!(page.annotations["error"], "script threw: no");
        assert_eq!(
            page.annotations["summary"],
            "Remediation selftest-fail failed for HarnessCurl instance=curl-test"
        );
        assert_eq!(page.generator_url, "http://r/api/v1/runs/7-0");
        assert_eq!(page.ends_at.as_second(), 24 * 3600);
    }

    #[test]
    fn labels_alertmanager_refuses_travel_in_an_annotation() {
        let esc = escalator();
        let mut run = failed_run();
        for (name, value) in [
            ("has space", "1"),
            ("9lives", "2"),
            ("dash-ed", "3"),
            ("", "4"),
        ] {
            run.alert.labels.insert(name.into(), value.into());
        }
        let page = esc.page_for(
            REMEDIATION_FAILED,
            &run,
            None,
            "not a url",
            Timestamp::now(),
        );
        assert!(
            page.labels.keys().all(|n| valid_label_name(n)),
            "{:?}",
            page.labels
        );
        assert!(page.annotations.keys().all(|n| valid_label_name(n)));
        assert_eq!(page.labels["instance"], "curl-test", "valid labels stay");
        let moved: Labels = serde_json::from_str(&page.annotations[INVALID_LABELS]).unwrap();
        assert_eq!(
            moved,
            Labels::from([
                ("".into(), "4".into()),
                ("9lives".into(), "2".into()),
                ("dash-ed".into(), "3".into()),
                ("has space".into(), "1".into()),
            ])
        );
        assert_eq!(
            page.generator_url, "",
            "Alertmanager answers 422 to a non-URI"
        );
        assert_eq!(page.annotations["run_url"], "not a url");

        let clean = esc.page_for(
            REMEDIATION_FAILED,
            &failed_run(),
            None,
            "http://r/x",
            Timestamp::now(),
        );
        assert!(!clean.annotations.contains_key(INVALID_LABELS));
    }

    #[tokio::test]
    async fn without_an_alertmanager_url_delivery_is_refused_for_good() {
        let esc = escalator();
        let page = esc.page_for(
            REMEDIATION_FAILED,
            &failed_run(),
            None,
            "x",
            Timestamp::now(),
        );
        assert!(!esc.configured());
        assert_eq!(
            esc.post_once(&page).await,
            Err((false, "alertmanager.url is not configured".into()))
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_millis(500);
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(b, 1, cap), b);
        assert_eq!(backoff(b, 3, cap), b * 4);
        assert_eq!(backoff(b, 300, cap), cap);
    }
}
