//! The console in a real browser: headless Chromium from Debian's packages, driven through
//! WebDriver (chromedriver) with plain HTTP calls. An on-call signs in with a key, opens an
//! incident created through the API, clicks Claim and sees CLAIMED in the page and the API; then
//! opens the claim link of an email delivered by a real SMTP server and claims through it. The
//! test saves screenshots (desktop and 390 px wide) under `target/`.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::console::Console;
use crate::helpers::{free_port, repo, wait_for, Proc};
use crate::oncall::{seed_oncall, Desk};
use crate::paging_path::Smtp;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver session on a chromedriver of its own.
struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
    _driver: Proc,
}

impl Browser {
    async fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "chromium and chromium-driver are installed (scripts/test.sh installs them)"
        );
        let port = free_port();
        let child = std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Proc { child };
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        wait_for(Duration::from_secs(20), || async {
            let v: Value = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["value"]["ready"] == true).then_some(())
        })
        .await
        .expect("chromedriver is ready");
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--hide-scrollbars",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("a WebDriver session: {created}"))
            .to_owned();
        Browser {
            http,
            session: format!("{base}/session/{id}"),
            _profile: profile,
            _driver: driver,
        }
    }

    /// One WebDriver command: its `value`, or `Err` with the whole answer.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if v["value"]["error"].is_null() {
            Ok(v["value"].clone())
        } else {
            Err(v.to_string())
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let el = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        el[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{el}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the element `css` (on the page loaded after a click) contains `expected`.
    async fn wait_text(&self, css: &str, expected: &str) {
        let found = wait_for(Duration::from_secs(10), || async {
            let query = json!({"using": "css selector", "value": css});
            let el = self
                .try_call(reqwest::Method::POST, "/element", Some(query))
                .await
                .ok()?;
            let id = el[ELEMENT].as_str()?;
            let path = format!("/element/{id}/text");
            let text = self
                .try_call(reqwest::Method::GET, &path, None)
                .await
                .ok()?;
            text.as_str()?.contains(expected).then_some(())
        })
        .await;
        assert!(found.is_some(), "{css} shows {expected:?}");
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn width(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// The claim link in a delivered email (quoted-printable soft breaks undone).
fn claim_link_in(mail: &str) -> Option<String> {
    let mail = mail.replace("=\r\n", "").replace("=\n", "");
    let at = mail.find("Claim the incident: ")? + "Claim the incident: ".len();
    Some(mail[at..].split_whitespace().next()?.to_owned())
}

#[tokio::test]
async fn an_on_call_signs_in_claims_in_the_browser_and_claims_from_an_emailed_link() {
    let smtp = Smtp::start().await;
    let oncall_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        oncall_dir.path().join("devops.yaml"),
        seed_oncall("2027-03-29", "10m").replace("channel: pager", "channel: mail"),
    )
    .unwrap();
    let mail = crate::channels::channels(&format!(
        "mail:\n  type: email\n  smarthost: 127.0.0.1:{}\n  tls: none\n  from: reactor@example.com\n  to: [team@example.com]\n",
        smtp.port
    ));
    let dir = oncall_dir.path().to_owned();
    let desk = Desk::start_with(move |s| {
        s.playbooks_dir = repo().join("playbooks");
        s.scripts_dir = repo().join("scripts");
        s.channels.extend(mail);
        s.oncall_dir = dir;
    })
    .await;
    let c = Console::from(desk);
    let key = c.key("alice", &["read", "incidents:ack"]).await;
    let first = c.desk.open("athens-502").await;
    let run = c.selftest_run("c0ffee00000000b1", "web-1").await;

    let b = Browser::start().await;
    b.goto(&c.desk.app.url("/ui/incidents")).await;
    assert!(b.url().await.ends_with("/ui/login"), "sign-in first");
    b.type_into("#key", &key).await;
    b.click("button[type=submit]").await;
    b.wait_text("h1", "Incidents").await;

    let shots: [(&str, String); 4] = [
        ("incidents", "/ui/incidents".to_owned()),
        ("incident", format!("/ui/incidents/{first}")),
        ("run", format!("/ui/runs/{run}")),
        ("oncall", "/ui/oncall".to_owned()),
    ];
    for (name, path) in &shots {
        b.goto(&c.desk.app.url(path)).await;
        b.screenshot(&format!("{name}-desktop")).await;
    }

    b.goto(&c.desk.app.url(&format!("/ui/incidents/{first}")))
        .await;
    assert_eq!(b.text("#state").await, "OPEN");
    b.click("#claim").await;
    b.wait_text("#state", "CLAIMED").await;
    let api = c.desk.incident(first).await;
    assert_eq!(
        (api["state"].as_str(), api["claimed_by"].as_str()),
        (Some("CLAIMED"), Some("alice"))
    );

    // A second incident pages primary by email; its link claims it.
    let second = c.desk.open("athens-disk").await;
    let link = wait_for(Duration::from_secs(20), || async {
        smtp.messages()
            .iter()
            .filter(|m| m.contains(&format!("incident {second} on athens")))
            .find_map(|m| claim_link_in(m))
    })
    .await
    .expect("an email with a claim link reaches primary");
    assert!(link.starts_with(&c.desk.app.url("/ui/claim/")), "{link}");
    b.goto(&link).await;
    assert_eq!(
        b.text("#state").await,
        "OPEN",
        "opening the link claims nothing"
    );
    b.click("#claim").await;
    b.wait_text("main", "is now CLAIMED by primary").await;
    let api = c.desk.incident(second).await;
    assert_eq!(
        (api["state"].as_str(), api["claimed_by"].as_str()),
        (Some("CLAIMED"), Some("primary"))
    );

    b.width(390, 844).await;
    for (name, path) in &shots {
        b.goto(&c.desk.app.url(path)).await;
        let shot = b.screenshot(&format!("{name}-390")).await;
        assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{shot:?}");
    }
    b.quit().await;
    c.desk.app.stop().await;
}
