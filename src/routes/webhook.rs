//! `POST /webhook/alertmanager`: decode, reserve queue space, record durably, answer, then hand
//! the alerts to the engine. The answer never waits for a remediation.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::{Extension, Json};
use jiff::Timestamp;

use super::body::{read_body, BodyBudget};
use super::{ApiError, AppState};
use crate::domain::decode_webhook;

/// Seconds Alertmanager is asked to wait before retrying when the queue is full.
const RETRY_AFTER_SECS: u32 = 5;

pub async fn receive(
    State(state): State<AppState>,
    Extension(budget): Extension<BodyBudget>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if !state.leadership.is_leader() {
        // A standby takes nothing: Alertmanager retries a 503, and reaches the leader.
        state.metrics.webhook_rejected("standby");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this replica is a standby ({} leads); retry",
                state
                    .leadership
                    .holder()
                    .unwrap_or_else(|| "no replica".into())
            ),
        );
        e.retry_after = Some(RETRY_AFTER_SECS);
        return Err(e);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(refuse(
            &state,
            "content_type",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json".into(),
        ));
    }
    let body = read_body(body, &state.limits, &budget)
        .await
        .inspect_err(|e| {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                state.metrics.webhook_rejected("too_large");
                tracing::warn!(error = %e.message, "webhook refused");
            }
        })?;
    let mut notification = decode_webhook(&body)
        .map_err(|e| refuse(&state, "malformed", StatusCode::BAD_REQUEST, e.to_string()))?;
    let n = notification.alerts.len();
    if n > state.limits.max_alerts_per_payload {
        return Err(refuse(
            &state,
            "too_many_alerts",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{n} alerts in one payload; the limit is {}",
                state.limits.max_alerts_per_payload
            ),
        ));
    }
    // An alert over the size limits is refused alone: the others run, and it is recorded and
    // paged, since Alertmanager retries no 4xx and its inhibition may hold the humans' copy.
    let oversized = notification.take_oversized(
        state.limits.max_labels_per_alert,
        state.limits.max_label_bytes,
    );
    if notification.truncated_alerts > 0 {
        tracing::warn!(
            truncated = notification.truncated_alerts,
            receiver = notification.receiver.as_deref().unwrap_or(""),
            "Alertmanager truncated this notification (max_alerts): those alerts never reached reactor"
        );
    }
    // Reserve queue space before recording, so an accepted alert always has a place to go.
    let permits = match state.queue.try_reserve_many(n) {
        Ok(p) => p,
        Err(_) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "work queue is full; retry later",
            );
            e.retry_after = Some(RETRY_AFTER_SECS);
            return Err(e);
        }
    };
    let now = Timestamp::now();
    let mut intakes = state
        .store
        .accept(notification.alerts, now)
        .await
        .map_err(ApiError::internal)?;
    let accepted = intakes.len();
    let ids: Vec<u64> = intakes.iter().map(|i| i.seq).collect();
    for i in &intakes {
        let status = i.alert.status.as_str().to_owned();
        state
            .metrics
            .alerts_received
            .get_or_create(&crate::metrics::StatusLabels { status })
            .inc();
    }
    let mut refused = Vec::new();
    if !oversized.is_empty() {
        let mut why = Vec::new();
        for o in &oversized {
            state.metrics.webhook_rejected(o.reason);
            let message = format!("alerts[{}]: {}", o.index, o.detail);
            tracing::warn!(
                alertname = o.trimmed.alertname(),
                fingerprint = %o.trimmed.fingerprint,
                reason = o.reason,
                %message,
                "refused an alert over the size limits; recording and paging it"
            );
            why.push(message);
        }
        let cut = oversized
            .into_iter()
            .zip(why.iter().cloned())
            .map(|(o, w)| (o.trimmed, w))
            .collect();
        let recorded = state
            .store
            .accept_refused(cut, now)
            .await
            .map_err(ApiError::internal)?;
        refused = recorded
            .iter()
            .zip(why)
            .map(|(i, w)| serde_json::json!({"error": w, "intake": i.seq}))
            .collect();
        intakes.extend(recorded);
    }
    state.health.backlog.added(n);
    for (permit, intake) in permits.zip(intakes) {
        permit.send(intake);
    }
    if refused.is_empty() {
        return Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "accepted": accepted,
                "intake": ids,
                "truncatedAlerts": notification.truncated_alerts,
            })),
        ));
    }
    let first = refused[0]["error"].as_str().unwrap_or_default().to_owned();
    Ok((
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({
            "error": format!(
                "{first}; {} alert(s) refused and recorded (paged when firing), the other {accepted} accepted",
                refused.len()
            ),
            "accepted": accepted,
            "intake": ids,
            "refused": refused,
            "truncatedAlerts": notification.truncated_alerts,
        })),
    ))
}

/// Counts and logs a refused delivery, and answers it.
fn refuse(state: &AppState, reason: &'static str, status: StatusCode, message: String) -> ApiError {
    state.metrics.webhook_rejected(reason);
    tracing::warn!(reason, error = %message, "webhook refused");
    ApiError::new(status, message)
}
