//! `GET /api/v1/runs` and `GET /api/v1/runs/{id}`: the run history as JSON. Scans run on a
//! blocking thread so a large history never stalls the webhook. `POST /api/v1/runs` and
//! `POST /api/v1/runs/{id}/rerun` start runs by hand.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use jiff::Timestamp;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::domain::{decode_webhook, Alert};
use crate::history::{Manual, Run, RunFilter, RunId};

pub async fn list(
    State(state): State<AppState>,
    filter: Result<Query<RunFilter>, QueryRejection>,
) -> Result<Json<Vec<Run>>, ApiError> {
    let Query(filter) =
        filter.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    let store = state.store.clone();
    let runs = tokio::task::spawn_blocking(move || store.list_runs(&filter))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok(Json(runs))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    let id: RunId = id
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    match state.store.get_run(id).map_err(ApiError::internal)? {
        Some(run) => Ok(Json(run)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}"))),
    }
}

/// `POST /api/v1/runs`: a run asked for by hand.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManualRun {
    /// The playbook to run, whatever its matchers say.
    pub playbook: String,
    /// An alert as in a webhook payload; `status` (firing), `startsAt` (now) and `fingerprint`
    /// (from the labels) may be left out.
    pub alert: serde_json::Value,
    /// Who asks, for the record (default `api`).
    #[serde(default)]
    pub by: Option<String>,
    /// Run every step as a dry run.
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /api/v1/runs/{id}/rerun`, with an optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rerun {
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Starts a run of one playbook for one alert, through the guards (but for the repeat-delivery
/// check) and the history like any run: 202 with the run's id.
pub async fn start(
    State(state): State<AppState>,
    body: Result<Json<ManualRun>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(req) = body.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    loaded(&state, &req.playbook)?;
    let alert = manual_alert(req.alert, &state)?;
    let manual = Manual {
        by: who(req.by),
        playbook: req.playbook,
        dry_run: req.dry_run,
        rerun_of: None,
    };
    enqueue(&state, alert, manual).await
}

/// Runs a recorded run's alert again with its playbook.
pub async fn rerun(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let id: RunId = id
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let req: Rerun = if body.is_empty() {
        Rerun::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad body: {e}")))?
    };
    let run = state
        .store
        .get_run(id)
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")))?;
    let Some(playbook) = run.playbook else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("run {id} matched no playbook: there is nothing to run again"),
        ));
    };
    loaded(&state, &playbook)?;
    let manual = Manual {
        by: who(req.by),
        playbook,
        dry_run: req.dry_run,
        rerun_of: Some(id),
    };
    enqueue(&state, run.alert, manual).await
}

fn who(by: Option<String>) -> String {
    by.map(|b| b.trim().chars().take(200).collect::<String>())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "api".into())
}

fn loaded(state: &AppState, playbook: &str) -> Result<(), ApiError> {
    match state.reloader.in_force().get(playbook) {
        Some(_) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no playbook named {playbook:?} is loaded"),
        )),
    }
}

/// The alert of a manual run, validated as a webhook's, with its defaults filled in.
fn manual_alert(alert: serde_json::Value, state: &AppState) -> Result<Alert, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let serde_json::Value::Object(mut alert) = alert else {
        return Err(bad("alert: expected an object with labels".into()));
    };
    let labels = alert
        .get("labels")
        .and_then(|l| l.as_object())
        .ok_or_else(|| bad("alert.labels: expected an object of label names to values".into()))?;
    if !alert.contains_key("fingerprint") {
        // Stable for a label set, as Alertmanager's is (not the same function).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (k, v) in labels {
            for b in k
                .bytes()
                .chain([0xff])
                .chain(v.to_string().bytes())
                .chain([0xfe])
            {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        alert.insert("fingerprint".into(), format!("{h:016x}").into());
    }
    alert.entry("status").or_insert_with(|| "firing".into());
    alert
        .entry("startsAt")
        .or_insert_with(|| Timestamp::now().to_string().into());
    let payload = serde_json::json!({"version": "4", "alerts": [alert]});
    let mut n = decode_webhook(payload.to_string().as_bytes())
        .map_err(|e| bad(e.to_string().replace("alerts[0]", "alert")))?;
    if let Some(o) = n
        .take_oversized(
            state.limits.max_labels_per_alert,
            state.limits.max_label_bytes,
        )
        .first()
    {
        return Err(bad(format!("alert: {}", o.detail)));
    }
    n.alerts
        .pop()
        .ok_or_else(|| bad("alert: expected one alert".into()))
}

async fn enqueue(
    state: &AppState,
    alert: Alert,
    manual: Manual,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let permit = state.queue.try_reserve().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "work queue is full; retry later",
        )
    })?;
    tracing::info!(playbook = %manual.playbook, by = %manual.by, dry_run = manual.dry_run, "run asked for by hand");
    let intake = state
        .store
        .accept_manual(vec![alert], Timestamp::now(), manual)
        .await
        .map_err(ApiError::internal)?
        .pop()
        .ok_or_else(|| ApiError::internal("no intake recorded"))?;
    let seq = intake.seq;
    state.health.backlog.added(1);
    permit.send(intake);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"run": RunId { seq, index: 0 }.to_string(), "intake": seq})),
    ))
}

/// `POST /api/v1/runs/{id}/approval`: `{"decision": "approve" | "deny", "by": ...}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalBody {
    pub decision: crate::engine::Answer,
    #[serde(default)]
    pub by: Option<String>,
    /// The gated step the answer is for; without it, whichever the run waits on.
    #[serde(default)]
    pub step: Option<String>,
}

/// Answers the approval a run waits for: 200 with the run; 404 for no run; 409 naming the
/// run's outcome when it waits for none (answered, timed out, or withdrawn already).
pub async fn approval(
    State(state): State<AppState>,
    key: Option<axum::Extension<super::incidents::KeyName>>,
    Path(id): Path<String>,
    body: Result<Json<ApprovalBody>, JsonRejection>,
) -> Result<Json<Run>, ApiError> {
    let id: RunId = id
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let Json(req) = body.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    let Some(approver) = &state.approver else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "approvals are not served here",
        ));
    };
    // With an API key, the record names the key: `by` alone is whatever the caller typed.
    let by = match (key, req.by) {
        (Some(axum::Extension(k)), Some(b)) if b.trim() != k.0 => {
            format!("{} (key {})", who(Some(b)), k.0)
        }
        (Some(axum::Extension(k)), _) => k.0,
        (None, b) => who(b),
    };
    let step = req.step;
    let meant = |a: &crate::history::Approval| step.as_ref().is_none_or(|s| *s == a.step);
    decide(approver, id, req.decision, &by, meant)
        .await
        .map(Json)
}

/// Answers run `id`'s approval by `by`, as the API and the console do.
pub(super) async fn decide(
    approver: &crate::engine::Approver,
    id: RunId,
    answer: crate::engine::Answer,
    by: &str,
    meant: impl Fn(&crate::history::Approval) -> bool,
) -> Result<Run, ApiError> {
    use crate::engine::ApprovalError;
    approver
        .decide(id, answer, by, meant)
        .await
        .map_err(|e| match e {
            ApprovalError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            ApprovalError::NotWaiting { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            ApprovalError::Store(e) => ApiError::internal(e),
        })
}
