//! `reactor keys`: API keys for the incident API, made, listed and revoked through the running
//! service with its own credentials. A new key is printed once; reactor keeps only its digest.

use std::process::ExitCode;

use super::service::{send, service};
use super::{KeysCommand, ServiceArgs};
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
    let v: serde_json::Value = match send(req, &token, base).await {
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(code) => return code,
    };
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
