//! Reactor as an Alertmanager API v2 client: posting alerts (pages, the heartbeat,
//! `ReactorUnhealthy`) and reading the alerts Alertmanager holds. The HTTP client is injected;
//! every call carries the configured timeout and credentials.
//!
//! Credentials never reach a message: the URL every request and error names is the configured
//! one without its `user:password@` (moved to basic auth by [`AlertmanagerSettings::validated`]),
//! and the `Authorization` header is marked sensitive.

use base64::Engine as _;
use jiff::Timestamp;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::config::{redact_userinfo, AlertmanagerSettings, Secret};
use crate::domain::Labels;

/// Longest part of Alertmanager's answer kept in an error: the reason lands on runs and in logs,
/// and a URL pointing at the wrong server can answer with a whole HTML page.
const MAX_ANSWER_IN_ERROR: usize = 512;

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
    /// Why the settings cannot be used (see [`AlertmanagerSettings::validated`]); every call then
    /// fails with it. `Settings::load` refuses such settings at start-up already.
    misconfigured: Option<String>,
}

impl AlertmanagerApi {
    pub fn new(client: reqwest::Client, settings: AlertmanagerSettings) -> Self {
        match settings.clone().validated() {
            Ok(settings) => AlertmanagerApi {
                client,
                settings,
                misconfigured: None,
            },
            Err(e) => {
                let mut settings = settings;
                settings.url = settings.url.map(|u| redact_userinfo(&u).into_owned());
                AlertmanagerApi {
                    client,
                    settings,
                    misconfigured: Some(e.to_string()),
                }
            }
        }
    }

    /// The settings in use: `url` carries no credentials.
    pub fn settings(&self) -> &AlertmanagerSettings {
        &self.settings
    }

    /// One request to `path` with the configured timeout and credentials; a non-2xx answer is an
    /// error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        if let Some(problem) = &self.misconfigured {
            return Err(ApiError {
                retryable: false,
                reason: problem.clone(),
            });
        }
        let Some(base) = self.settings.url.as_deref() else {
            return Err(ApiError {
                retryable: false,
                reason: "alertmanager.url is not configured".into(),
            });
        };
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let what = format!("{method} {url}");
        let mut request = self
            .client
            .request(method, &url)
            .timeout(self.settings.timeout);
        // A credential that cannot be read now may be readable after a fix: the page waits.
        let credentials = self.authorization().map_err(|reason| ApiError {
            retryable: true,
            reason: format!("{what}: {reason}"),
        })?;
        if let Some(value) = credentials {
            request = request.header(AUTHORIZATION, value);
        }
        let resp = build(request).send().await.map_err(|e| ApiError {
            retryable: true,
            reason: format!("{what}: {}", describe(e)),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ApiError {
            retryable: status.is_server_error() || status.as_u16() == 429,
            reason: format!("{what}: {status}: {}", truncated(body.trim())),
        })
    }

    /// The `Authorization` header for the configured credentials. Files are read on every call,
    /// as Alertmanager and Prometheus do, so a rotated secret is used without a restart.
    fn authorization(&self) -> Result<Option<HeaderValue>, String> {
        let (value, field) = if let Some(b) = &self.settings.basic_auth {
            let field = "alertmanager.basic_auth.password_file";
            let password = read_secret(b.password.as_ref(), b.password_file.as_deref(), field)?;
            let pair = format!("{}:{password}", b.username);
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            (format!("Basic {encoded}"), "alertmanager.basic_auth")
        } else if let Some(a) = &self.settings.authorization {
            let field = "alertmanager.authorization.credentials_file";
            let credentials =
                read_secret(a.credentials.as_ref(), a.credentials_file.as_deref(), field)?;
            (
                format!("{} {credentials}", a.scheme),
                "alertmanager.authorization",
            )
        } else {
            return Ok(None);
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            format!("{field}: the credentials contain characters an HTTP header cannot carry")
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
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
                reason: format!("{what}: unexpected body: {}", describe(e)),
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

/// An inline secret, or the trimmed content of its file (as Alertmanager trims it). The file is
/// a few bytes, read with a plain read on the caller's thread.
fn read_secret(
    inline: Option<&Secret>,
    file: Option<&std::path::Path>,
    field: &str,
) -> Result<String, String> {
    match (inline, file) {
        (Some(secret), _) => Ok(secret.expose().to_owned()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{field}: {}: {e}", path.display())),
        (None, None) => Ok(String::new()),
    }
}

/// A transport error with its causes ("connection refused" is a cause, not the error), without
/// the URL reqwest would append: the caller names the URL it requested.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn truncated(s: &str) -> &str {
    match s.char_indices().nth(MAX_ANSWER_IN_ERROR) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, Method as HttpMethod, StatusCode, Uri};
    use axum::Router;

    use super::*;
    use crate::config::{ClientAuthorization, ClientBasicAuth};

    /// Requests seen by [`stub`]: method, path and `Authorization` header.
    type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

    /// An Alertmanager stand-in on 127.0.0.1 that records every request and answers `status`
    /// with what each API call expects.
    async fn stub(status: StatusCode) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let app =
            Router::new().fallback(move |method: HttpMethod, uri: Uri, headers: HeaderMap| {
                let record = record.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    record
                        .lock()
                        .unwrap()
                        .push((method.to_string(), uri.path().to_owned(), auth));
                    let body = match (method, uri.path()) {
                        (HttpMethod::POST, "/api/v2/silences") => r#"{"silenceID":"s1"}"#,
                        (HttpMethod::GET, _) => "[]",
                        _ => "invalid label set: invalid name \"has space\"",
                    };
                    (status, body)
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("127.0.0.1:{}", addr.port()), seen)
    }

    fn api(settings: AlertmanagerSettings) -> AlertmanagerApi {
        crate::tls::install_crypto_provider();
        AlertmanagerApi::new(reqwest::Client::new(), settings)
    }

    fn with_url(url: String) -> AlertmanagerSettings {
        AlertmanagerSettings {
            url: Some(url),
            ..AlertmanagerSettings::default()
        }
    }

    fn silence() -> PostableSilence {
        PostableSilence::for_labels(
            &Labels::from([("alertname".into(), "A".into())]),
            Timestamp::UNIX_EPOCH,
            Timestamp::UNIX_EPOCH,
            "test".into(),
        )
    }

    #[tokio::test]
    async fn every_call_carries_the_credentials_from_the_url_and_no_url_names_them() {
        let (host, seen) = stub(StatusCode::OK).await;
        let api = api(with_url(format!("http://some%20user:s3cr%40t@{host}")));
        assert_eq!(
            api.settings().url.as_deref(),
            Some(format!("http://{host}").as_str())
        );
        api.post_alerts(&[]).await.unwrap();
        assert_eq!(api.create_silence(&silence()).await.unwrap(), "s1");
        api.expire_silence("s1").await.unwrap();
        api.alerts(&[]).await.unwrap();
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("some user:s3cr@t")
        );
        let seen = seen.lock().unwrap().clone();
        let paths: Vec<(&str, &str)> = seen
            .iter()
            .map(|(m, p, _)| (m.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            paths,
            [
                ("POST", "/api/v2/alerts"),
                ("POST", "/api/v2/silences"),
                ("DELETE", "/api/v2/silence/s1"),
                ("GET", "/api/v2/alerts"),
            ]
        );
        for (method, path, auth) in &seen {
            assert_eq!(auth.as_deref(), Some(expected.as_str()), "{method} {path}");
        }
    }

    #[tokio::test]
    async fn an_authorization_credentials_file_is_read_on_every_call() {
        let (host, seen) = stub(StatusCode::OK).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first\n").unwrap();
        let api = api(AlertmanagerSettings {
            authorization: Some(ClientAuthorization {
                credentials_file: Some(file.clone()),
                ..ClientAuthorization::default()
            }),
            ..with_url(format!("http://{host}"))
        });
        api.post_alerts(&[]).await.unwrap();
        std::fs::write(&file, "second").unwrap();
        api.post_alerts(&[]).await.unwrap();
        let auth: Vec<Option<String>> = seen.lock().unwrap().iter().map(|s| s.2.clone()).collect();
        assert_eq!(
            auth,
            [Some("Bearer first".into()), Some("Bearer second".into())]
        );

        std::fs::remove_file(&file).unwrap();
        let e = api.post_alerts(&[]).await.unwrap_err();
        assert!(e.retryable, "the page waits for the file to come back");
        assert!(
            e.reason
                .contains("alertmanager.authorization.credentials_file"),
            "{e}"
        );
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "nothing sent without credentials"
        );
    }

    #[tokio::test]
    async fn failed_calls_name_the_url_without_its_password() {
        let secret = "pw-that-must-not-leak";
        let (host, _) = stub(StatusCode::BAD_REQUEST).await;
        let refused = api(with_url(format!("http://someuser:{secret}@{host}")));
        let e = refused.post_alerts(&[]).await.unwrap_err();
        assert!(!e.retryable);
        assert_eq!(
            e.reason,
            format!(
                "POST http://{host}/api/v2/alerts: 400 Bad Request: invalid label set: invalid name \"has space\""
            )
        );

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let unreachable = api(with_url(format!("http://someuser:{secret}@{closed}")));
        let e = unreachable.post_alerts(&[]).await.unwrap_err();
        assert!(e.retryable);
        assert!(!e.to_string().contains(secret), "{e}");
        assert!(
            e.reason.starts_with(&format!(
                "POST http://{closed}/api/v2/alerts: error sending request"
            )),
            "{e}"
        );

        let bad = api(AlertmanagerSettings {
            basic_auth: Some(ClientBasicAuth::default()),
            ..with_url(format!("http://someuser:{secret}@{closed}"))
        });
        assert!(!format!("{:?}", bad.settings()).contains(secret));
        let e = bad.post_alerts(&[]).await.unwrap_err();
        assert!(
            !e.retryable && e.reason.starts_with("alertmanager.url: carries"),
            "{e}"
        );
    }

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
