//! `GET /api/v1/runs` and `GET /api/v1/runs/{id}`: the run history as JSON. Scans run on a
//! blocking thread so a large history never stalls the webhook.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, AppState};
use crate::history::{Run, RunFilter, RunId};

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
