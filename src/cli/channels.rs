//! `reactor channels`: the configured notification channels (`list`), and `test NAME`, which
//! sends one clearly labelled test notification straight to the service (not through the
//! outbox, so a running service is not needed) and prints what the service answered.

use std::process::ExitCode;
use std::time::Duration;

use jiff::Timestamp;

use super::fail;
use crate::config::Settings;
use crate::notify::{Action, Channels, Kind, Notice, RequestStatus, Severity};

pub(super) fn list(settings: &Settings) -> ExitCode {
    println!(
        "alertmanager (built in){}",
        if settings.alertmanager.url.is_some() {
            ""
        } else {
            ": alertmanager.url is not set"
        }
    );
    for (name, c) in &settings.channels {
        println!("{name} ({})", c.type_name());
    }
    println!("route.to: {}", settings.route.to.join(", "));
    if !settings.watchdog.channels.is_empty() {
        println!(
            "watchdog.channels: {}",
            settings.watchdog.channels.join(", ")
        );
    }
    ExitCode::SUCCESS
}

/// The test notification: labelled as a test wherever the service shows it.
pub fn test_notice(channel: &str, link: &str, now: Timestamp) -> Notice {
    let summary = format!("reactor test notification for channel {channel}: no action needed");
    let mut labels = crate::domain::Labels::new();
    labels.insert("alertname".into(), "ReactorChannelTest".into());
    labels.insert("severity".into(), "info".into());
    let annotations = [
        ("summary".to_owned(), summary.clone()),
        (
            "description".to_owned(),
            "Sent by `reactor channels test`.".to_owned(),
        ),
    ]
    .into();
    Notice {
        kind: Kind::Test,
        dedup_key: format!("reactor/test/{channel}/{}", now.as_millisecond()),
        summary,
        description: "Sent by `reactor channels test` to check that this channel reaches people."
            .into(),
        severity: Severity::Info,
        source: "reactor".into(),
        component: "reactor".into(),
        group: "reactor".into(),
        class: "test".into(),
        link: link.to_owned(),
        labels,
        annotations,
        details: [("test".to_owned(), true.into())].into_iter().collect(),
        at: now,
        to: None,
    }
}

pub(super) async fn test(settings: Settings, name: &str) -> ExitCode {
    if name == crate::config::ALERTMANAGER_CHANNEL {
        return fail("the alertmanager channel is tested by `amtool` or the heartbeat on /readyz; name a channel of `channels:`");
    }
    let Some(channel) = settings.channels.get(name) else {
        let known: Vec<&str> = settings.channels.keys().map(String::as_str).collect();
        return fail(format!(
            "no channel named {name:?} (channels: {})",
            known.join(", ")
        ));
    };
    crate::tls::install_crypto_provider();
    let client = match reqwest::Client::builder()
        .user_agent(concat!("reactor/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot build the HTTP client: {e}")),
    };
    let kind = channel.type_name();
    let channels = Channels::new(client, settings.channels.clone());
    let link = format!("{}/readyz", settings.external_url(settings.listen));
    let notice = test_notice(name, &link, Timestamp::now());
    match channels.send(name, &notice, Action::Trigger).await {
        Ok(sent) => {
            println!("ok: {name} ({kind}) accepted the test notification");
            if channel.send_resolved() {
                // A test must not leave an incident open (PagerDuty pages on-call for it).
                match channels.send(name, &notice, Action::Resolve).await {
                    Ok(_) => println!("ok: {name} ({kind}) accepted its resolution"),
                    Err(e) => {
                        eprintln!("warning: {name}: resolving the test notification failed: {e}")
                    }
                }
            }
            if let Some(id) = sent.request_id {
                println!("request id: {id}");
                for _ in 0..10 {
                    match channels.request_status(name, &id).await {
                        Ok(RequestStatus::Succeeded) => {
                            println!("request {id}: processed successfully");
                            return ExitCode::SUCCESS;
                        }
                        Ok(RequestStatus::Failed(why)) => {
                            eprintln!("request {id}: the service rejected it: {why}");
                            return ExitCode::FAILURE;
                        }
                        Ok(RequestStatus::Processing) => {
                            tokio::time::sleep(Duration::from_millis(500)).await
                        }
                        Err(e) => {
                            eprintln!("request {id}: cannot ask its status: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                eprintln!("request {id}: still not processed");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let retry = if e.retryable {
                " (reactor would try again)"
            } else {
                " (final)"
            };
            eprintln!("error: {name} ({kind}): {e}{retry}");
            ExitCode::FAILURE
        }
    }
}
