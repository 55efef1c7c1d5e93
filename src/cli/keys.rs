//! `reactor keys`: API keys for the incident API, made, listed and revoked through the running
//! service with its own credentials. A new key is printed once; reactor keeps only its digest.

use std::process::ExitCode;

use super::service::{service, unauthorized};
use super::{fail, KeysCommand, ServiceArgs};
use crate::app;
use crate::config::Settings;

pub(super) async fn keys(settings: Settings, command: KeysCommand, a: ServiceArgs) -> ExitCode {
    let (base, token) = service(&settings, &a);
    app::install_crypto_provider();
    let client = reqwest::Client::new();
    let base = base.trim_end_matches('/');
    let req = match &command {
        KeysCommand::Create { name, scope } => client
            .post(format!("{base}/api/v1/keys"))
            .json(&serde_json::json!({"name": name, "scopes": scope})),
        KeysCommand::List => client.get(format!("{base}/api/v1/keys")),
        KeysCommand::Revoke { name } => client.delete(format!("{base}/api/v1/keys/{name}")),
    };
    let req = match &token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot reach reactor at {base}: {e}")),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return fail(unauthorized());
    }
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        return fail(format!(
            "{status}: {}",
            v["error"].as_str().unwrap_or_default()
        ));
    }
    match command {
        KeysCommand::Create { name, .. } => {
            println!("{}", v["key"].as_str().unwrap_or_default());
            eprintln!(
                "API key {name:?} with scopes {}: shown this once, keep it now (send it as X-API-Key)",
                v["scopes"]
            );
        }
        KeysCommand::List => {
            for k in v.as_array().into_iter().flatten() {
                let scopes: Vec<&str> = k["scopes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .collect();
                println!(
                    "{}\t{}\t{}",
                    k["name"].as_str().unwrap_or_default(),
                    scopes.join(","),
                    k["created_at"].as_str().unwrap_or_default()
                );
            }
        }
        KeysCommand::Revoke { name } => println!("revoked: {name}"),
    }
    ExitCode::SUCCESS
}
