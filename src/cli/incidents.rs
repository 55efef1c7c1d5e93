//! `reactor incidents`: the incidents of the running service, through its API with the
//! service's credentials: list them, show one, claim or resolve one, print its report.

use std::process::ExitCode;

use super::service::{send, service};
use super::{IncidentsCommand, ServiceArgs};
use crate::app;
use crate::config::Settings;

pub(super) async fn incidents(
    settings: Settings,
    command: Option<IncidentsCommand>,
    state: Option<String>,
    a: ServiceArgs,
) -> ExitCode {
    let (base, token) = service(&settings, &a);
    app::install_crypto_provider();
    let client = reqwest::Client::new();
    let base = base.trim_end_matches('/');
    let act = |n: u64, action: &str, by: Option<String>| {
        client
            .post(format!("{base}/api/v1/incidents/{n}"))
            .json(&serde_json::json!({"action": action, "by": super::service::asker(by)}))
    };
    let req = match &command {
        None => {
            let mut req = client.get(format!("{base}/api/v1/incidents"));
            if let Some(s) = &state {
                req = req.query(&[("state", s)]);
            }
            req
        }
        Some(IncidentsCommand::Show { number }) | Some(IncidentsCommand::Report { number }) => {
            let tail = if matches!(command, Some(IncidentsCommand::Report { .. })) {
                "/report"
            } else {
                ""
            };
            client.get(format!("{base}/api/v1/incidents/{number}{tail}"))
        }
        Some(IncidentsCommand::Claim { number, by }) => act(*number, "claim", by.clone()),
        Some(IncidentsCommand::Resolve { number, by }) => act(*number, "resolve", by.clone()),
    };
    let text = match send(req, &token, base).await {
        Ok(text) => text,
        Err(code) => return code,
    };
    if matches!(command, Some(IncidentsCommand::Report { .. })) {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let line = |i: &serde_json::Value| {
        format!(
            "{}\t{}\t{}\t{}\t{}",
            i["number"],
            i["state"].as_str().unwrap_or_default(),
            i["severity"].as_str().unwrap_or_default(),
            i["service"].as_str().unwrap_or_default(),
            i["title"].as_str().unwrap_or_default()
        )
    };
    match command {
        None => {
            for i in v.as_array().into_iter().flatten() {
                println!("{}", line(i));
            }
        }
        Some(IncidentsCommand::Show { .. }) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Some(_) => println!("{}", line(&v)),
    }
    ExitCode::SUCCESS
}
