//! Reactor as an Alertmanager API v2 client: posting alerts (pages, the heartbeat,
//! `ReactorUnhealthy`) and reading the alerts Alertmanager holds. The HTTP client is injected;
//! every call carries the configured timeout.

use jiff::Timestamp;
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

    fn url(&self, path: &str) -> Result<String, ApiError> {
        match self.settings.url.as_deref() {
            Some(base) => Ok(format!("{}{path}", base.trim_end_matches('/'))),
            None => Err(ApiError {
                retryable: false,
                reason: "alertmanager.url is not configured".into(),
            }),
        }
    }

    /// `POST /api/v2/alerts`.
    pub async fn post_alerts(&self, alerts: &[PostableAlert]) -> Result<(), ApiError> {
        let url = self.url("/api/v2/alerts")?;
        let resp = self
            .client
            .post(&url)
            .timeout(self.settings.timeout)
            .json(alerts)
            .send()
            .await
            .map_err(|e| ApiError {
                retryable: true,
                reason: format!("POST {url}: {e}"),
            })?;
        check(resp, "POST", &url).await.map(drop)
    }

    /// `POST /api/v2/silences`; returns the silence id.
    pub async fn create_silence(&self, silence: &PostableSilence) -> Result<String, ApiError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Created {
            #[serde(rename = "silenceID")]
            silence_id: String,
        }
        let url = self.url("/api/v2/silences")?;
        let resp = self
            .client
            .post(&url)
            .timeout(self.settings.timeout)
            .json(silence)
            .send()
            .await
            .map_err(|e| ApiError {
                retryable: true,
                reason: format!("POST {url}: {e}"),
            })?;
        let created: Created =
            check(resp, "POST", &url)
                .await?
                .json()
                .await
                .map_err(|e| ApiError {
                    retryable: true,
                    reason: format!("POST {url}: unexpected body: {e}"),
                })?;
        Ok(created.silence_id)
    }

    /// `DELETE /api/v2/silence/{id}`: expires the silence now.
    pub async fn expire_silence(&self, id: &str) -> Result<(), ApiError> {
        let url = self.url(&format!("/api/v2/silence/{id}"))?;
        let resp = self
            .client
            .delete(&url)
            .timeout(self.settings.timeout)
            .send()
            .await
            .map_err(|e| ApiError {
                retryable: true,
                reason: format!("DELETE {url}: {e}"),
            })?;
        check(resp, "DELETE", &url).await.map(drop)
    }

    /// `GET /api/v2/alerts` with `filter` matchers: active, silenced and inhibited alerts alike.
    pub async fn alerts(&self, filter: &[String]) -> Result<Vec<GettableAlert>, ApiError> {
        let url = self.url("/api/v2/alerts")?;
        let query: Vec<(&str, &str)> = filter.iter().map(|m| ("filter", m.as_str())).collect();
        let resp = self
            .client
            .get(&url)
            .query(&query)
            .timeout(self.settings.timeout)
            .send()
            .await
            .map_err(|e| ApiError {
                retryable: true,
                reason: format!("GET {url}: {e}"),
            })?;
        let resp = check(resp, "GET", &url).await?;
        resp.json().await.map_err(|e| ApiError {
            retryable: true,
            reason: format!("GET {url}: unexpected body: {e}"),
        })
    }
}

async fn check(
    resp: reqwest::Response,
    verb: &str,
    url: &str,
) -> Result<reqwest::Response, ApiError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    Err(ApiError {
        retryable: status.is_server_error() || status.as_u16() == 429,
        reason: format!("{verb} {url}: {status}: {}", body.trim()),
    })
}
