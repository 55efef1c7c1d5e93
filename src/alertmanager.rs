//! Reactor as an Alertmanager API v2 client: posting alerts (pages, the heartbeat,
//! `ReactorUnhealthy`) and reading the alerts Alertmanager holds. The HTTP client is injected;
//! every call carries the configured timeout.

use jiff::Timestamp;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::config::AlertmanagerSettings;
use crate::domain::Labels;

/// An alert in Alertmanager's API v2 `postableAlert` shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: Labels,
    pub annotations: Labels,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
}

/// An alert as `GET /api/v2/alerts` returns it (`gettableAlert`), the fields reactor reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GettableAlert {
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub starts_at: Timestamp,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
    pub fingerprint: String,
    pub status: AlertState,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertState {
    #[serde(default)]
    pub silenced_by: Vec<String>,
    #[serde(default)]
    pub inhibited_by: Vec<String>,
}

/// A silence for `POST /api/v2/silences`: exact matchers on every label of one alert.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableSilence {
    pub matchers: Vec<SilenceMatcher>,
    pub starts_at: Timestamp,
    pub ends_at: Timestamp,
    pub created_by: String,
    pub comment: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SilenceMatcher {
    pub name: String,
    pub value: String,
    pub is_regex: bool,
    pub is_equal: bool,
}

impl PostableSilence {
    /// Silences exactly the alert with `labels`.
    pub fn for_labels(
        labels: &Labels,
        starts_at: Timestamp,
        ends_at: Timestamp,
        comment: String,
    ) -> Self {
        PostableSilence {
            matchers: labels
                .iter()
                .map(|(k, v)| SilenceMatcher {
                    name: k.clone(),
                    value: v.clone(),
                    is_regex: false,
                    is_equal: true,
                })
                .collect(),
            starts_at,
            ends_at,
            created_by: "reactor".into(),
            comment,
        }
    }
}

/// Whether Alertmanager accepts `name` as a label or annotation name. Alertmanager before 0.27
/// (Debian's is 0.25), and later ones unless UTF-8 names are enabled, validate with Prometheus'
/// classic charset and answer 400 to the whole alert otherwise.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A failed call: whether retrying can help, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct ApiError {
    pub retryable: bool,
    pub reason: String,
}

/// Alertmanager's API at the configured URL.
#[derive(Clone)]
pub struct AlertmanagerApi {
    client: reqwest::Client,
    settings: AlertmanagerSettings,
}

impl AlertmanagerApi {
    pub fn new(client: reqwest::Client, settings: AlertmanagerSettings) -> Self {
        AlertmanagerApi { client, settings }
    }

    pub fn settings(&self) -> &AlertmanagerSettings {
        &self.settings
    }

    /// One request to `path` with the configured timeout; a non-2xx answer is an error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        let Some(base) = self.settings.url.as_deref() else {
            return Err(ApiError {
                retryable: false,
                reason: "alertmanager.url is not configured".into(),
            });
        };
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let what = format!("{method} {url}");
        let request = self
            .client
            .request(method, &url)
            .timeout(self.settings.timeout);
        let resp = build(request).send().await.map_err(|e| ApiError {
            retryable: true,
            reason: format!("{what}: {e}"),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ApiError {
            retryable: status.is_server_error() || status.as_u16() == 429,
            reason: format!("{what}: {status}: {}", body.trim()),
        })
    }

    /// Like [`AlertmanagerApi::send`], decoding a JSON answer.
    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let what = format!("{method} {path}");
        self.send(method, path, build)
            .await?
            .json()
            .await
            .map_err(|e| ApiError {
                retryable: true,
                reason: format!("{what}: unexpected body: {e}"),
            })
    }

    /// `POST /api/v2/alerts`.
    pub async fn post_alerts(&self, alerts: &[PostableAlert]) -> Result<(), ApiError> {
        self.send(Method::POST, "/api/v2/alerts", |r| r.json(alerts))
            .await
            .map(drop)
    }

    /// `POST /api/v2/silences`; returns the silence id.
    pub async fn create_silence(&self, silence: &PostableSilence) -> Result<String, ApiError> {
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "silenceID")]
            silence_id: String,
        }
        let created: Created = self
            .send_json(Method::POST, "/api/v2/silences", |r| r.json(silence))
            .await?;
        Ok(created.silence_id)
    }

    /// `DELETE /api/v2/silence/{id}`: expires the silence now.
    pub async fn expire_silence(&self, id: &str) -> Result<(), ApiError> {
        let path = format!("/api/v2/silence/{id}");
        self.send(Method::DELETE, &path, |r| r).await.map(drop)
    }

    /// `GET /api/v2/alerts` with `filter` matchers: active, silenced and inhibited alerts alike.
    pub async fn alerts(&self, filter: &[String]) -> Result<Vec<GettableAlert>, ApiError> {
        let query: Vec<(&str, &str)> = filter.iter().map(|m| ("filter", m.as_str())).collect();
        self.send_json(Method::GET, "/api/v2/alerts", |r| r.query(&query))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_follow_the_classic_prometheus_charset() {
        for ok in ["a", "_", "__name", "Team_2"] {
            assert!(valid_label_name(ok), "{ok}");
        }
        for bad in ["", "has space", "9lives", "dash-ed", "ünï", "a.b"] {
            assert!(!valid_label_name(bad), "{bad}");
        }
    }
}
