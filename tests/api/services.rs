//! Local stand-ins for the notification services, each checking the request contract of the real
//! service (method, path, headers, required fields, length limits) and answering with its real
//! codes and bodies. A request that breaks the contract is answered as the service would (400,
//! 401) and recorded in `violations`, which every test asserts empty.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::helpers::serve_local;

/// What a stand-in saw and how it answers next.
#[derive(Default)]
pub struct Seen {
    /// Requests it took (2xx), in order, as JSON bodies (with `_path` added).
    pub accepted: Mutex<Vec<Value>>,
    /// Every request, taken or not.
    pub requests: AtomicU32,
    /// Contract violations: what a request got wrong.
    pub violations: Mutex<Vec<String>>,
    /// Answer this status instead of taking the request (0: take it).
    pub fail_with: AtomicU32,
    /// Answer `fail_with` this many more times, then take requests (u32::MAX: until changed).
    pub failures_left: AtomicU32,
    /// Statuses to answer first, one per request, before `fail_with` applies.
    pub answers_first: Mutex<std::collections::VecDeque<u16>>,
    /// Opsgenie: processing of the next created alert fails.
    pub reject_processing: std::sync::atomic::AtomicBool,
    /// Opsgenie: request id → (success, status), and how often each was asked about.
    pub requests_status: Mutex<Vec<(String, bool, String, u32)>>,
}

impl Seen {
    pub fn accepted(&self) -> Vec<Value> {
        self.accepted.lock().unwrap().clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Fails the next `times` requests with `status` (u32::MAX: until [`Seen::recover`]).
    pub fn fail(&self, status: u16, times: u32) {
        self.fail_with.store(status as u32, Ordering::SeqCst);
        self.failures_left.store(times, Ordering::SeqCst);
    }

    pub fn recover(&self) {
        self.failures_left.store(0, Ordering::SeqCst);
    }

    /// The status to fail this request with, if any.
    /// Answers these statuses to the next requests, one each, in order.
    pub fn answer_first(&self, statuses: &[u16]) {
        self.answers_first.lock().unwrap().extend(statuses);
    }

    fn failing(&self) -> Option<StatusCode> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(status) = self.answers_first.lock().unwrap().pop_front() {
            return StatusCode::from_u16(status).ok();
        }
        let left = self.failures_left.load(Ordering::SeqCst);
        if left == 0 {
            return None;
        }
        if left != u32::MAX {
            self.failures_left.store(left - 1, Ordering::SeqCst);
        }
        StatusCode::from_u16(self.fail_with.load(Ordering::SeqCst) as u16).ok()
    }

    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    fn take(&self, path: &str, mut body: Value) {
        if let Some(o) = body.as_object_mut() {
            o.insert("_path".into(), path.into());
        }
        self.accepted.lock().unwrap().push(body);
    }
}

/// A stand-in on 127.0.0.1, stopped when dropped.
pub struct Service {
    pub addr: std::net::SocketAddr,
    pub seen: Arc<Seen>,
    stop: CancellationToken,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn start(router: Router<Arc<Seen>>) -> Service {
        let seen = Arc::new(Seen::default());
        let (addr, stop) = serve_local(router.with_state(Arc::clone(&seen))).await;
        Service { addr, seen, stop }
    }

    pub async fn pagerduty() -> Service {
        Service::start(Router::new().route("/v2/enqueue", post(pagerduty_enqueue))).await
    }

    pub async fn opsgenie() -> Service {
        Service::start(
            Router::new()
                .route("/v2/alerts", post(opsgenie_create))
                .route("/v2/alerts/{alias}/close", post(opsgenie_close))
                .route("/v2/alerts/requests/{id}", get(opsgenie_request)),
        )
        .await
    }

    pub async fn slack() -> Service {
        Service::start(Router::new().route("/services/{a}/{b}/{c}", post(slack_webhook))).await
    }

    pub async fn teams() -> Service {
        Service::start(Router::new().route("/workflows/{id}", post(teams_webhook))).await
    }

    /// An Alertmanager-style webhook receiver expecting `Authorization: Bearer hook-token`.
    pub async fn webhook() -> Service {
        Service::start(Router::new().route("/hook", post(generic_webhook))).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub const PD_ROUTING_KEY: &str = "R0UT1NGKEYSECRET0123456789abcdef";
pub const GENIE_KEY: &str = "eb243592-faa2-4ba2-a551-1afdf565c889";

fn json_body(headers: &HeaderMap, body: &str) -> Result<Value, String> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(format!("content-type {ct:?}, expected application/json"));
    }
    serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))
}

fn text_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Checks a PagerDuty Events v2 event; the errors PagerDuty would list.
fn pagerduty_errors(v: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    if v["routing_key"] != PD_ROUTING_KEY {
        errors.push("routing_key is invalid".into());
    }
    let dedup = v["dedup_key"].as_str().unwrap_or("");
    if dedup.is_empty() || dedup.chars().count() > 255 {
        errors.push(format!(
            "dedup_key must be 1..=255 characters, got {}",
            dedup.chars().count()
        ));
    }
    match v["event_action"].as_str() {
        Some("trigger") => {
            let summary = text_at(v, "payload.summary").unwrap_or("");
            if summary.is_empty() || summary.chars().count() > 1024 {
                errors.push("payload.summary must be 1..=1024 characters".into());
            }
            if text_at(v, "payload.source").unwrap_or("").is_empty() {
                errors.push("payload.source is missing".into());
            }
            if !matches!(
                text_at(v, "payload.severity"),
                Some("critical" | "error" | "warning" | "info")
            ) {
                errors.push("payload.severity is invalid".into());
            }
            if let Some(t) = text_at(v, "payload.timestamp") {
                if t.parse::<jiff::Timestamp>().is_err() {
                    errors.push("payload.timestamp is not ISO 8601".into());
                }
            }
            if !v["payload"]["custom_details"].is_object() {
                errors.push("payload.custom_details should be the run's details".into());
            }
            if !text_at(v, "client_url").unwrap_or("").starts_with("http") {
                errors.push("client_url should link to the run".into());
            }
            for l in v["links"].as_array().into_iter().flatten() {
                if l["href"].as_str().is_none() {
                    errors.push("links[].href is missing".into());
                }
            }
        }
        Some("acknowledge" | "resolve") => {
            let keys: Vec<&String> = v
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            if keys.len() != 3 {
                errors.push(format!(
                    "acknowledge/resolve carry only routing_key, dedup_key and event_action, got {keys:?}"
                ));
            }
        }
        other => errors.push(format!("event_action {other:?} is invalid")),
    }
    errors
}

async fn pagerduty_enqueue(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(status) = seen.failing() {
        let body = if status == StatusCode::TOO_MANY_REQUESTS {
            json!({"status": "throttle event", "message": "Requests for this service are arriving too quickly. Please retry later."})
        } else {
            json!({"status": "error", "message": "internal error"})
        };
        return (status, Json(body)).into_response();
    }
    let v = match json_body(&headers, &body) {
        Ok(v) => v,
        Err(e) => {
            seen.violation(format!("pagerduty: {e}"));
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"status": "invalid event", "message": e})),
            )
                .into_response();
        }
    };
    let errors = pagerduty_errors(&v);
    if !errors.is_empty() {
        seen.violation(format!("pagerduty: {errors:?}"));
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "invalid event", "message": "Event object is invalid", "errors": errors})),
        )
            .into_response();
    }
    let dedup = v["dedup_key"].clone();
    seen.take("/v2/enqueue", v);
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "success", "message": "Event processed", "dedup_key": dedup})),
    )
        .into_response()
}

/// `Some` answer when the key is wrong.
fn genie_auth(seen: &Seen, headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("GenieKey {GENIE_KEY}")) {
        seen.violation(format!("opsgenie: Authorization {auth:?}"));
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"message": "Could not authenticate", "took": 0.0, "requestId": "x"})),
            )
                .into_response(),
        );
    }
    None
}

fn genie_accept(seen: &Seen, success: bool, status: &str) -> Response {
    let id = format!("req-{}", seen.requests.load(Ordering::SeqCst));
    seen.requests_status
        .lock()
        .unwrap()
        .push((id.clone(), success, status.to_owned(), 0));
    (
        StatusCode::ACCEPTED,
        Json(json!({"result": "Request will be processed", "took": 0.02, "requestId": id})),
    )
        .into_response()
}

async fn opsgenie_create(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(status) = seen.failing() {
        return (
            status,
            Json(json!({"message": "error", "took": 0.0, "requestId": "x"})),
        )
            .into_response();
    }
    if let Some(r) = genie_auth(&seen, &headers) {
        return r;
    }
    let v = match json_body(&headers, &body) {
        Ok(v) => v,
        Err(e) => {
            seen.violation(format!("opsgenie: {e}"));
            return (StatusCode::BAD_REQUEST, Json(json!({"message": e}))).into_response();
        }
    };
    let mut errors = Vec::new();
    let message = v["message"].as_str().unwrap_or("");
    if message.is_empty() || message.chars().count() > 130 {
        errors.push("message must be 1..=130 characters");
    }
    if v["alias"]
        .as_str()
        .is_none_or(|a| a.is_empty() || a.chars().count() > 512)
    {
        errors.push("alias must be 1..=512 characters");
    }
    if !matches!(
        v["priority"].as_str(),
        Some("P1" | "P2" | "P3" | "P4" | "P5")
    ) {
        errors.push("priority must be P1..P5");
    }
    if v["details"]
        .as_object()
        .is_some_and(|d| d.values().any(|x| !x.is_string()))
    {
        errors.push("details values must be strings");
    }
    if !errors.is_empty() {
        seen.violation(format!("opsgenie: {errors:?}"));
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": errors.join(", ")})),
        )
            .into_response();
    }
    let reject = seen.reject_processing.swap(false, Ordering::SeqCst);
    seen.take("/v2/alerts", v);
    if reject {
        genie_accept(
            &seen,
            false,
            "Alert creation failed: responder team 'nosuchteam' does not exist",
        )
    } else {
        genie_accept(&seen, true, "Created alert")
    }
}

async fn opsgenie_close(
    State(seen): State<Arc<Seen>>,
    Path(alias): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    seen.failing();
    if let Some(r) = genie_auth(&seen, &headers) {
        return r;
    }
    if q.get("identifierType").map(String::as_str) != Some("alias") {
        seen.violation("opsgenie close: identifierType=alias missing".into());
    }
    let mut v = serde_json::from_str::<Value>(&body).unwrap_or(json!({}));
    v["alias"] = alias.into();
    seen.take("/v2/alerts/close", v);
    genie_accept(&seen, true, "Closed alert")
}

async fn opsgenie_request(
    State(seen): State<Arc<Seen>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = genie_auth(&seen, &headers) {
        return r;
    }
    let mut all = seen.requests_status.lock().unwrap();
    let Some(entry) = all.iter_mut().find(|e| e.0 == id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "Request not found"})),
        )
            .into_response();
    };
    entry.3 += 1;
    if entry.3 == 1 {
        // Opsgenie has not processed it yet.
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "Request not found. It might not be processed, yet.", "took": 0.0, "requestId": id})),
        )
            .into_response();
    }
    Json(json!({
        "data": {"success": entry.1, "action": "Create", "processedAt": "2026-12-03T07:00:00Z",
                 "integrationId": "i-1", "isSuccess": entry.1, "status": entry.2, "alertId": "a-1"},
        "took": 0.01, "requestId": id,
    }))
    .into_response()
}

async fn slack_webhook(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(status) = seen.failing() {
        let text = match status.as_u16() {
            429 => "rate_limited",
            404 => "channel_not_found",
            410 => "channel_is_archived",
            403 => "action_prohibited",
            400 => "invalid_payload",
            _ => "rollup_error",
        };
        let mut r = (status, text).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
        }
        return r;
    }
    let v = match json_body(&headers, &body) {
        Ok(v) => v,
        Err(_) => return (StatusCode::BAD_REQUEST, "invalid_payload").into_response(),
    };
    let mut errors = Vec::new();
    if v["text"].as_str().is_none_or(str::is_empty) {
        errors.push("no_text".to_owned());
    }
    for b in v["blocks"].as_array().into_iter().flatten() {
        match b["type"].as_str() {
            Some("header") if text_at(b, "text.text").is_none_or(|t| t.chars().count() > 150) => {
                errors.push("header text over 150".into())
            }
            Some("section") => {
                if text_at(b, "text.text").is_some_and(|t| t.chars().count() > 3000) {
                    errors.push("section text over 3000".into());
                }
                if b["fields"].as_array().is_some_and(|f| f.len() > 10) {
                    errors.push("more than 10 fields".into());
                }
            }
            Some("header" | "actions" | "context" | "divider") => {}
            other => errors.push(format!("unknown block type {other:?}")),
        }
    }
    if !errors.is_empty() {
        seen.violation(format!("slack: {errors:?}"));
        return (StatusCode::BAD_REQUEST, "invalid_blocks").into_response();
    }
    seen.take("/services", v);
    (StatusCode::OK, "ok").into_response()
}

async fn teams_webhook(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(status) = seen.failing() {
        return (status, "").into_response();
    }
    let v = match json_body(&headers, &body) {
        Ok(v) => v,
        Err(e) => {
            seen.violation(format!("teams: {e}"));
            return (StatusCode::BAD_REQUEST, e).into_response();
        }
    };
    let attachments = v["attachments"].as_array().cloned().unwrap_or_default();
    let card = attachments.first().cloned().unwrap_or_default();
    let ok = v["type"] == "message"
        && attachments.len() == 1
        && card["contentType"] == "application/vnd.microsoft.card.adaptive"
        && card["content"]["type"] == "AdaptiveCard"
        && card["content"]["version"].is_string()
        && card["content"]["body"]
            .as_array()
            .is_some_and(|b| !b.is_empty());
    if !ok {
        seen.violation(format!("teams: not one Adaptive Card attachment: {v}"));
        return (StatusCode::BAD_REQUEST, "bad card").into_response();
    }
    seen.take("/workflows", v);
    StatusCode::ACCEPTED.into_response()
}

async fn generic_webhook(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(status) = seen.failing() {
        return status.into_response();
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer hook-token") {
        seen.violation("webhook: no bearer token".into());
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let v = match json_body(&headers, &body) {
        Ok(v) => v,
        Err(e) => {
            seen.violation(format!("webhook: {e}"));
            return StatusCode::BAD_REQUEST.into_response();
        }
    };
    let ok = v["version"] == "4"
        && matches!(v["status"].as_str(), Some("firing" | "resolved"))
        && v["alerts"].as_array().is_some_and(|a| {
            a.iter()
                .all(|x| x["labels"]["alertname"].is_string() && x["startsAt"].is_string())
        })
        && v["groupKey"].is_string()
        && v["receiver"].is_string();
    if !ok {
        seen.violation(format!("webhook: not an Alertmanager v4 payload: {v}"));
        return StatusCode::BAD_REQUEST.into_response();
    }
    seen.take("/hook", v);
    StatusCode::OK.into_response()
}
