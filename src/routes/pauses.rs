//! `/api/v1/pauses`: maintenance pauses. `POST` starts one (`{"playbook" | "matchers", "for",
//! "reason", "by"}`), `GET` lists those in force (`?all=true`: every one, newest first), and
//! `DELETE /api/v1/pauses/{id}` lifts one early.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::pause::{NewPause, Pause, PauseError};

fn error(e: PauseError) -> ApiError {
    match e {
        PauseError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
        PauseError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        PauseError::NotInForce(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        PauseError::Store(e) => ApiError::internal(e),
    }
}

pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<NewPause>, JsonRejection>,
) -> Result<(StatusCode, Json<Pause>), ApiError> {
    let Json(new) = body.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    let in_force = state.reloader.in_force();
    let loaded = |name: &str| in_force.get(name).is_some();
    let pause = state
        .pauses
        .create(new, loaded, state.desk.clock.now())
        .await
        .map_err(error)?;
    tracing::info!(pause = pause.id, by = %pause.by, until = %pause.until, playbook = pause.playbook.as_deref(), matchers = pause.matchers.as_deref(), "maintenance pause started");
    Ok((StatusCode::CREATED, Json(pause)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    all: bool,
}

pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Pause>>, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    let now = state.desk.clock.now();
    let mut pauses = state.pauses.all().map_err(ApiError::internal)?;
    if !q.all {
        pauses.retain(|p| p.in_force(now));
    }
    pauses.truncate(1000);
    Ok(Json(pauses))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiftQuery {
    #[serde(default)]
    by: Option<String>,
}

pub async fn lift(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<LiftQuery>, QueryRejection>,
) -> Result<Json<Pause>, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, r.body_text()))?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("id: expected a pause number, got {id:?}"),
        )
    })?;
    let by = q.by.unwrap_or_else(|| "api".into());
    let pause = state
        .pauses
        .lift(id, &by, state.desk.clock.now())
        .await
        .map_err(error)?;
    tracing::info!(pause = id, by = %by, "maintenance pause lifted");
    Ok(Json(pause))
}
