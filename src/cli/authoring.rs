//! The authoring commands, which work on files and need no running service: `check` (every
//! problem of every playbook, and warnings for steps that can only fail) and `test` (which
//! playbooks an alert would run).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{fail, CheckArgs, TestArgs};
use crate::app;
use crate::config::Settings;
use crate::domain::decode_webhook;
use crate::playbook::{self, render_params, TemplateContext};

/// `check DIR` looks for scripts beside DIR first, so `reactor check some/playbooks` works.
fn dirs(settings: &Settings, dir: Option<PathBuf>, scripts: Option<PathBuf>) -> (PathBuf, PathBuf) {
    let sibling = dir
        .as_deref()
        .and_then(Path::parent)
        .map(|p| p.join("scripts"))
        .filter(|p| p.is_dir());
    let scripts = scripts
        .or(sibling)
        .unwrap_or_else(|| settings.scripts_dir.clone());
    (
        dir.unwrap_or_else(|| settings.playbooks_dir.clone()),
        scripts,
    )
}

pub(super) fn check(settings: Settings, a: CheckArgs) -> ExitCode {
    let (dir, scripts) = dirs(&settings, a.dir, a.scripts);
    let loaded = playbook::load_dir(&dir, &scripts, &app::rhai_engine(&settings, None))
        .and_then(|p| p.check_routes(&settings.channel_names()).map(|()| p));
    // The on-call files are checked with the playbooks.
    let oncall = crate::incident::oncall::load_dir(&settings.oncall_dir).and_then(|o| {
        o.check_channels(&settings.channel_names(), |c| {
            settings.channel_needs_address(c)
        })
        .map(|()| o)
    });
    let loaded = match (loaded, oncall) {
        (Ok(p), Ok(o)) => {
            let services: Vec<&str> = o.services.keys().map(String::as_str).collect();
            let approvers = o.approvers();
            let approvers: Vec<&str> = approvers.iter().map(String::as_str).collect();
            if let Err(e) = p.check_services(&services, &approvers) {
                for e in &e.0 {
                    eprintln!("{e}");
                }
                eprintln!("{} problem(s) found", e.0.len());
                return ExitCode::FAILURE;
            }
            if !o.services.is_empty() || !o.people.is_empty() {
                println!(
                    "ok: {} service(s) of {} team(s) in {}; {} person(s), {} team(s) with an escalation policy",
                    o.services.len(),
                    o.teams.len(),
                    settings.oncall_dir.display(),
                    o.people.len(),
                    o.teams.values().filter(|t| t.policy.is_some()).count(),
                );
            }
            Ok(p)
        }
        (Ok(_), Err(e)) => Err(e),
        (Err(mut e), Err(o)) => {
            e.0.extend(o.0);
            Err(e)
        }
        (Err(e), Ok(_)) => Err(e),
    };
    match loaded {
        Ok(p) => {
            println!(
                "ok: {} playbook(s) in {}, scripts from {}",
                p.len(),
                dir.display(),
                scripts.display()
            );
            println!("channels: {}", settings.channel_names().join(", "));
            let warnings =
                playbook::lint::warnings(p.iter().map(|p| &**p), &capabilities(&settings));
            for w in &warnings {
                eprintln!("{w}");
            }
            if warnings.is_empty() {
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "{} warning(s): these steps can only fail under the configuration in force",
                warnings.len()
            );
            if a.strict {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} problem(s) found", errors.0.len());
            ExitCode::FAILURE
        }
    }
}

/// What the configuration lets steps reach, for `check`'s warnings.
fn capabilities(settings: &Settings) -> playbook::lint::Capabilities {
    playbook::lint::Capabilities {
        cluster: !settings.kubernetes.kubeconfig.is_empty() || settings.kubernetes.in_cluster,
        cleanup_roots: !settings.disk_cleanup.allowed_roots.is_empty(),
        exec_allow: settings.exec.allow.clone(),
        http_allow: settings
            .http
            .allow
            .iter()
            .filter_map(|p| crate::config::url_prefix(p).ok())
            .collect(),
    }
}

pub(super) async fn test(settings: Settings, a: TestArgs) -> ExitCode {
    let (dir, scripts) = dirs(&settings, a.playbooks, a.scripts);
    let rhai = app::rhai_engine(&settings, None);
    let playbooks = match playbook::load_dir(&dir, &scripts, &rhai) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let body = if a.alert.as_os_str() == "-" {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut s).map(|_| s)
    } else {
        std::fs::read(&a.alert)
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return fail(format!("{}: {e}", a.alert.display())),
    };
    let notification = match decode_webhook(&as_webhook(body)) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("{}: {e}", a.alert.display());
            return ExitCode::FAILURE;
        }
    };
    // `--run`: every step of the playbooks that would run, once, as a dry run, with no cluster.
    let executor = a.run.then(|| {
        crate::executor::Executor::new(std::sync::Arc::new(rhai), true, None)
            .with_exec(app::helpers(&settings, None).exec)
    });
    let mut out = String::new();
    for (i, alert) in notification.alerts.iter().enumerate() {
        let labels: Vec<String> = alert
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        let _ = writeln!(
            out,
            "alert[{i}] {} ({}) {{{}}}",
            alert.alertname(),
            alert.status,
            labels.join(", ")
        );
        let matched = playbooks.matching(alert);
        if matched.is_empty() {
            let _ = writeln!(out, "  no playbook matches: recorded as skipped");
        }
        // Why the playbooks for this alertname do not match: the first matcher that fails.
        for p in playbooks.iter() {
            if p.alertname.as_deref() != Some(alert.alertname()) || p.matches(alert) {
                continue;
            }
            if let Some(m) = p.matchers.iter().find(|m| !m.matches(&alert.labels)) {
                let value = alert
                    .labels
                    .get(m.name())
                    .map_or_else(|| "is not set".to_owned(), |v| format!("is {v:?}"));
                let _ = writeln!(
                    out,
                    "  {} ({}): does not match: {m} fails ({} {value})",
                    p.name,
                    p.origin,
                    m.name()
                );
            }
        }
        for p in matched {
            if !p.triggers_on(alert.status) {
                let _ = writeln!(
                    out,
                    "  {} ({}): matches, but does not run on {} alerts",
                    p.name, p.origin, alert.status
                );
                continue;
            }
            let _ = writeln!(out, "  {} ({}): would run", p.name, p.origin);
            let ctx = TemplateContext::new(alert, &p.name);
            for (n, step) in p.steps.iter().enumerate() {
                let params = render_params(step, &ctx);
                let _ = writeln!(
                    out,
                    "    {}. {}: {}, timeout {}, retries {}, params {}",
                    n + 1,
                    step.name,
                    step.action.describe(),
                    humantime::format_duration(step.timeout),
                    step.retries,
                    serde_json::Value::Object(params.clone())
                );
                let Some(executor) = &executor else {
                    continue;
                };
                let result = executor
                    .run(crate::executor::Attempt {
                        action: &step.action,
                        alert,
                        params,
                        timeout: step.timeout,
                        dry_run: Some(true),
                        cancel: None,
                        args: step.action.render_args(&ctx),
                    })
                    .await;
                for line in &result.logs {
                    let _ = writeln!(out, "       log: {line}");
                }
                for c in &result.changes {
                    let _ = writeln!(out, "       would {} {} ({})", c.verb, c.object, c.result);
                }
                match &result.result {
                    Ok(v) => {
                        let _ = writeln!(out, "       dry run: ok, output {v}");
                    }
                    Err(e) => {
                        let _ = writeln!(out, "       dry run: failed ({}): {e}", e.metric_label());
                    }
                }
            }
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// A webhook payload as it is, or Alertmanager's API list of alerts (`GET /api/v2/alerts`, or
/// `amtool alert query -o json`) as one: its alerts are firing, and its `status` objects dropped.
fn as_webhook(body: Vec<u8>) -> Vec<u8> {
    let Ok(serde_json::Value::Array(alerts)) = serde_json::from_slice(&body) else {
        return body;
    };
    let alerts: Vec<serde_json::Value> = alerts
        .into_iter()
        .map(|mut a| {
            if let Some(obj) = a.as_object_mut() {
                obj.insert("status".into(), "firing".into());
                for api_only in ["receivers", "updatedAt", "inhibitedBy", "silencedBy"] {
                    obj.remove(api_only);
                }
            }
            a
        })
        .collect();
    serde_json::json!({"version": "4", "alerts": alerts})
        .to_string()
        .into_bytes()
}
