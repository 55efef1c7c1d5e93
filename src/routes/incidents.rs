//! The incident API: `PUT /api/v1/incidents` opens one (or returns the one still open for its
//! `dedup_key`), `POST /api/v1/incidents/{number}` claims, resolves, reopens or notes it,
//! `GET /api/v1/incidents[/{number}]` reads them, and `GET /api/v1/incidents/{number}/report`
//! writes the post-incident report. Besides the service's own credentials, it takes API keys
//! (`/api/v1/keys`, made with the service's credentials), each good for its scopes. A field that is missing or wrong is a 400 naming it; a
//! transition the state does not allow is a 409 naming the state; neither changes anything.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jiff::Timestamp;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::incident::keys::{ApiKey, Scope};
use crate::incident::{
    Action, Filter, Incident, IncidentError, NewIncident, Severity, State as IncidentState, BY_MAX,
    DEDUP_KEY_MAX, MESSAGE_MAX, SOURCE_MAX, TITLE_MAX,
};

/// `PUT /api/v1/incidents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Create {
    service: Option<String>,
    severity: Option<String>,
    title: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    detected_at: Option<String>,
    #[serde(default)]
    dedup_key: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn json_error(r: JsonRejection) -> ApiError {
    bad(r.body_text())
}

/// `value` present, not blank, and at most `max` bytes; else a 400 naming `field`.
fn text(
    field: &str,
    value: Option<String>,
    max: usize,
    required: bool,
) -> Result<String, ApiError> {
    let v = value.unwrap_or_default();
    if required && v.trim().is_empty() {
        return Err(bad(format!("field `{field}` is required")));
    }
    if v.len() > max {
        return Err(bad(format!("field `{field}` is longer than {max} bytes")));
    }
    Ok(v)
}

impl Create {
    fn validate(self, state: &AppState) -> Result<NewIncident, ApiError> {
        let service = text("service", self.service, 128, true)?;
        if state.desk.oncall.service(&service).is_none() {
            let known: Vec<&str> = state
                .desk
                .oncall
                .services
                .keys()
                .map(String::as_str)
                .collect();
            return Err(bad(format!(
                "field `service`: unknown service {service:?} (services: {})",
                known.join(", ")
            )));
        }
        let severity = text("severity", self.severity, 16, true)?;
        let severity = Severity::parse(&severity).ok_or_else(|| {
            bad(format!(
                "field `severity`: expected CRIT, ERR or WARN (or critical, error, warning), got {severity:?}"
            ))
        })?;
        let detected_at = match self.detected_at {
            None => None,
            Some(t) => Some(t.parse::<Timestamp>().map_err(|e| {
                bad(format!(
                    "field `detected_at`: expected an RFC 3339 time, got {t:?} ({e})"
                ))
            })?),
        };
        let dedup_key = text("dedup_key", self.dedup_key, DEDUP_KEY_MAX, false)?;
        Ok(NewIncident {
            service,
            severity,
            title: text("title", self.title, TITLE_MAX, true)?,
            message: text("message", self.message, MESSAGE_MAX, false)?,
            source: text("source", self.source, SOURCE_MAX, false)?,
            detected_at,
            dedup_key: Some(dedup_key).filter(|k| !k.is_empty()),
            run: None,
            fingerprint: None,
            approvers: None,
        })
    }
}

fn incident_error(e: IncidentError) -> ApiError {
    match e {
        IncidentError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        IncidentError::Conflict { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        IncidentError::Store(s) => ApiError::internal(s),
    }
}

pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<Create>, JsonRejection>,
) -> Result<(StatusCode, Json<Incident>), ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let new = body.validate(&state)?;
    let now = state.desk.clock.now();
    let (incident, opened) = state
        .desk
        .incidents
        .create(new, now)
        .await
        .map_err(incident_error)?;
    if opened {
        tracing::info!(number = incident.number, service = %incident.service, "incident opened");
    }
    let status = if opened {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(incident)))
}

/// `POST /api/v1/incidents/{number}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    action: Option<String>,
    by: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

fn number(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        bad(format!(
            "incident number {text:?}: expected a positive integer"
        ))
    })
}

pub async fn update(
    State(state): State<AppState>,
    Path(n): Path<String>,
    body: Result<Json<Update>, JsonRejection>,
) -> Result<Json<Incident>, ApiError> {
    let n = number(&n)?;
    let Json(body) = body.map_err(json_error)?;
    let action = text("action", body.action, 16, true)?;
    let action: Action = serde_json::from_value(serde_json::Value::String(action.clone()))
        .map_err(|_| {
            bad(format!(
                "field `action`: expected claim, resolve, reopen or note, got {action:?}"
            ))
        })?;
    let by = text("by", body.by, BY_MAX, true)?;
    let note = text("note", body.note, MESSAGE_MAX, action == Action::Note)?;
    let note = Some(note).filter(|n| !n.is_empty());
    let now = state.desk.clock.now();
    let incident = state
        .desk
        .incidents
        .act(n, action, &by, note, now)
        .await
        .map_err(incident_error)?;
    tracing::info!(number = n, state = incident.state.as_str(), %by, "incident updated");
    Ok(Json(incident))
}

pub async fn show(
    State(state): State<AppState>,
    Path(n): Path<String>,
) -> Result<Json<Incident>, ApiError> {
    let n = number(&n)?;
    match state.desk.incidents.get(n).map_err(ApiError::internal)? {
        Some(i) => Ok(Json(i)),
        None => Err(incident_error(IncidentError::NotFound(n))),
    }
}

pub async fn report(State(state): State<AppState>, Path(n): Path<String>) -> Response {
    let found = number(&n).and_then(|n| {
        state
            .desk
            .incidents
            .get(n)
            .map_err(ApiError::internal)?
            .ok_or_else(|| incident_error(IncidentError::NotFound(n)))
    });
    match found {
        Ok(i) => {
            let runs: Vec<_> = i
                .runs
                .iter()
                .filter_map(|id| id.parse().ok())
                .filter_map(|id| state.store.get_run(id).ok().flatten())
                .collect();
            (
                [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
                crate::incident::report(&i, &runs),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    service: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Incident>>, ApiError> {
    let Query(q) = query.map_err(|r| bad(r.body_text()))?;
    let filter = Filter {
        state: match q.state {
            None => None,
            Some(s) => Some(IncidentState::parse(&s).ok_or_else(|| {
                bad(format!(
                    "parameter `state`: expected OPEN, CLAIMED or RESOLVED, got {s:?}"
                ))
            })?),
        },
        service: q.service,
        since: match q.since {
            None => None,
            Some(t) => Some(t.parse::<Timestamp>().map_err(|e| {
                bad(format!(
                    "parameter `since`: expected an RFC 3339 time, got {t:?} ({e})"
                ))
            })?),
        },
        limit: q.limit.unwrap_or(50).clamp(1, 1000),
    };
    let incidents = state.desk.incidents.clone();
    let found = tokio::task::spawn_blocking(move || incidents.list(&filter))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok(Json(found))
}

/// The name of the API key a request of the incident API came with (none for the service's
/// own credentials).
#[derive(Debug, Clone)]
pub struct KeyName(pub String);

/// The scope a request to the incident API needs: `incidents:write` to open, `incidents:ack`
/// to claim, resolve, reopen or note, `read` to read. The service's own credentials may do all.
pub async fn require_scope(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let secret: Option<String> = {
        let headers = req.headers();
        let text = |v: &header::HeaderValue| v.to_str().ok().map(str::to_owned);
        headers.get("x-api-key").and_then(text).or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(text)
                .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        })
    };
    if super::admin(&state, &req) {
        // No credentials are configured, or the service's own: a key sent anyway still names
        // who answered.
        if let Some(Ok(Some(k))) = secret.as_deref().map(|s| state.desk.keys.find(s)) {
            req.extensions_mut().insert(KeyName(k.name));
        }
        return next.run(req).await;
    }
    let needed = match *req.method() {
        Method::PUT => Scope::IncidentsWrite,
        Method::POST => Scope::IncidentsAck,
        _ => Scope::Read,
    };
    let Some(secret) = secret else {
        return super::unauthorized(
            "missing credentials: an API key (X-API-Key or Authorization: Bearer) or the service's token",
        );
    };
    let found = state.desk.keys.find(&secret);
    match found {
        Err(e) => ApiError::internal(e).into_response(),
        Ok(None) => super::unauthorized("unknown API key"),
        Ok(Some(k)) if !k.scopes.contains(&needed) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "the API key {:?} lacks the scope {}",
                k.name,
                needed.as_str()
            ),
        )
        .into_response(),
        Ok(Some(k)) => {
            // Who answered is recorded by the key, whatever name the body gives.
            req.extensions_mut().insert(KeyName(k.name));
            next.run(req).await
        }
    }
}

/// `POST /api/v1/keys` (the service's credentials only).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

pub async fn create_key(
    State(state): State<AppState>,
    body: Result<Json<NewKey>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(body) = body.map_err(json_error)?;
    let name = text("name", body.name, 128, true)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(bad(format!(
            "field `name`: {name:?}: expected letters, digits, '-', '_' or '.'"
        )));
    }
    if body.scopes.is_empty() {
        return Err(bad(
            "field `scopes`: name at least one of incidents:write, incidents:ack, read",
        ));
    }
    let mut scopes = Vec::new();
    for s in &body.scopes {
        let scope = Scope::parse(s).ok_or_else(|| {
            bad(format!(
                "field `scopes`: {s:?}: expected incidents:write, incidents:ack or read"
            ))
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    let now = state.desk.clock.now();
    match state
        .desk
        .keys
        .create(&name, scopes, now)
        .await
        .map_err(ApiError::internal)?
    {
        Some((secret, key)) => {
            tracing::info!(name = %key.name, "API key created");
            let body = serde_json::json!({"name": key.name, "scopes": key.scopes,
                                          "created_at": key.created_at, "key": secret});
            Ok((StatusCode::CREATED, Json(body)))
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("an API key named {name:?} exists; revoke it first"),
        )),
    }
}

pub async fn list_keys(State(state): State<AppState>) -> Result<Json<Vec<ApiKey>>, ApiError> {
    state.desk.keys.list().map(Json).map_err(ApiError::internal)
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .desk
        .keys
        .revoke(&name)
        .await
        .map_err(ApiError::internal)?
    {
        tracing::info!(%name, "API key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no API key named {name:?}"),
        ))
    }
}
