//! `reactor pause`, `reactor pauses`, `reactor unpause`, `reactor approve` and `reactor deny`:
//! maintenance pauses and approval answers, through the running service's API with its
//! credentials.

use std::process::ExitCode;

use super::service::{asker, send, service};
use super::{GateCommand, ServiceArgs};
use crate::app;
use crate::config::Settings;

pub(super) async fn gates(settings: Settings, command: GateCommand, a: ServiceArgs) -> ExitCode {
    let (base, token) = service(&settings, &a);
    app::install_crypto_provider();
    let client = reqwest::Client::new();
    let base = base.trim_end_matches('/');
    let req = match &command {
        GateCommand::Pause {
            playbook,
            matchers,
            length,
            reason,
            by,
        } => client
            .post(format!("{base}/api/v1/pauses"))
            .json(&serde_json::json!({
                "playbook": playbook, "matchers": matchers, "for": length, "reason": reason,
                "by": asker(by.clone()),
            })),
        GateCommand::Pauses { all } => client
            .get(format!("{base}/api/v1/pauses"))
            .query(&[("all", all.to_string())]),
        GateCommand::Unpause { id, by } => client
            .delete(format!("{base}/api/v1/pauses/{id}"))
            .query(&[("by", asker(by.clone()))]),
        GateCommand::Approve { run, by } | GateCommand::Deny { run, by } => {
            let decision = if matches!(command, GateCommand::Approve { .. }) {
                "approve"
            } else {
                "deny"
            };
            client
                .post(format!("{base}/api/v1/runs/{run}/approval"))
                .json(&serde_json::json!({"decision": decision, "by": asker(by.clone())}))
        }
    };
    let text = match send(req, &token, base).await {
        Ok(text) => text,
        Err(code) => return code,
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let pause = |p: &serde_json::Value| {
        let what = [
            p["playbook"].as_str().map(|n| format!("playbook={n}")),
            p["matchers"].as_str().map(str::to_owned),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        let state = if p["liftedAt"].is_string() {
            format!("lifted by {}", p["liftedBy"].as_str().unwrap_or_default())
        } else {
            format!("until {}", p["until"].as_str().unwrap_or_default())
        };
        format!(
            "{}\t{what}\t{state}\t{}\t{}",
            p["id"],
            p["by"].as_str().unwrap_or_default(),
            p["reason"].as_str().unwrap_or_default()
        )
    };
    match command {
        GateCommand::Pauses { .. } => {
            for p in v.as_array().into_iter().flatten() {
                println!("{}", pause(p));
            }
        }
        GateCommand::Pause { .. } | GateCommand::Unpause { .. } => println!("{}", pause(&v)),
        GateCommand::Approve { .. } | GateCommand::Deny { .. } => println!(
            "run {}: {}{}",
            v["id"].as_str().unwrap_or_default(),
            v["outcome"].as_str().unwrap_or_default(),
            v["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
    }
    ExitCode::SUCCESS
}
