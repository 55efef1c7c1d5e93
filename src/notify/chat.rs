//! Chat channels: a Slack incoming webhook (`{"text", "blocks"}`) and a Microsoft Teams Workflows
//! webhook (one Adaptive Card). The webhook URL is the credential, so it never appears in a
//! message. Slack answers 429 with `Retry-After`, which is honoured; 400, 403, 404 and 410 are
//! final and their error string (`invalid_payload`, `channel_is_archived`, …) is recorded.

use serde_json::json;

use super::{call, ellipsize, Action, Notice, SendError, Sent};
use crate::config::ChatSettings;

/// Slack's limits: header text 150 characters, section text 3,000, ten fields of 2,000.
const HEADER_MAX: usize = 150;
const TEXT_MAX: usize = 3000;
const FIELD_MAX: usize = 2000;

fn title(notice: &Notice, action: Action) -> String {
    match action {
        Action::Trigger => notice.summary.clone(),
        Action::Resolve => format!("Resolved: {}", notice.summary),
    }
}

/// Slack's `mrkdwn` gives `&`, `<` and `>` meaning; a label value must stay text.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(super) fn slack_body(notice: &Notice, action: Action) -> serde_json::Value {
    let title = title(notice, action);
    let fields: Vec<_> = notice
        .facts()
        .into_iter()
        .filter(|(k, _)| k != "error")
        .take(10)
        .map(|(k, v)| json!({"type": "mrkdwn", "text": ellipsize(&format!("*{k}*\n{}", escape(&v)), FIELD_MAX)}))
        .collect();
    let mut blocks = vec![json!({
        "type": "header",
        "text": {"type": "plain_text", "text": ellipsize(&title, HEADER_MAX)},
    })];
    if !fields.is_empty() {
        blocks.push(json!({"type": "section", "fields": fields}));
    }
    if !notice.description.is_empty() {
        blocks.push(json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": ellipsize(&escape(&notice.description), TEXT_MAX)},
        }));
    }
    if !notice.link.is_empty() {
        blocks.push(json!({
            "type": "actions",
            "elements": [{
                "type": "button",
                "text": {"type": "plain_text", "text": notice.link_label()},
                "url": notice.link,
            }],
        }));
    }
    // A page for one person mentions their member id, so Slack notifies them.
    let title = match &notice.to {
        Some(member) => format!("<@{}> {title}", escape(member)),
        None => title,
    };
    json!({
        "text": ellipsize(format!("{title} {}", notice.link).trim_end(), TEXT_MAX),
        "blocks": blocks,
    })
}

pub(super) fn teams_body(notice: &Notice, action: Action) -> serde_json::Value {
    // Teams refuses a message over about 28 KB: every text is cut to fit.
    let facts: Vec<_> = notice
        .facts()
        .into_iter()
        .take(10)
        .map(|(k, v)| json!({"title": ellipsize(&k, 100), "value": ellipsize(&v, FIELD_MAX)}))
        .collect();
    let mut actions = Vec::new();
    if !notice.link.is_empty() {
        actions.push(
            json!({"type": "Action.OpenUrl", "title": notice.link_label(), "url": notice.link}),
        );
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    {"type": "TextBlock", "text": ellipsize(&title(notice, action), HEADER_MAX * 2),
                     "weight": "Bolder", "size": "Medium", "wrap": true},
                    {"type": "TextBlock", "text": ellipsize(&notice.description, TEXT_MAX), "wrap": true},
                    {"type": "FactSet", "facts": facts},
                ],
                "actions": actions,
            },
        }],
    })
}

/// Posts `body` to the webhook URL of `settings`; `service` names it in errors.
pub(super) async fn send(
    client: &reqwest::Client,
    settings: &ChatSettings,
    body: serde_json::Value,
    service: &str,
) -> Result<Sent, SendError> {
    let url = settings
        .url
        .as_ref()
        .ok_or_else(|| SendError::final_("url is not configured"))?
        .read()
        .map_err(SendError::final_)?;
    call(client.post(url.expose()).json(&body))
        .await?
        .classify(service)
        .map(|_| Sent::default())
}
