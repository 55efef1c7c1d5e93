//! The incident API, as a monitoring system and an on-call human use it: open (once per dedup
//! key), claim, resolve, reopen, note, read, list, report; and every bad request refused with
//! the field or the state it got wrong, changing nothing.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{PlaybookDir, TestApp};

const ONCALL: &str = "teams:\n  - name: devops\nservices:\n  - name: athens\n    team: devops\n";

struct Desk {
    app: TestApp,
    _dir: PlaybookDir,
}

impl Desk {
    async fn start() -> Desk {
        let dir = PlaybookDir::new(&[]);
        std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
        std::fs::write(dir.path().join("oncall/devops.yaml"), ONCALL).unwrap();
        let (oncall, books, scripts) = (dir.path().join("oncall"), dir.playbooks(), dir.scripts());
        let app = TestApp::spawn(move |s| {
            s.oncall_dir = oncall;
            s.playbooks_dir = books;
            s.scripts_dir = scripts;
            s.auth.bearer_token = Some("desk-token".into());
        })
        .await;
        Desk { app, _dir: dir }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some("desk-token"), method, path, body).await
    }

    async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.app.client.request(method, self.app.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn all(&self) -> Vec<Value> {
        let (status, list) = self
            .call(Method::GET, "/api/v1/incidents?limit=1000", None)
            .await;
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array().unwrap().clone()
    }
}

fn nagios(dedup: &str) -> Value {
    json!({"service": "athens", "severity": "critical", "title": "athens: HTTP 502 on /login",
           "message": "check_http failed 3 times", "source": "nagios", "dedup_key": dedup})
}

#[tokio::test]
async fn an_incident_is_opened_once_per_key_claimed_resolved_and_reported() {
    let desk = Desk::start().await;
    let (status, first) = desk
        .call(Method::PUT, "/api/v1/incidents", Some(nagios("athens-502")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["number"], 1);
    assert_eq!(first["state"], "OPEN");
    assert_eq!(first["severity"], "CRIT", "critical is CRIT");

    let (status, again) = desk
        .call(Method::PUT, "/api/v1/incidents", Some(nagios("athens-502")))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the open incident of that key, not a second one"
    );
    assert_eq!(again["number"], 1);
    assert_eq!(again["timeline"][1]["event"], "reported again");

    let (status, other) = desk
        .call(
            Method::PUT,
            "/api/v1/incidents",
            Some(json!({"service": "athens", "severity": "WARN", "title": "disk 85%"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(other["number"], 2);

    let claim = json!({"action": "claim", "by": "alice"});
    let (status, claimed) = desk
        .call(Method::POST, "/api/v1/incidents/1", Some(claim.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    assert_eq!(
        (claimed["state"].as_str(), claimed["claimed_by"].as_str()),
        (Some("CLAIMED"), Some("alice"))
    );
    let (status, conflict) = desk
        .call(Method::POST, "/api/v1/incidents/1", Some(claim))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        conflict["error"].as_str().unwrap().contains("is CLAIMED"),
        "{conflict}"
    );

    let note = json!({"action": "note", "by": "alice", "note": "rolled back the release"});
    assert_eq!(
        desk.call(Method::POST, "/api/v1/incidents/1", Some(note))
            .await
            .0,
        StatusCode::OK
    );
    let (status, resolved) = desk
        .call(
            Method::POST,
            "/api/v1/incidents/1",
            Some(json!({"action": "resolve", "by": "alice"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resolved["state"], "RESOLVED");

    // Resolved: the same key opens a new incident; the old one can be reopened.
    let (status, third) = desk
        .call(Method::PUT, "/api/v1/incidents", Some(nagios("athens-502")))
        .await;
    assert_eq!(
        (status, third["number"].as_u64()),
        (StatusCode::CREATED, Some(3))
    );
    let (status, reopened) = desk
        .call(
            Method::POST,
            "/api/v1/incidents/1",
            Some(json!({"action": "reopen", "by": "bob"})),
        )
        .await;
    assert_eq!(
        (status, reopened["state"].as_str()),
        (StatusCode::OK, Some("OPEN"))
    );

    let (status, open) = desk
        .call(
            Method::GET,
            "/api/v1/incidents?state=OPEN&service=athens",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let numbers: Vec<u64> = open
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [3, 2, 1], "newest first");

    let metrics = desk.app.metrics().await;
    for line in [
        "reactor_incidents_open{service=\"athens\",severity=\"CRIT\"} 2",
        "reactor_incidents_open{service=\"athens\",severity=\"WARN\"} 1",
        "reactor_incidents_opened_total{service=\"athens\",severity=\"CRIT\"} 2",
        "reactor_incident_time_to_claim_seconds_count{service=\"athens\"} 1",
        "reactor_incident_time_to_resolve_seconds_count{service=\"athens\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    let resp = desk
        .app
        .client
        .get(desk.app.url("/api/v1/incidents/1/report"))
        .bearer_auth("desk-token")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/markdown; charset=utf-8"
    );
    let report = resp.text().await.unwrap();
    for part in [
        "# Incident 1: athens: HTTP 502 on /login",
        "| time to claim |",
        "claimed by alice",
        "note by alice: rolled back the release",
        "resolved by alice",
        "reopened by bob",
    ] {
        assert!(report.contains(part), "{part:?} missing from:\n{report}");
    }
    desk.app.stop().await;
}

#[tokio::test]
async fn bad_requests_name_the_field_or_state_and_change_nothing() {
    let desk = Desk::start().await;
    let cases = [
        (json!({"service": "athens", "severity": "CRIT"}), "`title`"),
        (
            json!({"service": "rome", "severity": "CRIT", "title": "x"}),
            "unknown service \"rome\" (services: athens)",
        ),
        (
            json!({"service": "athens", "severity": "urgent", "title": "x"}),
            "`severity`",
        ),
        (
            json!({"service": "athens", "severity": "CRIT", "title": "x", "detected_at": "yesterday"}),
            "`detected_at`",
        ),
        (
            json!({"service": "athens", "severity": "CRIT", "title": "x", "colour": "red"}),
            "colour",
        ),
        (
            json!({"service": "athens", "severity": "CRIT", "title": "x".repeat(2000)}),
            "`title` is longer than 1024",
        ),
    ];
    for (body, names) in cases {
        let (status, error) = desk
            .call(Method::PUT, "/api/v1/incidents", Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert!(
            error["error"].as_str().unwrap_or_default().contains(names),
            "{body}: {error} should name {names}"
        );
    }
    for token in [None, Some("wrong")] {
        let (status, _) = desk
            .call_as(token, Method::PUT, "/api/v1/incidents", Some(nagios("k")))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert!(desk.all().await.is_empty(), "nothing was opened");

    let (_, opened) = desk
        .call(Method::PUT, "/api/v1/incidents", Some(nagios("k")))
        .await;
    let before = desk.all().await;
    let bad_updates = [
        (
            json!({"action": "reopen", "by": "bob"}),
            StatusCode::CONFLICT,
            "is OPEN",
        ),
        (
            json!({"action": "escalate", "by": "bob"}),
            StatusCode::BAD_REQUEST,
            "`action`",
        ),
        (json!({"action": "claim"}), StatusCode::BAD_REQUEST, "`by`"),
        (
            json!({"action": "note", "by": "bob"}),
            StatusCode::BAD_REQUEST,
            "`note`",
        ),
    ];
    for (body, code, names) in bad_updates {
        let (status, error) = desk
            .call(Method::POST, "/api/v1/incidents/1", Some(body.clone()))
            .await;
        assert_eq!(status, code, "{body}: {error}");
        assert!(
            error["error"].as_str().unwrap_or_default().contains(names),
            "{body}: {error} should name {names}"
        );
    }
    let (status, _) = desk
        .call(
            Method::POST,
            "/api/v1/incidents/99",
            Some(json!({"action": "claim", "by": "bob"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        desk.all().await,
        before,
        "no refused request changed anything"
    );
    assert_eq!(opened["number"], 1);
    desk.app.stop().await;
}

#[test]
fn check_reports_an_on_call_file_naming_an_unknown_team_at_its_line() {
    let dir = PlaybookDir::new(&[(
        "playbooks/ok.yaml",
        "name: ok\nmatch:\n  alertname: A\nsteps:\n  - inline: '1'\n",
    )]);
    std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
    std::fs::write(
        dir.path().join("oncall/devops.yaml"),
        "teams:\n  - name: devops\nservices:\n  - name: athens\n    team: devopz\n",
    )
    .unwrap();
    let (code, out, err) = crate::helpers::run_binary(&["check", "playbooks"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("devops.yaml:5:") && err.contains("unknown team \"devopz\" (teams: devops)"),
        "{err}"
    );
    std::fs::write(dir.path().join("oncall/devops.yaml"), ONCALL).unwrap();
    let (code, out, err) = crate::helpers::run_binary(&["check", "playbooks"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok: 1 service(s) of 1 team(s) in oncall"),
        "{out}"
    );

    std::fs::write(
        dir.path().join("playbooks/ok.yaml"),
        "name: ok\nmatch:\n  alertname: A\nescalate:\n  incident: {service: rome}\nsteps:\n  - inline: '1'\n",
    )
    .unwrap();
    let (code, out, err) = crate::helpers::run_binary(&["check", "playbooks"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("ok.yaml:5:")
            && err.contains("escalate.incident.service: unknown service \"rome\""),
        "{err}"
    );
}

#[tokio::test]
async fn api_keys_open_what_their_scopes_allow_and_nothing_else() {
    let desk = Desk::start().await;
    let make = |name: &str, scopes: &[&str]| json!({"name": name, "scopes": scopes});
    let (status, nagios_key) = desk
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(make("nagios", &["incidents:write", "read"])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{nagios_key}");
    let nagios_secret = nagios_key["key"].as_str().unwrap().to_owned();
    let (_, viewer_key) = desk
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(make("viewer", &["read"])),
        )
        .await;
    let viewer_secret = viewer_key["key"].as_str().unwrap().to_owned();
    let (status, _) = desk
        .call(
            Method::POST,
            "/api/v1/keys",
            Some(make("nagios", &["read"])),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "a name is taken once");
    let (status, error) = desk
        .call(Method::POST, "/api/v1/keys", Some(make("x", &["admin"])))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error["error"].as_str().unwrap().contains("`scopes`"),
        "{error}"
    );

    // The key opens incidents, as X-API-Key or as a bearer token.
    let resp = desk
        .app
        .client
        .put(desk.app.url("/api/v1/incidents"))
        .header("X-API-Key", &nagios_secret)
        .json(&nagios("via-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let (status, _) = desk
        .call_as(
            Some(&viewer_secret),
            Method::GET,
            "/api/v1/incidents/1",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "read may read");

    // Without the scope: 403 naming it, and nothing changes.
    let before = desk.all().await;
    let (status, error) = desk
        .call_as(
            Some(&viewer_secret),
            Method::PUT,
            "/api/v1/incidents",
            Some(nagios("other")),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        error["error"].as_str().unwrap().contains("incidents:write"),
        "{error}"
    );
    let claim = json!({"action": "claim", "by": "nagios"});
    let (status, _) = desk
        .call_as(
            Some(&nagios_secret),
            Method::POST,
            "/api/v1/incidents/1",
            Some(claim),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "claiming needs incidents:ack"
    );
    let (status, _) = desk
        .call_as(Some("rk_not-a-key"), Method::GET, "/api/v1/incidents", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A key is for incidents only: the run history wants the service's credentials.
    let (status, _) = desk
        .call_as(Some(&nagios_secret), Method::GET, "/api/v1/runs", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(desk.all().await, before);

    // Listed without secrets; revoked, it opens nothing.
    let (_, keys) = desk.call(Method::GET, "/api/v1/keys", None).await;
    assert!(
        !keys.to_string().contains(&nagios_secret) && !keys.to_string().contains("digest"),
        "{keys}"
    );
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert_eq!(
        desk.call(Method::DELETE, "/api/v1/keys/nagios", None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, _) = desk
        .call_as(Some(&nagios_secret), Method::GET, "/api/v1/incidents", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    desk.app.stop().await;
}

/// The real binary serving the on-call files of [`ONCALL`], with the token `tok`.
struct Served {
    dir: PlaybookDir,
    port: u16,
    config: String,
    _reactor: crate::helpers::Proc,
}

impl Served {
    async fn start() -> Served {
        let dir = PlaybookDir::new(&[]);
        std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
        std::fs::write(dir.path().join("oncall/devops.yaml"), ONCALL).unwrap();
        let port = crate::helpers::free_port();
        let extra = format!("oncall_dir: {}\n", dir.path().join("oncall").display());
        let config = dir.binary_config(port, "tok", &extra);
        let config = config.to_str().unwrap().to_owned();
        let reactor = crate::helpers::spawn_binary(&["--config", &config, "serve"], dir.path());
        crate::helpers::wait_healthy(port).await;
        Served {
            dir,
            port,
            config,
            _reactor: reactor,
        }
    }
}

#[tokio::test]
async fn reactor_keys_makes_a_key_once_lists_it_without_it_and_revokes_it() {
    let served = Served::start().await;
    let (dir, port, config) = (&served.dir, served.port, served.config.as_str());
    let keys = |args: &[&str]| {
        let mut all = vec!["--config", config, "keys"];
        all.extend_from_slice(args);
        crate::helpers::run_binary(&all, dir.path())
    };
    let (code, out, err) = keys(&["create", "--name", "nagios", "--scope", "incidents:write"]);
    assert_eq!(code, 0, "{out}{err}");
    let secret = out.trim().to_owned();
    assert!(secret.starts_with("rk_") && secret.len() > 40, "{out}");
    assert!(err.contains("shown this once"), "{err}");

    let resp = crate::helpers::client()
        .put(format!("http://127.0.0.1:{port}/api/v1/incidents"))
        .header("X-API-Key", &secret)
        .json(&nagios("cli-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);

    let (code, out, _) = keys(&["list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("nagios\tincidents:write\t"), "{out}");
    assert!(!out.contains(&secret));
    let (code, out, _) = keys(&["revoke", "nagios"]);
    assert_eq!((code, out.trim()), (0, "revoked: nagios"));
    let resp = crate::helpers::client()
        .get(format!("http://127.0.0.1:{port}/api/v1/incidents"))
        .header("X-API-Key", &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let (code, _, err) = keys(&["revoke", "nagios"]);
    assert_eq!(code, 2);
    assert!(err.contains("no API key named \"nagios\""), "{err}");
}

const FAILS_FOR_ATHENS: &str = "name: always-fails\nmatch:\n  alertname: DiskFull\nescalate:\n  incident: {service: athens}\nguards:\n  max_attempts: 100\n  circuit_breaker: {failures: 0}\nsteps:\n  - name: clean\n    inline: 'throw \"disk still full\"'\n";

#[tokio::test]
async fn a_failed_remediation_opens_one_incident_that_its_alert_resolves() {
    let hook = crate::services::Service::webhook().await;
    let alertmanager = crate::helpers::Capture::start().await;
    let am_url = alertmanager.url();
    let dir = PlaybookDir::new(&[("playbooks/fails.yaml", FAILS_FOR_ATHENS)]);
    std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
    std::fs::write(dir.path().join("oncall/devops.yaml"), ONCALL).unwrap();
    crate::channels::secret_file(dir.path(), "hook.token", "hook-token");
    let chans = crate::channels::channels(&format!(
        "hook:\n  type: webhook\n  url: {}/hook\n  bearer_token_file: {}/hook.token\n",
        hook.url(),
        dir.path().display()
    ));
    let (oncall, books, scripts) = (dir.path().join("oncall"), dir.playbooks(), dir.scripts());
    let app = TestApp::spawn(move |s| {
        s.oncall_dir = oncall;
        s.playbooks_dir = books;
        s.scripts_dir = scripts;
        s.auth.bearer_token = Some("desk-token".into());
        s.route.to = vec!["hook".into(), "alertmanager".into()];
        s.channels = chans;
        s.alertmanager.url = Some(am_url);
    })
    .await;
    let desk = Desk { app, _dir: dir };
    let alert = |status: &str| {
        let mut p = crate::helpers::payload(&[("DiskFull", "e1b2c3d4e5f60001")]);
        p["alerts"][0]["status"] = status.into();
        p["status"] = status.into();
        p
    };
    desk.app.post_webhook(&alert("firing")).await;
    let first = crate::helpers::wait_for(std::time::Duration::from_secs(20), || async {
        desk.all()
            .await
            .into_iter()
            .find(|i| i["runs"].as_array().is_some_and(|r| r.len() == 1))
    })
    .await
    .expect("the failed run opened an incident");
    assert_eq!(
        (first["number"].as_u64(), first["service"].as_str()),
        (Some(1), Some("athens"))
    );
    assert_eq!(
        (first["source"].as_str(), first["state"].as_str()),
        (Some("reactor"), Some("OPEN"))
    );
    assert!(
        first["title"].as_str().unwrap().contains("always-fails"),
        "{first}"
    );
    // The humans' Alertmanager page links to the incident and its one-click claim.
    let page = crate::helpers::wait_for(std::time::Duration::from_secs(20), || async {
        alertmanager.posted_alerts("RemediationFailed").pop()
    })
    .await
    .expect("the failed run paged through Alertmanager");
    assert_eq!(
        page["annotations"]["incident_url"],
        desk.app.url("/ui/incidents/1"),
        "{page}"
    );
    assert!(
        page["annotations"]["claim_url"]
            .as_str()
            .is_some_and(|u| u.starts_with(&desk.app.url("/ui/claim/"))),
        "{page}"
    );

    // The same target fails again (by hand): the same incident, with both runs.
    let resp = desk
        .app
        .client
        .post(desk.app.url("/api/v1/runs"))
        .bearer_auth("desk-token")
        .json(&json!({"playbook": "always-fails", "by": "test",
                      "alert": {"labels": {"alertname": "DiskFull", "instance": "test-host", "severity": "warning", "id": "e1b2c3d4e5f60001"},
                                "fingerprint": "e1b2c3d4e5f60001"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    crate::helpers::wait_for(std::time::Duration::from_secs(20), || async {
        let all = desk.all().await;
        (all.len() == 1 && all[0]["runs"].as_array().is_some_and(|r| r.len() == 2)).then_some(())
    })
    .await
    .expect("the second failure updated the incident");
    let runs = crate::helpers::wait_for(std::time::Duration::from_secs(20), || async {
        let runs = desk.app.runs("playbook=always-fails").await;
        (runs.len() == 2 && runs.iter().all(|r| r["incident"] == 1)).then_some(runs)
    })
    .await
    .expect("each run links to its incident");

    desk.app.post_webhook(&alert("resolved")).await;
    let resolved = crate::helpers::wait_for(std::time::Duration::from_secs(20), || async {
        let (_, i) = desk.call(Method::GET, "/api/v1/incidents/1", None).await;
        (i["state"] == "RESOLVED").then_some(i)
    })
    .await
    .expect("the alert's resolution resolved the incident");
    assert_eq!(resolved["resolved_by"], "reactor");

    let report = desk
        .app
        .client
        .get(desk.app.url("/api/v1/incidents/1/report"))
        .bearer_auth("desk-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for run in &runs {
        let id = run["id"].as_str().unwrap();
        assert!(
            report.contains(&format!("### Run {id} (always-fails): failed")),
            "{id} missing:\n{report}"
        );
    }
    assert!(report.contains("step clean attempt 1"), "{report}");
    assert!(
        report.contains("failed: ") && report.contains("disk still full"),
        "{report}"
    );
    assert!(
        report.contains("- page to hook:"),
        "the notifications are listed:\n{report}"
    );
    desk.app.stop().await;
}

#[tokio::test]
async fn reactor_incidents_lists_claims_resolves_and_reports() {
    let served = Served::start().await;
    let (dir, port, config) = (&served.dir, served.port, served.config.as_str());
    let resp = crate::helpers::client()
        .put(format!("http://127.0.0.1:{port}/api/v1/incidents"))
        .bearer_auth("tok")
        .json(&nagios("cli"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let cli = |args: &[&str]| {
        let mut all = vec!["--config", config, "incidents"];
        all.extend_from_slice(args);
        crate::helpers::run_binary(&all, dir.path())
    };
    let (code, out, err) = cli(&["--state", "OPEN"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "1\tOPEN\tCRIT\tathens\tathens: HTTP 502 on /login"
    );
    let (code, out, _) = cli(&["claim", "1", "--by", "alice"]);
    assert_eq!(
        (code, out.trim()),
        (0, "1\tCLAIMED\tCRIT\tathens\tathens: HTTP 502 on /login")
    );
    let (code, _, err) = cli(&["claim", "1", "--by", "bob"]);
    assert_eq!(code, 2);
    assert!(err.contains("409") && err.contains("is CLAIMED"), "{err}");
    let (code, out, _) = cli(&["resolve", "1", "--by", "alice"]);
    assert_eq!(code, 0);
    assert!(out.contains("RESOLVED"), "{out}");
    let (code, out, _) = cli(&["report", "1"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("# Incident 1: athens: HTTP 502 on /login"),
        "{out}"
    );
    assert!(out.contains("claimed by alice"), "{out}");
    let (code, out, _) = cli(&["show", "1"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["resolved_by"], "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_self_check_opens_an_incident_for_reactors_service_and_resolves_it() {
    let wedge = "name: wedge\nmatch:\n  alertname: Wedge\nsteps:\n  - name: hang\n    timeout: 4s\n    inline: |\n      loop { sleep(200); }\n";
    let dir = PlaybookDir::new(&[("playbooks/wedge.yaml", wedge)]);
    std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
    std::fs::write(
        dir.path().join("oncall/sre.yaml"),
        "teams:\n  - name: sre\nservices:\n  - name: reactor\n    team: sre\n",
    )
    .unwrap();
    let (oncall, books, scripts) = (dir.path().join("oncall"), dir.playbooks(), dir.scripts());
    let app = TestApp::spawn(move |s| {
        s.oncall_dir = oncall;
        s.playbooks_dir = books;
        s.scripts_dir = scripts;
        s.auth.bearer_token = Some("desk-token".into());
        s.incidents.reactor_service = Some("reactor".into());
        s.limits.max_concurrent_runs = 1;
        s.watchdog.heartbeat_interval = std::time::Duration::from_millis(500);
        s.watchdog.stall_after = std::time::Duration::from_secs(1);
    })
    .await;
    let desk = Desk { app, _dir: dir };
    // One worker, busy for 4 s with the first alert: the second waits and the dispatcher check fails.
    let body = crate::helpers::payload(&[("Wedge", "aaa1"), ("Wedge", "bbb2")]);
    assert_eq!(
        desk.app.post_webhook(&body).await.status(),
        StatusCode::ACCEPTED
    );
    let opened = crate::helpers::wait_for(std::time::Duration::from_secs(20), || async {
        desk.all().await.into_iter().next()
    })
    .await
    .expect("the failing self-check opened an incident");
    assert_eq!(opened["service"], "reactor");
    assert_eq!(opened["title"], "reactor self-check dispatcher is failing");
    assert_eq!(opened["severity"], "CRIT");
    let resolved = crate::helpers::wait_for(std::time::Duration::from_secs(30), || async {
        let (_, i) = desk.call(Method::GET, "/api/v1/incidents/1", None).await;
        (i["state"] == "RESOLVED").then_some(i)
    })
    .await
    .expect("the incident resolves when the check passes again");
    assert_eq!(resolved["resolved_by"], "reactor");
    assert_eq!(desk.all().await.len(), 1, "one incident for the episode");
    desk.app.stop().await;
}
