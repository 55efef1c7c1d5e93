//! PagerDuty Events API v2: `POST {url}/v2/enqueue`. A trigger carries the whole page; acknowledge
//! and resolve carry only `routing_key`, `dedup_key` and `event_action`. 202 is done, 400 is final
//! (the event is invalid), 429 and 5xx are tried again.

use serde_json::json;

use super::{call, ellipsize, Action, Notice, SendError, Sent};
use crate::config::PagerDutySettings;

/// PagerDuty's limits on the fields reactor fills.
const DEDUP_KEY_MAX: usize = 255;
const SUMMARY_MAX: usize = 1024;

/// The event PagerDuty receives for `notice`.
pub(super) fn event(
    routing_key: &str,
    settings: &PagerDutySettings,
    notice: &Notice,
    action: Action,
) -> serde_json::Value {
    let dedup_key = ellipsize(&notice.dedup_key, DEDUP_KEY_MAX);
    match action {
        Action::Resolve => json!({
            "routing_key": routing_key,
            "dedup_key": dedup_key,
            "event_action": "resolve",
        }),
        Action::Trigger => {
            let mut details = notice.details.clone();
            details.insert("description".into(), notice.description.clone().into());
            let mut links = Vec::new();
            if !notice.link.is_empty() {
                links.push(json!({"href": notice.link, "text": "The run in reactor"}));
            }
            json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": dedup_key,
                "client": settings.client,
                "client_url": notice.link,
                "links": links,
                "payload": {
                    "summary": ellipsize(&notice.summary, SUMMARY_MAX),
                    "source": if notice.source.is_empty() { "reactor" } else { &notice.source },
                    "severity": notice.severity.as_str(),
                    "timestamp": notice.at.to_string(),
                    "component": notice.component,
                    "group": notice.group,
                    "class": notice.class,
                    "custom_details": details,
                },
            })
        }
    }
}

pub(super) async fn send(
    client: &reqwest::Client,
    settings: &PagerDutySettings,
    notice: &Notice,
    action: Action,
) -> Result<Sent, SendError> {
    let key = settings
        .routing_key
        .as_ref()
        .ok_or_else(|| SendError::final_("routing_key is not configured"))?
        .read()
        .map_err(SendError::final_)?;
    let url = format!("{}/v2/enqueue", settings.url.trim_end_matches('/'));
    let body = event(key.expose(), settings, notice, action);
    call(client.post(url).json(&body))
        .await?
        .classify("PagerDuty")
        .map(|_| Sent::default())
}
