//! Router tests without a socket: every refusal the webhook can give, with its reason.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use reactor::config::{AuthSettings, BasicAuth, Limits};
use reactor::history::Store;
use reactor::routes::{router, AppState};
use tower::ServiceExt;

use crate::helpers::FIRING;

struct Fixture {
    app: axum::Router,
    _queue: tokio::sync::mpsc::Receiver<reactor::history::Intake>,
    _dir: tempfile::TempDir,
}

fn fixture(limits: Limits, token: Option<&str>, capacity: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (queue, rx) = tokio::sync::mpsc::channel(capacity);
    let metrics = Arc::new(reactor::metrics::Metrics::default());
    let store = Store::open(dir.path()).unwrap();
    let state = AppState {
        health: Arc::new(reactor::watchdog::Health::new(&metrics)),
        queue,
        limits: Arc::new(limits),
        credentials: reactor::routes::credentials(&AuthSettings {
            bearer_token: token.map(str::to_owned),
            basic: token.map(|t| BasicAuth {
                username: "alertmanager".into(),
                password: t.to_owned(),
            }),
        }),
        reloader: Arc::new(reactor::reload::Reloader::new(
            dir.path().join("playbooks"),
            dir.path().join("scripts"),
            Arc::new(rhai::Engine::new_raw()),
            Arc::default(),
            Arc::clone(&metrics),
        )),
        desk: {
            let incidents =
                reactor::incident::Incidents::open(&store, Arc::clone(&metrics)).unwrap();
            Arc::new(reactor::incident::Desk {
                signer: incidents.signer(),
                incidents,
                keys: reactor::incident::keys::Keys::open(&store).unwrap(),
                oncall: Default::default(),
                clock: Arc::new(reactor::clock::SystemClock),
                external_url: "http://127.0.0.1".into(),
            })
        },
        guards: reactor::guard::Guards::open(&store).unwrap(),
        leadership: reactor::ha::Leadership::single(),
        pauses: reactor::pause::Pauses::open(&store, jiff::Timestamp::now()).unwrap(),
        approver: None,
        store,
        metrics,
        dry_run: false,
    };
    Fixture {
        app: router(state),
        _queue: rx,
        _dir: dir,
    }
}

async fn send(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, serde_json::Value, Option<String>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        retry,
    )
}

fn webhook(
    body: impl Into<Body>,
    content_type: Option<&str>,
    token: Option<&str>,
) -> Request<Body> {
    let mut b = Request::post("/webhook/alertmanager");
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(body.into()).unwrap()
}

#[tokio::test]
async fn accepts_the_alertmanager_fixture() {
    let f = fixture(Limits::default(), None, 16);
    let (status, body, _) = send(&f.app, webhook(FIRING, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 1);
}

#[tokio::test]
async fn malformed_json_is_400_with_the_reason() {
    let f = fixture(Limits::default(), None, 16);
    let (status, body, _) = send(
        &f.app,
        webhook("{\"alerts\": [", Some("application/json"), None),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON"),
        "{body}"
    );
    let bad = FIRING.replace(
        "\"fingerprint\":\"3e27bcf000d7dae4\"",
        "\"fingerprint\":\"\"",
    );
    let (status, body, _) = send(&f.app, webhook(bad, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("alerts[0]: fingerprint"),
        "{body}"
    );
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let f = fixture(Limits::default(), None, 16);
    let (status, body, _) = send(&f.app, webhook(FIRING, Some("text/plain"), None)).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(body["error"].as_str().unwrap().contains("application/json"));
    let (status, _, _) = send(&f.app, webhook(FIRING, None, None)).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let limits = Limits {
        max_body_bytes: 256,
        ..Limits::default()
    };
    let f = fixture(limits, None, 16);
    let (status, body, _) = send(&f.app, webhook(FIRING, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn too_many_alerts_in_one_payload_is_413() {
    let limits = Limits {
        max_alerts_per_payload: 1,
        ..Limits::default()
    };
    let f = fixture(limits, None, 16);
    let body = crate::helpers::payload(&[("A", "a1"), ("A", "a2")]).to_string();
    let (status, body, _) = send(&f.app, webhook(body, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        body["error"].as_str().unwrap().contains("limit is 1"),
        "{body}"
    );
}

#[tokio::test]
async fn missing_or_wrong_token_is_401_and_healthz_stays_open() {
    let f = fixture(Limits::default(), Some("s3cret"), 16);
    let (status, _, _) = send(&f.app, webhook(FIRING, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(
        &f.app,
        webhook(FIRING, Some("application/json"), Some("s3creT")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(
        &f.app,
        Request::get("/api/v1/runs").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(
        &f.app,
        webhook(FIRING, Some("application/json"), Some("s3cret")),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body, _) = send(
        &f.app,
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
}

#[tokio::test]
async fn oversized_label_sets_are_400_with_the_limit() {
    let limits = Limits {
        max_labels_per_alert: 2,
        ..Limits::default()
    };
    let f = fixture(limits, None, 16);
    let (status, body, _) = send(&f.app, webhook(FIRING, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "alerts[0]: 3 labels; the limit is 2; 1 alert(s) refused and recorded (paged when firing), the other 0 accepted"
    );
    assert_eq!(
        body["refused"][0]["error"],
        "alerts[0]: 3 labels; the limit is 2"
    );
    assert!(body["refused"][0]["intake"].is_u64(), "recorded: {body}");
}

#[tokio::test]
async fn full_queue_is_503_with_retry_after() {
    let f = fixture(Limits::default(), None, 1);
    let (status, _, _) = send(&f.app, webhook(FIRING, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body, retry) = send(&f.app, webhook(FIRING, Some("application/json"), None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.as_deref(), Some("5"));
    assert!(body["error"].as_str().unwrap().contains("queue is full"));
}

#[tokio::test]
async fn run_lookups_refuse_bad_ids_and_unknown_runs() {
    let f = fixture(Limits::default(), None, 16);
    let (status, body, _) = send(
        &f.app,
        Request::get("/api/v1/runs/nope")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("run id"));
    let (status, _, _) = send(
        &f.app,
        Request::get("/api/v1/runs/9-0")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body, _) = send(
        &f.app,
        Request::get("/api/v1/runs?outcome=great")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}
