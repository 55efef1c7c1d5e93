//! The HTTP surface: the Alertmanager webhook receiver, the run history API and health. Handlers
//! are thin: they authenticate, decode at the edge, and hand over to the store and the engine.
//! Every refusal is a JSON `{"error": reason}` with the status Alertmanager and curl users expect.
//! `serve` is the listener the router runs behind, `connection` one connection's deadlines, `body`
//! the bounded reading of a request body.

mod body;
mod connection;
mod console;
mod incidents;
mod pauses;
mod runs;
pub mod serve;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use subtle::ConstantTimeEq;

use crate::config::{AuthSettings, Limits};
use crate::engine::Queue;
use crate::history::Store;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub queue: Queue,
    pub limits: Arc<Limits>,
    /// Accepted `Authorization` header values (bearer and/or basic); empty means no auth.
    pub credentials: Arc<[String]>,
    /// Reloads the playbooks (`POST /-/reload`) and holds the set in force.
    pub reloader: Arc<crate::reload::Reloader>,
    /// Global dry run: `/readyz` says the mode.
    pub dry_run: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: Arc<crate::health::Health>,
    /// The incidents and the services they may name.
    pub desk: Arc<crate::incident::Desk>,
    /// The guards' state, for the console's playbooks page.
    pub guards: crate::guard::Guards,
    /// Whether this replica leads (always, with one replica): a standby takes no alerts.
    pub leadership: Arc<crate::ha::Leadership>,
    /// Maintenance pauses (`/api/v1/pauses`).
    pub pauses: crate::pause::Pauses,
    /// Answers approval requests (`POST /api/v1/runs/{id}/approval`); `None` without an engine.
    pub approver: Option<crate::engine::Approver>,
}

impl AppState {
    fn playbooks_loaded(&self) -> usize {
        self.reloader.in_force().current().len()
    }
}

/// Loads the playbooks and scripts again: 200 with the number in force, or 400 with every
/// problem (the set in force keeps running).
async fn reload(State(state): State<AppState>) -> Response {
    match state.reloader.reload("POST /-/reload").await {
        Ok(count) => {
            Json(serde_json::json!({"status": "reloaded", "playbooks": count})).into_response()
        }
        Err(errors) => {
            let problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            let body = serde_json::json!({
                "error": format!(
                    "reload refused: {} problem(s); the playbooks in force keep running",
                    problems.len()
                ),
                "problems": problems,
            });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}

/// The full router. Everything but `/healthz` and `/readyz` sits behind the credentials when
/// some are configured; they are checked before a body is read.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/webhook/alertmanager", post(webhook::receive))
        .route("/api/v1/runs", get(runs::list).post(runs::start))
        .route("/api/v1/runs/{id}", get(runs::show))
        .route("/api/v1/runs/{id}/rerun", post(runs::rerun))
        .route(
            "/api/v1/keys",
            get(incidents::list_keys).post(incidents::create_key),
        )
        .route(
            "/api/v1/keys/{name}",
            axum::routing::delete(incidents::revoke_key),
        )
        .route("/api/v1/pauses", get(pauses::list).post(pauses::create))
        .route("/api/v1/pauses/{id}", axum::routing::delete(pauses::lift))
        .route("/metrics", get(metrics))
        .route("/-/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    // The incident API also takes API keys, each good for its scopes.
    let incident_api = Router::new()
        .route(
            "/api/v1/incidents",
            get(incidents::list).put(incidents::create),
        )
        .route(
            "/api/v1/incidents/{number}",
            get(incidents::show).post(incidents::update),
        )
        .route("/api/v1/incidents/{number}/report", get(incidents::report))
        // Approvers answer with the same keys as claims (`incidents:ack`).
        .route("/api/v1/runs/{id}/approval", post(runs::approval))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            incidents::require_scope,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .merge(incident_api)
        .merge(console::router(state.clone()))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(Extension(body::BodyBudget::new(
            state.limits.max_buffered_body_bytes,
        )))
        .layer(Extension(Arc::new(CachedProbe::new(READY_PROBE_INTERVAL))))
        .with_state(state)
}

/// Alive unless the database failed for good (see [`Store::failure`]): then 503, so that a
/// liveness probe restarts reactor instead of leaving it answering 500 to every webhook.
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    match state.store.failure() {
        None => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "playbooks": state.playbooks_loaded()})),
        ),
        Some(failure) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "failed",
                "detail": format!("the database failed ({failure}) and takes no more writes until reactor restarts"),
            })),
        ),
    }
}

/// How long a database probe's result answers `/readyz`: the probe is a durable write, and
/// `/readyz` needs no credentials.
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Ready when the database takes writes, playbooks are loaded and every self-check that stops
/// remediation passes (503 otherwise), with every check's detail.
/// `/readyz?standby=ready`: a standby counts as ready (the pod's readiness, so rollouts and
/// disruption budgets work; the Service then selects the leader by its pod's label).
#[derive(serde::Deserialize, Default)]
struct ReadyQuery {
    #[serde(default)]
    standby: Option<String>,
}

async fn readyz(
    State(state): State<AppState>,
    Extension(probe): Extension<Arc<CachedProbe>>,
    query: Result<axum::extract::Query<ReadyQuery>, axum::extract::rejection::QueryRejection>,
) -> (StatusCode, Json<serde_json::Value>) {
    let standby_ready = query
        .ok()
        .and_then(|q| q.0.standby)
        .is_some_and(|v| v == "ready");
    let report = state.health.report();
    let database = probe
        .get(|| async {
            match tokio::time::timeout(Duration::from_secs(2), state.store.probe()).await {
                Ok(Ok(())) => serde_json::json!({"ok": true}),
                Ok(Err(e)) => serde_json::json!({"ok": false, "detail": e.to_string()}),
                Err(_) => {
                    serde_json::json!({"ok": false, "detail": "write not durable within 2s"})
                }
            }
        })
        .await;
    let mut checks = serde_json::Map::new();
    checks.insert("database".into(), database);
    checks.insert(
        "playbooks".into(),
        serde_json::json!({"ok": true, "loaded": state.playbooks_loaded()}),
    );
    if state.leadership.enabled() {
        let leading = state.leadership.is_leader();
        let detail = if leading {
            format!("{} leads", state.leadership.identity())
        } else {
            format!(
                "standby: {} leads; this replica takes no alerts until it holds the Lease",
                state
                    .leadership
                    .holder()
                    .unwrap_or_else(|| "no replica".into())
            )
        };
        checks.insert(
            "leadership".into(),
            serde_json::json!({"ok": leading || standby_ready, "leading": leading, "detail": detail}),
        );
    }
    let started = !report.is_empty();
    // A standby runs no self-checks: the leader does.
    if !started && state.leadership.is_leader() {
        checks.insert(
            "watchdog".into(),
            serde_json::json!({"ok": false, "detail": "self-checks have not run yet"}),
        );
    }
    // Not ready only when alerts cannot be taken and run. A check about pages (one waiting, one
    // refused) is in the answer and pages the humans, but taking reactor out of its Service
    // would stop the remediation that still works.
    let mut ready = checks.values().all(|c| c["ok"] == true);
    for (check, result) in report {
        let result = serde_json::to_value(result).unwrap_or_default();
        ready &= result["ok"] == true || !check.stops_remediation();
        checks.insert(check.as_str().into(), result);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "ready": ready,
            "mode": if state.dry_run { "dry_run" } else { "live" },
            "checks": checks,
        })),
    )
}

/// A check's result, reused for `interval` after the check started: however many callers, at
/// most one check runs per interval, and callers arriving during a check wait for its result.
struct CachedProbe {
    interval: Duration,
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, serde_json::Value)>>,
}

impl CachedProbe {
    fn new(interval: Duration) -> CachedProbe {
        CachedProbe {
            interval,
            last: tokio::sync::Mutex::new(None),
        }
    }

    async fn get<F, Fut>(&self, check: F) -> serde_json::Value
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = serde_json::Value>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last {
            if at.elapsed() < self.interval {
                return result.clone();
            }
        }
        let started = tokio::time::Instant::now();
        let result = check().await;
        *last = Some((started, result.clone()));
        result
    }
}

/// The `Authorization` header values that `auth` accepts.
pub fn credentials(auth: &AuthSettings) -> Arc<[String]> {
    use base64::Engine as _;
    let mut out = Vec::new();
    if let Some(t) = &auth.bearer_token {
        out.push(format!("Bearer {t}"));
    }
    if let Some(b) = &auth.basic {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", b.username, b.password));
        out.push(format!("Basic {encoded}"));
    }
    out.into()
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .heartbeat_age
        .set(state.health.heartbeat_age().as_secs_f64());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Whether the request carries the service's own credentials (`auth:`): true when none are
/// configured.
fn admin(state: &AppState, req: &Request) -> bool {
    if state.credentials.is_empty() {
        return true;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    // Compare against every accepted value, each in constant time, with no early exit.
    let ok = state
        .credentials
        .iter()
        .fold(subtle::Choice::from(0), |acc, c| {
            acc | presented.ct_eq(c.as_bytes())
        });
    bool::from(ok)
}

/// 401 with the schemes reactor takes.
fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"reactor\", Basic realm=\"reactor\""),
    );
    resp
}

async fn require_auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !admin(&state, &req) {
        return unauthorized("missing or wrong credentials (the bearer token is auth.bearer_token, or REACTOR_AUTH_TOKEN)");
    }
    next.run(req).await
}

/// A refusal or failure, rendered as `{"error": "..."}`. Server errors are logged with detail.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(serde_json::json!({"error": self.message})),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readiness_checks_share_one_probe_per_interval() {
        let interval = Duration::from_millis(300);
        let probe = Arc::new(CachedProbe::new(interval));
        let probes = Arc::new(AtomicUsize::new(0));
        let check = |probe: Arc<CachedProbe>, probes: Arc<AtomicUsize>| async move {
            probe
                .get(|| async {
                    probes.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    serde_json::json!({"ok": true})
                })
                .await
        };
        let callers: Vec<_> = (0..100)
            .map(|_| tokio::spawn(check(Arc::clone(&probe), Arc::clone(&probes))))
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), serde_json::json!({"ok": true}));
        }
        check(Arc::clone(&probe), Arc::clone(&probes)).await;
        assert_eq!(
            probes.load(Ordering::SeqCst),
            1,
            "one probe answers the interval"
        );
        tokio::time::sleep(interval).await;
        check(Arc::clone(&probe), Arc::clone(&probes)).await;
        assert_eq!(
            probes.load(Ordering::SeqCst),
            2,
            "a new interval probes again"
        );
    }
}
