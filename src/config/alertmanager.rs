//! The Alertmanager settings: where pages, the heartbeat and silences go, and the credentials to
//! reach it (`basic_auth`, `authorization`, or userinfo in the URL, moved out of it at load), which
//! never appear in a message.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, ConfigError};

#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertmanagerSettings {
    /// Alertmanager base URL escalations are posted to (`<url>/api/v2/alerts`). Unset: failures are
    /// recorded and logged, but nobody is paged. Credentials written into it
    /// (`http://user:pass@host`) are moved to `basic_auth` when the settings are validated, so the
    /// URL that is requested, logged and recorded on runs carries none.
    pub url: Option<String>,
    /// HTTP basic authentication on every call (Alertmanager's `http_config.basic_auth`).
    pub basic_auth: Option<ClientBasicAuth>,
    /// An `Authorization` header on every call (Alertmanager's `http_config.authorization`).
    pub authorization: Option<ClientAuthorization>,
    /// Severity label of the pages reactor raises: the highest your routing knows.
    pub severity: String,
    /// How long a page stays firing in Alertmanager unless resolved earlier.
    #[serde(deserialize_with = "duration")]
    pub page_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// First pause after a failed delivery; doubles per attempt, capped at a minute.
    #[serde(deserialize_with = "duration")]
    pub retry_backoff: Duration,
    /// How often reactor reads the alerts Alertmanager holds back (inhibited by its heartbeat)
    /// from `GET /api/v2/alerts`; `0s` turns this off.
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Matchers selecting the alerts routed for auto-remediation (the inhibit rule's targets).
    pub poll_filter: Vec<String>,
}

impl Default for AlertmanagerSettings {
    fn default() -> Self {
        AlertmanagerSettings {
            url: None,
            basic_auth: None,
            authorization: None,
            severity: "critical".into(),
            page_ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(500),
            poll_interval: Duration::from_secs(5),
            poll_filter: vec![r#"remediation="auto""#.into()],
        }
    }
}

/// Written by hand so that no credential in `url` reaches a log through `{:?}`.
impl std::fmt::Debug for AlertmanagerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertmanagerSettings")
            .field("url", &self.url.as_deref().map(redact_userinfo))
            .field("basic_auth", &self.basic_auth)
            .field("authorization", &self.authorization)
            .field("severity", &self.severity)
            .field("page_ttl", &self.page_ttl)
            .field("timeout", &self.timeout)
            .field("retry_backoff", &self.retry_backoff)
            .field("poll_interval", &self.poll_interval)
            .field("poll_filter", &self.poll_filter)
            .finish()
    }
}

impl AlertmanagerSettings {
    /// Checks the URL and the credentials, and moves credentials written into the URL to
    /// `basic_auth`. Errors name the setting and never print a secret.
    pub fn validated(mut self) -> Result<AlertmanagerSettings, ConfigError> {
        if let Some(raw) = self.url.take() {
            let mut url = reqwest::Url::parse(&raw).map_err(|e| {
                invalid(
                    "alertmanager.url",
                    format!("not a URL: {}: {e}", redact_userinfo(&raw)),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
                return Err(invalid(
                    "alertmanager.url",
                    format!(
                        "expected http://HOST[:PORT] or https://…, got {}",
                        redact_userinfo(&raw)
                    ),
                ));
            }
            if url.username().is_empty() && url.password().is_none() {
                self.url = Some(raw);
            } else {
                if self.basic_auth.is_some() || self.authorization.is_some() {
                    return Err(invalid(
                        "alertmanager.url",
                        "carries credentials while alertmanager.basic_auth or \
                         alertmanager.authorization is set: keep one"
                            .into(),
                    ));
                }
                self.basic_auth = Some(ClientBasicAuth {
                    username: percent_decode(url.username()),
                    password: url.password().map(|p| Secret::new(percent_decode(p))),
                    password_file: None,
                });
                // Cannot fail: the URL has a host, checked above.
                let _ = url.set_username("");
                let _ = url.set_password(None);
                let mut clean = url.to_string();
                if !raw.ends_with('/') && url.path() == "/" {
                    clean.pop();
                }
                self.url = Some(clean);
            }
        }
        if self.basic_auth.is_some() && self.authorization.is_some() {
            return Err(invalid(
                "alertmanager.authorization",
                "set alertmanager.basic_auth or alertmanager.authorization, not both".into(),
            ));
        }
        if let Some(b) = &self.basic_auth {
            if b.password.is_some() && b.password_file.is_some() {
                return Err(invalid(
                    "alertmanager.basic_auth",
                    "set password or password_file, not both".into(),
                ));
            }
            if b.username.contains(':') || b.username.chars().any(char::is_control) {
                return Err(invalid(
                    "alertmanager.basic_auth.username",
                    "must not contain ':' or control characters".into(),
                ));
            }
        }
        if let Some(a) = &self.authorization {
            if a.credentials.is_some() && a.credentials_file.is_some() {
                return Err(invalid(
                    "alertmanager.authorization",
                    "set credentials or credentials_file, not both".into(),
                ));
            }
            if a.scheme.eq_ignore_ascii_case("basic") {
                return Err(invalid(
                    "alertmanager.authorization.type",
                    "use alertmanager.basic_auth for basic authentication".into(),
                ));
            }
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if a.scheme.is_empty() || !a.scheme.chars().all(token) {
                return Err(invalid(
                    "alertmanager.authorization.type",
                    format!("expected a scheme like Bearer, got {:?}", a.scheme),
                ));
            }
        }
        Ok(self)
    }

    /// `REACTOR_ALERTMANAGER_{USERNAME,PASSWORD}` (basic auth) and `REACTOR_ALERTMANAGER_TOKEN`
    /// (a bearer token): secrets from a Kubernetes Secret through the environment. Empty is unset.
    pub(super) fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) {
        let get = |k| get(k).filter(|v| !v.is_empty());
        if let Some(v) = get("REACTOR_ALERTMANAGER_USERNAME") {
            self.basic_auth
                .get_or_insert_with(Default::default)
                .username = v;
        }
        if let Some(v) = get("REACTOR_ALERTMANAGER_PASSWORD") {
            let basic = self.basic_auth.get_or_insert_with(Default::default);
            basic.password = Some(Secret::new(v));
            basic.password_file = None;
        }
        if let Some(v) = get("REACTOR_ALERTMANAGER_TOKEN") {
            let auth = self.authorization.get_or_insert_with(Default::default);
            auth.credentials = Some(Secret::new(v));
            auth.credentials_file = None;
        }
    }
}

/// A credential from the configuration file or the environment. `Debug` and `Display` print
/// `<redacted>`, so settings can be printed whole; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Basic authentication toward Alertmanager, as in its own `http_config.basic_auth`.
/// `password_file` is read on every request, so a rotated file takes effect without a restart.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientBasicAuth {
    pub username: String,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
}

/// An `Authorization: <type> <credentials>` header toward Alertmanager, as in its own
/// `http_config.authorization`. `credentials_file` is read on every request.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientAuthorization {
    #[serde(rename = "type")]
    pub scheme: String,
    pub credentials: Option<Secret>,
    pub credentials_file: Option<PathBuf>,
}

impl Default for ClientAuthorization {
    fn default() -> Self {
        ClientAuthorization {
            scheme: "Bearer".into(),
            credentials: None,
            credentials_file: None,
        }
    }
}

/// `url` with any `user:password@` replaced by `<redacted>@`, for messages. Works on strings that
/// do not parse as URLs too, since those are the ones error messages print.
pub fn redact_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_len = url[start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - start);
    match url[start..start + authority_len].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &url[start + at..]).into(),
        None => url.into(),
    }
}

/// Decodes `%XX` escapes of a URL's userinfo, as clients do before sending basic credentials.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => (*h as char).to_digit(16).zip((*l as char).to_digit(16)),
            _ => None,
        };
        match escaped {
            Some((h, l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}
