//! A generic webhook shaped like Alertmanager's (version 4), so that anything that consumes
//! Alertmanager's webhooks consumes reactor's pages. Bearer or basic authentication.

use serde_json::json;

use super::{call, Action, Notice, SendError, Sent};
use crate::config::WebhookSettings;

/// 16 hex digits naming `key` (FNV-1a), stable across restarts and versions.
fn fingerprint(key: &str) -> String {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

pub(super) fn body(receiver: &str, notice: &Notice, action: Action) -> serde_json::Value {
    let status = match action {
        Action::Trigger => "firing",
        Action::Resolve => "resolved",
    };
    let ends_at = match action {
        Action::Trigger => "0001-01-01T00:00:00Z".to_owned(),
        Action::Resolve => jiff::Timestamp::now().to_string(),
    };
    json!({
        "version": "4",
        "groupKey": notice.dedup_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {},
        "commonLabels": notice.labels,
        "commonAnnotations": notice.annotations,
        "externalURL": notice.link,
        "alerts": [{
            "status": status,
            "labels": notice.labels,
            "annotations": notice.annotations,
            "startsAt": notice.at.to_string(),
            "endsAt": ends_at,
            "generatorURL": notice.link,
            // Alertmanager's fingerprints are 16 hex digits; consumers may parse them.
            "fingerprint": fingerprint(&notice.dedup_key),
        }],
    })
}

pub(super) async fn send(
    client: &reqwest::Client,
    settings: &WebhookSettings,
    receiver: &str,
    notice: &Notice,
    action: Action,
) -> Result<Sent, SendError> {
    let mut request = client
        .post(&settings.url)
        .json(&body(receiver, notice, action));
    if let Some(token) = &settings.bearer_token {
        let token = token.read().map_err(SendError::final_)?;
        request = request.bearer_auth(token.expose());
    }
    if let Some(basic) = &settings.basic_auth {
        let password = match &basic.password {
            Some(p) => Some(p.read().map_err(SendError::final_)?),
            None => None,
        };
        request = request.basic_auth(&basic.username, password.as_ref().map(|p| p.expose()));
    }
    call(request)
        .await?
        .classify("the webhook")
        .map(|_| Sent::default())
}
