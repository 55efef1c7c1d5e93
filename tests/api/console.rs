//! The web console through HTTP, as a browser without JavaScript uses it: every page needs a
//! session and renders with one; every form refuses a missing or wrong CSRF token and a key
//! without the scope, changing nothing; a `<script>` in a label or a title stays text; a claim
//! link opens without signing in, and one that is expired, tampered with or used after the
//! incident resolved says so and changes nothing.

use std::time::Duration;

use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{payload, repo};
use crate::oncall::{wait_for_page, Desk};

/// `application/x-www-form-urlencoded`, as a browser posts a form.
pub fn form_body(form: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    form.iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A client that shows redirects instead of following them.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub struct Page {
    pub status: StatusCode,
    pub body: String,
    pub location: Option<String>,
}

pub struct Console {
    pub desk: Desk,
    http: reqwest::Client,
}

impl From<Desk> for Console {
    fn from(desk: Desk) -> Console {
        Console {
            desk,
            http: browser(),
        }
    }
}

impl Console {
    pub async fn start() -> Console {
        let desk = Desk::start_with(|s| {
            s.playbooks_dir = repo().join("playbooks");
            s.scripts_dir = repo().join("scripts");
        })
        .await;
        Console {
            desk,
            http: browser(),
        }
    }

    /// A new API key with `scopes`.
    pub async fn key(&self, name: &str, scopes: &[&str]) -> String {
        let (status, made) = self
            .desk
            .call(
                self.desk
                    .app
                    .client
                    .post(self.desk.app.url("/api/v1/keys"))
                    .json(&json!({"name": name, "scopes": scopes})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{made}");
        made["key"].as_str().unwrap().to_owned()
    }

    async fn page(&self, req: reqwest::RequestBuilder) -> Page {
        let resp = req.send().await.unwrap();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_owned());
        Page {
            status: resp.status(),
            location,
            body: resp.text().await.unwrap(),
        }
    }

    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Page {
        let mut req = self.http.get(self.desk.app.url(path));
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.page(req).await
    }

    pub async fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Page {
        let mut req = self
            .http
            .post(self.desk.app.url(path))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form_body(form));
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.page(req).await
    }

    /// Posts a `ReactorSelfTestOk` alert (the shipped playbook echoes its `instance`) and
    /// returns the id of its succeeded run.
    pub async fn selftest_run(&self, fingerprint: &str, instance: &str) -> String {
        let mut body = payload(&[("ReactorSelfTestOk", fingerprint)]);
        body["alerts"][0]["labels"]["instance"] = Value::String(instance.into());
        assert_eq!(self.desk.app.post_webhook(&body).await.status(), 202);
        let runs = self
            .desk
            .app
            .wait_for_runs("", Duration::from_secs(10), |r| {
                r.iter().any(|x| x["outcome"] == "succeeded")
            })
            .await;
        runs[0]["id"].as_str().unwrap().to_owned()
    }

    /// Signs in with `key`: the session cookie.
    pub async fn sign_in(&self, key: &str) -> String {
        let resp = self
            .http
            .post(self.desk.app.url("/ui/login"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form_body(&[("key", key)]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        let cookie = resp
            .headers()
            .get(header::SET_COOKIE)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        for attribute in ["HttpOnly", "SameSite=Strict", "Max-Age=43200", "Path=/ui"] {
            assert!(cookie.contains(attribute), "{attribute} in {cookie}");
        }
        cookie.split(';').next().unwrap().to_owned()
    }
}

/// The CSRF token of the page's first form.
pub fn csrf(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn every_page_needs_a_session_and_renders_with_one() {
    let c = Console::start().await;
    let n = c.desk.open("athens-502").await;
    let run = c.selftest_run("c0ffee0000000001", "test-host").await;
    let pages = [
        ("/ui/incidents".to_owned(), "<h1>Incidents</h1>"),
        (format!("/ui/incidents/{n}"), "athens: HTTP 502 on"),
        (format!("/ui/incidents/{n}/report"), "# Incident 1"),
        ("/ui/runs".to_owned(), "Runs per hour by outcome"),
        (format!("/ui/runs/{run}"), "say-hello"),
        (
            "/ui/oncall".to_owned(),
            "On call now: <strong class=\"oncall\">primary (calendar)",
        ),
        ("/ui/playbooks".to_owned(), "reactor-selftest-ok"),
        ("/ui/health".to_owned(), "Self-checks"),
    ];
    for (path, _) in &pages {
        let p = c.get(path, None).await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{path} without a session");
        assert_eq!(p.location.as_deref(), Some("/ui/login"), "{path}");
    }
    let forged = c
        .get("/ui/incidents", Some("reactor_session=eyJ9.AAAA"))
        .await;
    assert_eq!(
        forged.status,
        StatusCode::SEE_OTHER,
        "a forged cookie is no session"
    );

    let wrong = c.post("/ui/login", None, &[("key", "not-a-key")]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("That key is not known"));

    let key = c.key("viewer", &["read"]).await;
    let cookie = c.sign_in(&key).await;
    for (path, expected) in &pages {
        let p = c.get(path, Some(&cookie)).await;
        assert_eq!(p.status, StatusCode::OK, "{path}: {}", p.body);
        assert!(
            p.body.contains(expected),
            "{expected:?} on {path}:\n{}",
            p.body
        );
    }
    let css = c.get("/ui/console.css", None).await;
    assert_eq!(css.status, StatusCode::OK);
    let missing = c.get("/ui/incidents/999", Some(&cookie)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    c.desk.app.stop().await;
}

#[tokio::test]
async fn forms_refuse_a_wrong_csrf_token_or_a_key_without_the_scope_and_change_nothing() {
    let c = Console::start().await;
    let n = c.desk.open("athens-disk").await;
    let path = format!("/ui/incidents/{n}");
    let viewer = c.sign_in(&c.key("viewer", &["read"]).await).await;
    let oncall = c
        .sign_in(&c.key("oncall", &["read", "incidents:ack"]).await)
        .await;

    let viewer_page = c.get(&path, Some(&viewer)).await;
    assert!(
        !viewer_page.body.contains("id=\"claim\""),
        "no Claim button without incidents:ack"
    );
    let viewer_csrf = csrf(&viewer_page.body);
    let token = csrf(&c.get(&path, Some(&oncall)).await.body);
    assert_ne!(token, viewer_csrf, "each session has its own token");

    for (cookie, form, status) in [
        (&oncall, vec![("action", "claim")], StatusCode::FORBIDDEN),
        (
            &oncall,
            vec![("action", "claim"), ("csrf", viewer_csrf.as_str())],
            StatusCode::FORBIDDEN,
        ),
        (
            &viewer,
            vec![("action", "claim"), ("csrf", viewer_csrf.as_str())],
            StatusCode::FORBIDDEN,
        ),
    ] {
        let p = c.post(&path, Some(cookie), &form).await;
        assert_eq!(p.status, status, "{form:?}: {}", p.body);
        assert_eq!(
            c.desk.incident(n).await["state"],
            "OPEN",
            "nothing changed after {form:?}"
        );
    }
    let refused = c.post(&path, None, &[("action", "claim")]).await;
    assert_eq!(
        refused.status,
        StatusCode::SEE_OTHER,
        "no session, no change"
    );

    let note = c
        .post(
            &path,
            Some(&oncall),
            &[("action", "note"), ("note", "looking"), ("csrf", &token)],
        )
        .await;
    assert_eq!(note.status, StatusCode::SEE_OTHER, "{}", note.body);
    let claimed = c
        .post(
            &path,
            Some(&oncall),
            &[("action", "claim"), ("csrf", &token)],
        )
        .await;
    assert_eq!(claimed.status, StatusCode::SEE_OTHER);
    let incident = c.desk.incident(n).await;
    assert_eq!(
        (incident["state"].as_str(), incident["claimed_by"].as_str()),
        (Some("CLAIMED"), Some("oncall"))
    );
    let again = c
        .post(
            &path,
            Some(&oncall),
            &[("action", "claim"), ("csrf", &token)],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(again.body.contains("is CLAIMED: it cannot be claimed"));

    // A form another site posts is refused, even with the right token.
    let forged = c
        .http
        .post(c.desk.app.url(&path))
        .header(header::COOKIE, &oncall)
        .header("sec-fetch-site", "cross-site")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form_body(&[("action", "resolve"), ("csrf", &token)]))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(c.desk.incident(n).await["state"], "CLAIMED");

    let out = c.post("/ui/logout", Some(&oncall), &[]).await;
    assert_eq!(
        out.status,
        StatusCode::FORBIDDEN,
        "sign-out needs the token too"
    );
    let out = c
        .post("/ui/logout", Some(&oncall), &[("csrf", &token)])
        .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);

    // Revoking a key ends the sessions it opened.
    assert_eq!(c.get(&path, Some(&viewer)).await.status, StatusCode::OK);
    let (status, _) = c
        .desk
        .call(
            c.desk
                .app
                .client
                .delete(c.desk.app.url("/api/v1/keys/viewer")),
        )
        .await;
    assert!(status.is_success(), "{status}");
    let gone = c.get(&path, Some(&viewer)).await;
    assert_eq!(
        gone.status,
        StatusCode::SEE_OTHER,
        "a revoked key's session is over"
    );
    c.desk.app.stop().await;
}

#[tokio::test]
async fn a_script_in_a_label_or_a_title_is_shown_as_text_on_every_page() {
    let c = Console::start().await;
    let script = "<script>alert(1)</script>";
    let (status, incident) = c
        .desk
        .call(c.desk.app.client.put(c.desk.app.url("/api/v1/incidents")).json(
            &json!({"service": "athens", "severity": "WARN", "title": script, "message": script, "source": script}),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{incident}");
    let run = c.selftest_run("c0ffee0000000002", script).await;
    let cookie = c.sign_in(&c.key("viewer", &["read"]).await).await;
    for path in [
        "/ui/incidents".to_owned(),
        "/ui/incidents/1".to_owned(),
        "/ui/incidents/1/report".to_owned(),
        "/ui/runs".to_owned(),
        format!("/ui/runs/{run}"),
    ] {
        let p = c.get(&path, Some(&cookie)).await;
        assert_eq!(p.status, StatusCode::OK, "{path}");
        assert!(
            !p.body.contains("<script"),
            "a live script on {path}:\n{}",
            p.body
        );
        assert!(p.body.contains("&lt;script&gt;"), "the text on {path}");
    }
    c.desk.app.stop().await;
}

/// The claim link of the first page that reached `person` for incident `n`.
pub fn claim_link(desk: &Desk, n: u64, person: &str) -> String {
    desk.pager
        .notifications("ReactorIncident")
        .iter()
        .find(|b| {
            let l = &b["alerts"][0]["labels"];
            l["incident"].as_str() == Some(n.to_string().as_str()) && l["person"] == person
        })
        .map(|b| {
            b["alerts"][0]["annotations"]["claim_url"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .expect("a page with a claim link")
}

#[tokio::test]
async fn a_claim_link_claims_once_and_an_expired_tampered_or_late_one_changes_nothing() {
    let c = Console::start().await;
    let n = c.desk.open("athens-502").await;
    wait_for_page(&c.desk.pager, n, "primary").await;
    let link = claim_link(&c.desk, n, "primary");
    let path = link
        .strip_prefix(&c.desk.app.url(""))
        .expect("the link points at this reactor")
        .to_owned();
    assert!(path.starts_with("/ui/claim/"), "{path}");

    let shown = c.get(&path, None).await;
    assert_eq!(shown.status, StatusCode::OK, "no sign-in needed");
    assert!(
        shown.body.contains("id=\"claim\"")
            && shown.body.contains("Claim as <strong>primary</strong>"),
        "{}",
        shown.body
    );
    assert_eq!(
        c.desk.incident(n).await["state"],
        "OPEN",
        "a GET changes nothing"
    );

    let tampered = format!("{}x", path);
    for bad in [tampered.as_str(), "/ui/claim/abc.def"] {
        let p = c.get(bad, None).await;
        assert_eq!(p.status, StatusCode::GONE);
        assert!(p.body.contains("this link is not valid"), "{}", p.body);
        let p = c.post(bad, None, &[("by", "mallory"), ("csrf", "x")]).await;
        assert_eq!(p.status, StatusCode::GONE);
    }
    let no_token = c.post(&path, None, &[("by", "mallory")]).await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    assert_eq!(c.desk.incident(n).await["state"], "OPEN");

    let claimed = c
        .post(
            &path,
            None,
            &[("by", "primary"), ("csrf", &csrf(&shown.body))],
        )
        .await;
    assert_eq!(claimed.status, StatusCode::OK, "{}", claimed.body);
    assert!(claimed.body.contains("is now CLAIMED by primary"));
    let again = c
        .post(
            &path,
            None,
            &[("by", "primary"), ("csrf", &csrf(&shown.body))],
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    // Resolved: the link shows it and cannot claim.
    assert_eq!(c.desk.act(n, "resolve", "primary").await, StatusCode::OK);
    let late = c.get(&path, None).await;
    assert!(late
        .body
        .contains("This incident is RESOLVED: it cannot be claimed"));

    // Reopened: a link of the earlier opening claims nothing.
    assert_eq!(c.desk.act(n, "reopen", "primary").await, StatusCode::OK);
    let stale = c.get(&path, None).await;
    assert_eq!(stale.status, StatusCode::GONE);
    assert!(stale.body.contains("was reopened"), "{}", stale.body);
    let stale = c
        .post(
            &path,
            None,
            &[("by", "primary"), ("csrf", &csrf(&shown.body))],
        )
        .await;
    assert_eq!(stale.status, StatusCode::GONE);
    assert_eq!(c.desk.incident(n).await["state"], "OPEN");

    // A day later the link has expired.
    c.desk.clock.advance(Duration::from_secs(24 * 3600));
    let expired = c.get(&path, None).await;
    assert_eq!(expired.status, StatusCode::GONE);
    assert!(
        expired.body.contains("this link expired at"),
        "{}",
        expired.body
    );
    assert_eq!(c.desk.incident(n).await["state"], "OPEN");
    c.desk.app.stop().await;
}
