//! On-call and escalation, end to end: an incident PUT by a monitoring system reaches today's
//! on-call at once and the escalation contact after the level's timeout unless someone claims it;
//! an escalation that comes due while reactor is killed fires once after the restart; `reactor
//! oncall --at` names the right person on both sides of a daylight-saving change, and an
//! override wins over the rotation.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use reactor::clock::ManualClock;
use reactor::config::Settings;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::channels::channels;
use crate::helpers::{
    client, free_port, get_json, run_binary, spawn_binary, wait_for, wait_healthy, Capture,
    PlaybookDir, TestApp,
};

/// The seed's team: `primary` on call today by the calendar, `manager` the escalation contact,
/// a 10-minute wait for a claim, every person reached on the `pager` webhook.
pub fn seed_oncall(today: &str, level_1_timeout: &str) -> String {
    format!(
        "people:
  - name: primary
    contacts: [{{channel: pager, address: primary@example.com}}]
  - name: manager
    contacts: [{{channel: pager, address: manager@example.com}}]
teams:
  - name: devops
    schedule:
      time_zone: UTC
      calendar:
        - {{date: {today}, oncall: primary, escalation_contact: manager}}
    policy:
      levels:
        - {{notify: [oncall], timeout: {level_1_timeout}}}
        - {{notify: [escalation_contact]}}
services:
  - name: athens
    team: devops
"
    )
}

/// Writes the seed's team with today (UTC) on its calendar to `dir`/oncall; returns that
/// directory.
pub fn write_seed_oncall(dir: &std::path::Path, level_1_timeout: &str) -> std::path::PathBuf {
    let oncall = dir.join("oncall");
    std::fs::create_dir_all(&oncall).unwrap();
    let today = Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).date();
    std::fs::write(
        oncall.join("devops.yaml"),
        seed_oncall(&today.to_string(), level_1_timeout),
    )
    .unwrap();
    oncall
}

/// The pages of incident `number` that reached `person` on the webhook channel.
pub fn pages_to(capture: &Capture, number: u64, person: &str) -> usize {
    capture
        .notifications("ReactorIncident")
        .iter()
        .filter(|b| {
            let labels = &b["alerts"][0]["labels"];
            labels["incident"].as_str() == Some(number.to_string().as_str())
                && labels["person"] == person
                && b["status"] == "firing"
        })
        .count()
}

pub async fn wait_for_page(capture: &Capture, number: u64, person: &str) {
    wait_for(Duration::from_secs(10), || async {
        (pages_to(capture, number, person) > 0).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("no page of incident {number} reached {person}"));
}

/// Long enough for the escalation loop (it looks at the clock every 200 ms) and the outbox to
/// have sent anything that was due: a page that has not arrived by then was not sent.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

pub struct Desk {
    pub app: TestApp,
    pub clock: ManualClock,
    pub pager: Capture,
    _dir: PlaybookDir,
}

impl Desk {
    pub async fn start() -> Desk {
        Self::start_with(|_| {}).await
    }

    /// The seed's desk, then `configure` (the console's tests load the shipped playbooks).
    pub async fn start_with(configure: impl FnOnce(&mut Settings) + Send + 'static) -> Desk {
        let clock = ManualClock::new("2027-03-29T08:00:00Z".parse().unwrap());
        let pager = Capture::start().await;
        let dir = PlaybookDir::new(&[]);
        std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
        std::fs::write(
            dir.path().join("oncall/devops.yaml"),
            seed_oncall("2027-03-29", "10m"),
        )
        .unwrap();
        let chans = channels(&format!(
            "pager:\n  type: webhook\n  url: {}/\n",
            pager.url()
        ));
        let (oncall, books, scripts) = (dir.path().join("oncall"), dir.playbooks(), dir.scripts());
        let app = TestApp::spawn_with_clock(
            move |s| {
                s.oncall_dir = oncall;
                s.playbooks_dir = books;
                s.scripts_dir = scripts;
                s.channels = chans;
                s.auth.bearer_token = Some("desk-token".into());
                configure(s);
            },
            Arc::new(clock.clone()),
        )
        .await;
        Desk {
            app,
            clock,
            pager,
            _dir: dir,
        }
    }

    pub async fn call(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.bearer_auth("desk-token").send().await.unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn open(&self, dedup: &str) -> u64 {
        let (status, incident) = self
            .call(
                self.app
                    .client
                    .put(self.app.url("/api/v1/incidents"))
                    .json(&json!({
                "service": "athens", "severity": "CRIT", "title": "athens: HTTP 502 on /login",
                "source": "nagios", "dedup_key": dedup})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{incident}");
        incident["number"].as_u64().unwrap()
    }

    /// `POST /api/v1/incidents/{number}` with `action` by `by`: the status.
    pub async fn act(&self, number: u64, action: &str, by: &str) -> StatusCode {
        let url = self.app.url(&format!("/api/v1/incidents/{number}"));
        let req = self
            .app
            .client
            .post(url)
            .json(&json!({"action": action, "by": by}));
        self.call(req).await.0
    }

    pub async fn incident(&self, number: u64) -> Value {
        self.call(
            self.app
                .client
                .get(self.app.url(&format!("/api/v1/incidents/{number}"))),
        )
        .await
        .1
    }
}

#[tokio::test]
async fn the_on_call_is_paged_at_once_and_the_escalation_contact_at_ten_minutes_not_at_nine_fifty_nine(
) {
    let desk = Desk::start().await;
    let n = desk.open("athens-502").await;
    wait_for_page(&desk.pager, n, "primary").await;
    assert_eq!(pages_to(&desk.pager, n, "manager"), 0);

    desk.clock.advance(Duration::from_secs(9 * 60 + 59));
    settle().await;
    assert_eq!(
        pages_to(&desk.pager, n, "manager"),
        0,
        "nothing for manager at 9m59s"
    );

    desk.clock.advance(Duration::from_secs(1));
    wait_for_page(&desk.pager, n, "manager").await;
    settle().await;
    assert_eq!(pages_to(&desk.pager, n, "primary"), 1, "primary paged once");
    assert_eq!(pages_to(&desk.pager, n, "manager"), 1, "manager paged once");

    let incident = desk.incident(n).await;
    let events: Vec<(&str, &str)> = incident["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["by"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        events,
        [
            ("created", "nagios"),
            ("notified", "primary"),
            ("escalated", "reactor"),
            ("notified", "manager"),
        ],
        "{incident}"
    );
    assert_eq!(incident["escalation"]["level"], 2);
    let page = &desk.pager.notifications("ReactorIncident")[0];
    assert_eq!(
        page["alerts"][0]["annotations"]["incident_url"],
        desk.app.url(&format!("/ui/incidents/{n}")),
        "the page links to the incident"
    );
    let metrics = desk.app.metrics().await;
    for line in [
        "reactor_incident_escalations_total{level=\"1\"} 1",
        "reactor_incident_escalations_total{level=\"2\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    desk.app.stop().await;
}

#[tokio::test]
async fn a_claim_at_five_minutes_means_the_escalation_contact_is_never_paged() {
    let desk = Desk::start().await;
    let n = desk.open("athens-disk").await;
    wait_for_page(&desk.pager, n, "primary").await;

    desk.clock.advance(Duration::from_secs(5 * 60));
    let (status, claimed) = desk
        .call(
            desk.app
                .client
                .post(desk.app.url(&format!("/api/v1/incidents/{n}")))
                .json(&json!({"action": "claim", "by": "primary"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{claimed}");
    assert!(
        claimed["escalation"].get("due").is_none(),
        "no step pending: {claimed}"
    );

    desk.clock.advance(Duration::from_secs(60 * 60));
    settle().await;
    assert_eq!(
        pages_to(&desk.pager, n, "manager"),
        0,
        "manager never paged"
    );
    assert_eq!(pages_to(&desk.pager, n, "primary"), 1);
    let incident = desk.incident(n).await;
    assert!(
        !incident["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "escalated"),
        "{incident}"
    );
    desk.app.stop().await;
}

#[tokio::test]
async fn an_escalation_due_while_reactor_is_killed_fires_once_after_the_restart() {
    let pager = Capture::start().await;
    let dir = PlaybookDir::new(&[]);
    std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
    // Level 1 waits 3 s: long enough to kill reactor before it is due.
    write_seed_oncall(dir.path(), "3s");
    let port = free_port();
    let config = dir.binary_config(
        port,
        "kill-token",
        &format!(
            "oncall_dir: {}\nchannels:\n  pager:\n    type: webhook\n    url: {}/\n",
            dir.path().join("oncall").display(),
            pager.url()
        ),
    );
    let config = config.display().to_string();
    let mut reactor = spawn_binary(&["--config", &config, "serve"], dir.path());
    wait_healthy(port).await;
    let base = format!("http://127.0.0.1:{port}");
    let created: Value = get_json(
        client()
            .put(format!("{base}/api/v1/incidents"))
            .bearer_auth("kill-token")
            .json(&json!({"service": "athens", "severity": "ERR", "title": "queue stuck"})),
    )
    .await;
    let fetch = |n: u64| {
        get_json::<Value>(
            client()
                .get(format!("{base}/api/v1/incidents/{n}"))
                .bearer_auth("kill-token"),
        )
    };
    let n = created["number"].as_u64().unwrap();
    wait_for_page(&pager, n, "primary").await;
    let incident = fetch(n).await;
    let due: Timestamp = incident["escalation"]["due"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    reactor.kill(); // SIGKILL
    let left = due.as_millisecond() - Timestamp::now().as_millisecond();
    assert!(left > 0, "killed before level 2 was due");
    tokio::time::sleep(Duration::from_millis(left as u64 + 500)).await;
    assert_eq!(
        pages_to(&pager, n, "manager"),
        0,
        "nobody escalates while reactor is down"
    );

    let _reactor = spawn_binary(&["--config", &config, "serve"], dir.path());
    wait_healthy(port).await;
    wait_for_page(&pager, n, "manager").await;
    settle().await;
    assert_eq!(pages_to(&pager, n, "manager"), 1, "fired once");
    assert_eq!(pages_to(&pager, n, "primary"), 1, "level 1 not sent again");
    let incident = fetch(n).await;
    let escalated = incident["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "escalated")
        .count();
    assert_eq!(escalated, 1, "{incident}");
}

const ROTATION: &str = "people:
  - name: alice
  - name: bob
  - name: carol
  - name: dave
teams:
  - name: devops
    schedule:
      time_zone: Europe/Berlin
      rotations:
        - {name: primary, shift: daily, handoff: '09:00', start: 2027-03-25, participants: [alice, bob, carol]}
      overrides:
        - {person: dave, from: '2027-03-29T12:00', to: '2027-03-29T14:00'}
    policy:
      levels:
        - {notify: [oncall], timeout: 5m}
services:
  - name: athens
    team: devops
";

#[test]
fn reactor_oncall_at_names_the_hand_off_at_local_time_across_daylight_saving_and_the_override() {
    let dir = PlaybookDir::new(&[]);
    std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
    std::fs::write(dir.path().join("oncall/devops.yaml"), ROTATION).unwrap();
    // `oncall/` beside the working directory is the default on-call directory.
    let who = |at: &str| {
        let (code, out, err) = run_binary(&["oncall", "devops", "--at", at], dir.path());
        assert_eq!(code, 0, "{err}");
        out
    };
    // Berlin moves from UTC+1 to UTC+2 on 2027-03-28 at 01:00 UTC; the hand-off stays at 09:00
    // local time, so it moves from 08:00 to 07:00 UTC.
    let cases = [
        ("2027-03-27T07:59:00Z", "on call: bob (rotation primary"),
        ("2027-03-27T08:00:00Z", "on call: carol (rotation primary"),
        ("2027-03-28T06:59:00Z", "on call: carol (rotation primary"),
        ("2027-03-28T07:00:00Z", "on call: alice (rotation primary"),
        ("2027-03-28T07:30:00Z", "on call: alice (rotation primary"),
        ("2027-03-29T09:30", "on call: bob (rotation primary"),
        ("2027-03-29T12:30", "on call: dave (override"),
        ("2027-03-29T14:00", "on call: bob (rotation primary"),
    ];
    for (at, expected) in cases {
        let out = who(at);
        assert!(
            out.contains(expected),
            "--at {at}: expected {expected:?} in\n{out}"
        );
    }
    let out = who("2027-03-28T07:30:00Z");
    assert!(out.contains("2027-03-28 09:30 CEST (+02:00)"), "{out}");
    assert!(
        out.contains("level 1 (then 5m): alice (rotation primary"),
        "{out}"
    );
}
