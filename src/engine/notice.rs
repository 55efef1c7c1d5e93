//! A failed run's page as the notification channels see it: the Alertmanager page's labels and
//! annotations, plus the fields PagerDuty and the others want (source, component, group, class,
//! custom details). The dedup key is the playbook and the alert's fingerprint, so repeated
//! failures of one target update one page until it resolves.

use jiff::Timestamp;

use crate::alertmanager::PostableAlert;
use crate::history::{NotificationRecord, Run};
use crate::notify::{Kind, Notice, Severity};

pub(super) fn dedup_key(run: &Run) -> String {
    format!(
        "reactor/{}/{}",
        run.playbook.as_deref().unwrap_or("-"),
        run.alert.fingerprint
    )
}

pub(super) fn for_run(run: &Run, page: &PostableAlert, alertname: &str) -> Notice {
    let labels = &run.alert.labels;
    let failed_step = run.steps.iter().rev().find(|s| !s.succeeded);
    let annotation = |k: &str| page.annotations.get(k).cloned().unwrap_or_default();
    let source = ["instance", "pod", "node", "job", "service"]
        .iter()
        .find_map(|k| labels.get(*k))
        .cloned()
        .unwrap_or_default();
    let group = ["namespace", "job", "cluster"]
        .iter()
        .find_map(|k| labels.get(*k))
        .cloned()
        .unwrap_or_default();
    let mut details = serde_json::Map::new();
    details.insert("run_id".into(), run.id.to_string().into());
    details.insert("page".into(), alertname.into());
    details.insert(
        "playbook".into(),
        run.playbook.clone().unwrap_or_default().into(),
    );
    details.insert("outcome".into(), run.outcome.to_string().into());
    if let Some(s) = failed_step {
        details.insert("failed_step".into(), s.name.clone().into());
        details.insert("attempts".into(), s.attempt.into());
    }
    let error = annotation("error");
    if !error.is_empty() {
        details.insert("error".into(), error.into());
    }
    details.insert("alertname".into(), run.alert.alertname().into());
    details.insert(
        "labels".into(),
        serde_json::to_value(labels).unwrap_or_default(),
    );
    Notice {
        kind: Kind::Run,
        dedup_key: dedup_key(run),
        // Services refuse an empty summary (PagerDuty's is required, Slack's header too).
        summary: Some(annotation("summary"))
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| format!("Remediation failed for {}", run.alert.alertname())),
        description: annotation("description"),
        severity: Severity::from_label(page.labels.get("severity").map_or("", String::as_str)),
        source,
        component: run.playbook.clone().unwrap_or_default(),
        group,
        class: run.alert.alertname().to_owned(),
        link: annotation("run_url"),
        labels: page.labels.clone(),
        annotations: page.annotations.clone(),
        details,
        at: page.starts_at,
        to: None,
    }
}

/// The record a run carries from the moment its page is decided until the outbox holds it: a
/// crash in between finds it `queued` and stores the page at the next start.
pub(super) fn queued(channel: &str, run: &Run, now: Timestamp) -> NotificationRecord {
    NotificationRecord {
        channel: channel.to_owned(),
        dedup_key: dedup_key(run),
        state: "queued".into(),
        attempts: 0,
        at: now,
        last_error: None,
        request_id: None,
        folded_into: None,
        resolved_at: None,
    }
}
