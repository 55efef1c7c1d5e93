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
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        ));
    }
    let body = read_body(body, &state.limits, &budget).await?;
    let notification =
        decode_webhook(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    notification
        .check_sizes(
            state.limits.max_labels_per_alert,
            state.limits.max_label_bytes,
        )
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let n = notification.alerts.len();
    if n > state.limits.max_alerts_per_payload {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{n} alerts in one payload; the limit is {}",
                state.limits.max_alerts_per_payload
            ),
        ));
    }
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
    let intakes = state
        .store
        .accept(notification.alerts, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    let ids: Vec<u64> = intakes.iter().map(|i| i.seq).collect();
    for i in &intakes {
        let status = i.alert.status.as_str().to_owned();
        state
            .metrics
            .alerts_received
            .get_or_create(&crate::metrics::StatusLabels { status })
            .inc();
    }
    state.health.backlog.added(n);
    for (permit, intake) in permits.zip(intakes) {
        permit.send(intake);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "accepted": n,
            "intake": ids,
            "truncatedAlerts": notification.truncated_alerts,
        })),
    ))
}
