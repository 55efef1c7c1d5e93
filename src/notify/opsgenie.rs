//! Opsgenie Alert API v2, `Authorization: GenieKey <key>`. Create is `POST /v2/alerts`; close is
//! `POST /v2/alerts/{alias}/close?identifierType=alias`. Opsgenie answers 202 before it processes
//! a request, with a `requestId`: `GET /v2/alerts/requests/{requestId}` tells whether it
//! succeeded, so a request Opsgenie rejects later shows as failed on the run.

use serde_json::json;

use super::{call, ellipsize, Action, Notice, RequestStatus, SendError, Sent, Severity};
use crate::config::OpsgenieSettings;

const MESSAGE_MAX: usize = 130;
const ALIAS_MAX: usize = 512;
const DESCRIPTION_MAX: usize = 15_000;

/// The page's priority: the configured mapping, else critical P1, error P2, warning P3, info P5.
pub(super) fn priority(settings: &OpsgenieSettings, severity: Severity) -> String {
    settings
        .priorities
        .get(severity.as_str())
        .cloned()
        .unwrap_or_else(|| {
            match severity {
                Severity::Critical => "P1",
                Severity::Error => "P2",
                Severity::Warning => "P3",
                Severity::Info => "P5",
            }
            .into()
        })
}

pub(super) fn create_body(settings: &OpsgenieSettings, notice: &Notice) -> serde_json::Value {
    let details: serde_json::Map<String, serde_json::Value> = notice
        .details
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text.into())
        })
        .chain([("run_url".to_owned(), notice.link.clone().into())])
        .collect();
    json!({
        "message": ellipsize(&notice.summary, MESSAGE_MAX),
        "alias": ellipsize(&notice.dedup_key, ALIAS_MAX),
        "description": ellipsize(&format!("{}\n\n{}", notice.description, notice.link), DESCRIPTION_MAX),
        "responders": match &notice.to {
            Some(user) => json!([{"type": "user", "username": user}]),
            None => json!(settings.responders),
        },
        "tags": settings.tags,
        "details": details,
        "entity": notice.source,
        "source": "reactor",
        "priority": priority(settings, notice.severity),
    })
}

fn auth(settings: &OpsgenieSettings) -> Result<String, SendError> {
    let key = settings
        .api_key
        .as_ref()
        .ok_or_else(|| SendError::final_("api_key is not configured"))?
        .read()
        .map_err(SendError::final_)?;
    Ok(format!("GenieKey {}", key.expose()))
}

/// Path-segment encoding of an alias (it may hold `/`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) async fn send(
    client: &reqwest::Client,
    settings: &OpsgenieSettings,
    notice: &Notice,
    action: Action,
) -> Result<Sent, SendError> {
    let base = settings.url.trim_end_matches('/');
    let request = match action {
        Action::Trigger => client
            .post(format!("{base}/v2/alerts"))
            .json(&create_body(settings, notice)),
        Action::Resolve => client
            .post(format!(
                "{base}/v2/alerts/{}/close?identifierType=alias",
                segment(&ellipsize(&notice.dedup_key, ALIAS_MAX))
            ))
            .json(&json!({"source": "reactor", "note": "resolved: the alert resolved or a later run fixed it"})),
    };
    let answer = call(request.header(reqwest::header::AUTHORIZATION, auth(settings)?))
        .await?
        .classify("Opsgenie")?;
    let request_id = serde_json::from_str::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v.get("requestId")?.as_str().map(str::to_owned));
    Ok(Sent { request_id })
}

pub(super) async fn request_status(
    client: &reqwest::Client,
    settings: &OpsgenieSettings,
    request_id: &str,
) -> Result<RequestStatus, SendError> {
    let url = format!(
        "{}/v2/alerts/requests/{}",
        settings.url.trim_end_matches('/'),
        segment(request_id)
    );
    let answer = call(
        client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, auth(settings)?),
    )
    .await?;
    if answer.status == reqwest::StatusCode::NOT_FOUND {
        // Not processed yet.
        return Ok(RequestStatus::Processing);
    }
    let answer = answer.classify("Opsgenie")?;
    let v: serde_json::Value = serde_json::from_str(&answer.body)
        .map_err(|e| SendError::retry(format!("Opsgenie's request status is not JSON: {e}")))?;
    let data = &v["data"];
    match data["success"].as_bool() {
        Some(true) => Ok(RequestStatus::Succeeded),
        Some(false) => Ok(RequestStatus::Failed(
            data["status"].as_str().unwrap_or("failed").to_owned(),
        )),
        None => Ok(RequestStatus::Processing),
    }
}
