//! The commands that talk to the running service: `runs` (the history, read from the database
//! when the service is stopped), `run` and `runs rerun` (runs by hand), and `reload`.

use std::fmt::Write as _;
use std::process::ExitCode;

use super::{fail, RunArgs, RunsArgs, RunsCommand, ServiceArgs};
use crate::app;
use crate::config::Settings;
use crate::history::{Run, RunFilter, Store};

/// Who asks, when the command line does not say.
pub(super) fn asker(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "cli".into())
}

/// Posts `body` to the service's `path`; prints the run started, or fails with the answer.
async fn post_run(
    base: &str,
    token: Option<&str>,
    path: &str,
    body: serde_json::Value,
) -> Result<String, String> {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", base.trim_end_matches('/')))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach reactor at {base}: {e}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(unauthorized());
    }
    if !status.is_success() {
        return Err(format!(
            "{status}: {}",
            v["error"].as_str().unwrap_or_default()
        ));
    }
    Ok(v["run"].as_str().unwrap_or_default().to_owned())
}

pub(super) async fn run_by_hand(settings: Settings, a: RunArgs) -> ExitCode {
    let (base, token) = service(&settings, &a.service);
    let text = if a.alert.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
    } else {
        std::fs::read_to_string(&a.alert)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", a.alert.display())),
    };
    let value: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return fail(format!("{}: not JSON: {e}", a.alert.display())),
    };
    let alerts = match value.get("alerts").and_then(|a| a.as_array()) {
        Some(list) => list.clone(),
        None => vec![value],
    };
    app::install_crypto_provider();
    let by = asker(a.by);
    for alert in alerts {
        let body = serde_json::json!({"playbook": a.playbook, "alert": alert, "by": by, "dryRun": a.dry_run});
        match post_run(&base, token.as_deref(), "/api/v1/runs", body).await {
            Ok(id) => println!("started run {id}"),
            Err(e) => return fail(e),
        }
    }
    ExitCode::SUCCESS
}

/// The service's base URL and token: the flags', or the configured ones.
pub(super) fn service(settings: &Settings, a: &ServiceArgs) -> (String, Option<String>) {
    let base = a.url.clone().unwrap_or_else(|| {
        let mut addr = settings.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        format!("http://{addr}")
    });
    let token = a
        .token
        .clone()
        .or_else(|| settings.auth.bearer_token.clone());
    (base, token)
}

pub(super) async fn reload(settings: Settings, a: ServiceArgs) -> ExitCode {
    let (base, token) = service(&settings, &a);
    app::install_crypto_provider();
    let mut req = reqwest::Client::new().post(format!("{}/-/reload", base.trim_end_matches('/')));
    if let Some(t) = &token {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot reach reactor at {base}: {e}")),
    };
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if status.is_success() {
        println!("reloaded: {} playbook(s) in force", v["playbooks"]);
        return ExitCode::SUCCESS;
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return fail(unauthorized());
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        eprintln!("{}", p.as_str().unwrap_or_default());
    }
    fail(format!(
        "{status}: {}",
        v["error"].as_str().unwrap_or_default()
    ))
}

/// Sends `req` to the service at `base` with `token`; the answer's body on success, else the
/// exit code after saying why (unreachable, 401, or the service's error).
pub(super) async fn send(
    req: reqwest::RequestBuilder,
    token: &Option<String>,
    base: &str,
) -> Result<String, ExitCode> {
    let req = match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = req
        .send()
        .await
        .map_err(|e| fail(format!("cannot reach reactor at {base}: {e}")))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(fail(unauthorized()));
    }
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        return Err(fail(format!(
            "{status}: {}",
            v["error"].as_str().unwrap_or(&text)
        )));
    }
    Ok(text)
}

pub(super) fn unauthorized() -> String {
    "401 Unauthorized: reactor wants its API token; pass --token or set REACTOR_AUTH_TOKEN".into()
}

pub(super) async fn runs(settings: Settings, a: RunsArgs) -> ExitCode {
    let (base, token) = service(&settings, &a.service);
    app::install_crypto_provider();
    if let Some(RunsCommand::Rerun { id, dry_run, by }) = &a.show {
        let body = serde_json::json!({"by": asker(by.clone()), "dryRun": dry_run});
        let path = format!("/api/v1/runs/{id}/rerun");
        return match post_run(&base, token.as_deref(), &path, body).await {
            Ok(run) => {
                println!("started run {run}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let path = match &a.show {
        Some(RunsCommand::Show { id, .. }) => format!("/api/v1/runs/{id}"),
        _ => {
            let mut q = vec![format!("limit={}", a.limit)];
            if let Some(o) = a.outcome {
                q.push(format!("outcome={o}"));
            }
            if let Some(p) = &a.playbook {
                q.push(format!("playbook={}", urlencode(p)));
            }
            if let Some(n) = &a.alertname {
                q.push(format!("alertname={}", urlencode(n)));
            }
            if let Some(m) = &a.mode {
                q.push(format!("mode={m}"));
            }
            format!("/api/v1/runs?{}", q.join("&"))
        }
    };
    let value = match fetch(&base, &path, token.as_deref()).await {
        Ok(Some(v)) => v,
        Ok(None) => match from_database(&settings, &a) {
            Ok(v) => v,
            Err(e) => return fail(e),
        },
        Err(e) => return fail(e),
    };
    let json = a.json || matches!(a.show, Some(RunsCommand::Show { json: true, .. }));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let text = match (&a.show, value) {
        (Some(RunsCommand::Show { .. }), v) => {
            serde_json::from_value::<Run>(v).map(|r| show_run(&r))
        }
        (_, v) => serde_json::from_value::<Vec<Run>>(v).map(|r| runs_table(&r)),
    };
    match text {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("unexpected answer from reactor: {e}")),
    }
}

/// `Ok(None)` when nothing listens there, so the caller reads the database instead.
async fn fetch(
    base: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Option<serde_json::Value>, String> {
    let client = reqwest::Client::new();
    let mut req = client.get(format!("{}{path}", base.trim_end_matches('/')));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(e.to_string()),
        Ok(resp) => {
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(Some(v))
            } else if status == reqwest::StatusCode::UNAUTHORIZED {
                Err(unauthorized())
            } else {
                Err(format!(
                    "{status}: {}",
                    v["error"].as_str().unwrap_or_default()
                ))
            }
        }
    }
}

fn from_database(settings: &Settings, a: &RunsArgs) -> Result<serde_json::Value, String> {
    let store = Store::open(&settings.data_dir)
        .map_err(|e| format!("reactor is not answering and its database cannot be opened: {e}"))?;
    let v = match &a.show {
        Some(RunsCommand::Show { id, .. }) => {
            let id = id.parse()?;
            let run = store
                .get_run(id)
                .map_err(|e| e.to_string())?
                .ok_or(format!("no run {id}"))?;
            serde_json::to_value(run)
        }
        _ => serde_json::to_value(
            store
                .list_runs(&RunFilter {
                    playbook: a.playbook.clone(),
                    outcome: a.outcome,
                    alertname: a.alertname.clone(),
                    mode: a.mode.as_deref().and_then(|m| {
                        serde_json::from_value(serde_json::Value::String(m.to_owned())).ok()
                    }),
                    limit: Some(a.limit),
                })
                .map_err(|e| e.to_string())?,
        ),
    };
    v.map_err(|e| e.to_string())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn runs_table(runs: &[Run]) -> String {
    let mut out = format!(
        "{:<10} {:<20} {:<12} {:<24} {:<28} REASON\n",
        "ID", "RECEIVED", "OUTCOME", "PLAYBOOK", "ALERT"
    );
    for r in runs {
        let received = r.received_at.strftime("%Y-%m-%d %H:%M:%S").to_string();
        let _ = writeln!(
            out,
            "{:<10} {:<20} {:<12} {:<24} {:<28} {}",
            r.id.to_string(),
            received,
            r.outcome.as_str(),
            r.playbook.as_deref().unwrap_or("-"),
            r.alert.alertname(),
            r.reason.as_deref().unwrap_or("")
        );
    }
    out
}

fn show_run(r: &Run) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "run        {}", r.id);
    let verified = if r.verified_at.is_some() {
        " (verified)"
    } else {
        ""
    };
    let _ = writeln!(out, "outcome    {}{verified}", r.outcome);
    if let Some(d) = r.verify_deadline {
        let _ = writeln!(out, "verify by  {d}");
    }
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "reason     {reason}");
    }
    let _ = writeln!(out, "playbook   {}", r.playbook.as_deref().unwrap_or("-"));
    if let Some(m) = &r.manual {
        let dry = if m.dry_run { ", dry run" } else { "" };
        let again = m
            .rerun_of
            .map(|id| format!(", re-running {id}"))
            .unwrap_or_default();
        let _ = writeln!(out, "asked by   {}{dry}{again}", m.by);
    }
    let _ = writeln!(
        out,
        "alert      {} ({}) fingerprint {} startsAt {}",
        r.alert.alertname(),
        r.alert.status,
        r.alert.fingerprint,
        r.alert.starts_at
    );
    let labels: Vec<String> = r
        .alert
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    let _ = writeln!(out, "labels     {{{}}}", labels.join(", "));
    let _ = writeln!(out, "received   {}", r.received_at);
    if let Some(t) = r.started_at {
        let _ = writeln!(out, "started    {t}");
    }
    if let Some(t) = r.finished_at {
        let _ = writeln!(out, "finished   {t}");
    }
    for s in &r.steps {
        let _ = writeln!(
            out,
            "step       {} attempt {}: {} in {} ms (started {})",
            s.name,
            s.attempt,
            if s.succeeded { "succeeded" } else { "failed" },
            s.duration_ms,
            s.started_at
        );
        if let Some(e) = &s.error {
            let _ = writeln!(out, "  error    {e}");
        }
        if let Some(o) = &s.output {
            let _ = writeln!(out, "  output   {o}");
        }
        for l in &s.logs {
            let _ = writeln!(out, "  log      {l}");
        }
        for c in &s.changes {
            let ns = if c.namespace.is_empty() {
                String::new()
            } else {
                format!(" -n {}", c.namespace)
            };
            let dry = if c.dry_run { " (dry run)" } else { "" };
            let detail = if c.detail.is_null() {
                String::new()
            } else {
                format!(" {}", c.detail)
            };
            let _ = writeln!(
                out,
                "  change   {} {}{ns}{dry}: {}{detail}",
                c.verb, c.object, c.result
            );
        }
    }
    if let Some(e) = &r.escalation {
        let _ = writeln!(
            out,
            "escalated  {} {} after {} attempt(s) at {}{}",
            e.alertname,
            e.status.as_str(),
            e.attempts,
            e.at,
            e.last_error
                .as_deref()
                .map(|x| format!(" (last error: {x})"))
                .unwrap_or_default()
        );
        if let Some(t) = e.resolved_at {
            let _ = writeln!(out, "resolved   page resolved at {t}");
        }
    }
    if !r.timeline.is_empty() {
        let _ = writeln!(out, "timeline");
        for e in &r.timeline {
            let _ = writeln!(out, "  {}  {}", e.at, e.event);
        }
    }
    out
}
