//! HTTP calls for scripts: `http::get/post/put/delete(url[, #{headers, body, json, timeout}])`.
//!
//! Only URLs under a configured prefix (`http.allow`) are called, compared after the URL is
//! normalized (so `..`, a user part or a look-alike host cannot step outside a prefix); redirects
//! are not followed. Headers that carry secrets come from the configuration (`http.credentials`:
//! a header for a prefix, its value from a file or the environment), never from the alert, and
//! are never recorded. The response body is kept up to `http.max_body_bytes`. In a dry run, GET
//! is sent (it reads) and the other methods are recorded but not sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde::Serialize;

use super::error::{Class, StepError};
pub use crate::config::url_prefix as parse_prefix;
use crate::config::Secret;
use crate::history::Change;

/// Where scripts may send requests, with what credentials.
#[derive(Debug, Clone, Default)]
pub struct HttpPolicy {
    /// A client that follows no redirect; `None`: every call is refused.
    pub client: Option<reqwest::Client>,
    /// Normalized URL prefixes.
    pub allow: Vec<Url>,
    pub credentials: Vec<Credential>,
    /// Bytes kept of a response body.
    pub max_body: usize,
}

/// A header added to every request under `prefix`.
#[derive(Debug, Clone)]
pub struct Credential {
    pub prefix: Url,
    pub header: HeaderName,
    pub value: CredentialValue,
}

/// A credential's value: fixed at start (from the environment) or read from a file at each
/// request, so a rotated file takes effect without a restart.
#[derive(Debug, Clone)]
pub enum CredentialValue {
    Fixed(Secret),
    File(PathBuf),
}

/// One request a script asked for.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub deadline: Instant,
    pub dry_run: bool,
}

/// What the server answered. A 4xx or 5xx is an answer, not an error: the script decides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpResponse {
    /// `None` in a dry run that did not send the request.
    pub status: Option<u16>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// Some of the body was dropped past `http.max_body_bytes`.
    pub truncated: bool,
    pub dry_run: bool,
    pub duration_ms: u64,
}

impl HttpPolicy {
    /// The normalized URL, when it lies under an allowed prefix.
    pub fn check(&self, url: &str) -> Result<Url, StepError> {
        let refused = |why: String| StepError::Helper {
            message: format!("http {url:?}: {why}; nothing was sent"),
            class: Class::Refused,
        };
        let parsed = Url::parse(url).map_err(|e| refused(format!("not a URL ({e})")))?;
        if self.allow.is_empty() {
            return Err(refused("no URL is allowed (http.allow is empty)".into()));
        }
        if self.client.is_none() {
            return Err(refused("no HTTP client could be built".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(refused(
                "a URL may not carry credentials (use http.credentials)".into(),
            ));
        }
        if self.allow.iter().any(|p| under(&parsed, p)) {
            Ok(parsed)
        } else {
            Err(refused("not under a prefix in http.allow".into()))
        }
    }

    /// Sends `req` if its URL is allowed, and records it in `changes` (the header names only).
    pub async fn send(
        &self,
        req: HttpRequest,
        changes: &mut Vec<Change>,
    ) -> Result<HttpResponse, StepError> {
        let url = self.check(&req.url)?;
        let client = self.client.as_ref().expect("checked above");
        let started = Instant::now();
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &req.headers {
            let bad = |what: &str| {
                StepError::bad_arguments(format!("http: header {name:?}: invalid {what}"))
            };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("name"))?;
            let value = HeaderValue::from_str(value).map_err(|_| bad("value"))?;
            headers.insert(name, value);
        }
        for c in self.credentials.iter().filter(|c| under(&url, &c.prefix)) {
            let value = match &c.value {
                CredentialValue::Fixed(s) => s.expose().to_owned(),
                CredentialValue::File(path) => std::fs::read_to_string(path)
                    .map_err(|e| StepError::Helper {
                        message: format!(
                            "http: the credential file for {} cannot be read: {e}",
                            c.prefix
                        ),
                        class: Class::NotConfigured,
                    })?
                    .trim()
                    .to_owned(),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| StepError::Helper {
                message: format!(
                    "http: the credential for {} is not a valid header value",
                    c.prefix
                ),
                class: Class::NotConfigured,
            })?;
            value.set_sensitive(true);
            headers.insert(c.header.clone(), value);
        }
        let names: Vec<String> = headers.keys().map(|h| h.as_str().to_owned()).collect();
        let verb = format!("http {}", req.method);
        let mut record = |dry_run: bool, result: String, duration_ms: u64| {
            changes.push(Change {
                verb: verb.clone(),
                object: url.to_string(),
                namespace: String::new(),
                dry_run,
                result,
                detail: serde_json::json!({"headers": names, "duration_ms": duration_ms}),
            });
        };
        if req.dry_run && req.method != Method::GET && req.method != Method::HEAD {
            record(true, "not sent (dry run)".into(), 0);
            return Ok(HttpResponse {
                status: None,
                headers: BTreeMap::new(),
                body: String::new(),
                truncated: false,
                dry_run: true,
                duration_ms: 0,
            });
        }
        let mut builder = client
            .request(req.method.clone(), url.clone())
            .headers(headers);
        if let Some(body) = req.body {
            builder = builder.body(body);
        }
        let deadline = tokio::time::Instant::from_std(req.deadline);
        let sent = tokio::time::timeout_at(deadline, async {
            let mut resp = builder.send().await?;
            let status = resp.status().as_u16();
            let headers: BTreeMap<String, String> = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            let mut body = Vec::new();
            let mut truncated = false;
            while let Some(chunk) = resp.chunk().await? {
                let keep = chunk.len().min(self.max_body.saturating_sub(body.len()));
                body.extend_from_slice(&chunk[..keep]);
                if keep < chunk.len() {
                    truncated = true;
                    break;
                }
            }
            Ok::<_, reqwest::Error>((status, headers, body, truncated))
        })
        .await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let result = match sent {
            Ok(Ok((status, headers, body, truncated))) => Ok(HttpResponse {
                status: Some(status),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                truncated,
                dry_run: false,
                duration_ms,
            }),
            Ok(Err(e)) => Err(StepError::Helper {
                message: format!("http {} {url}: {}", req.method, describe(&e)),
                class: if e.is_timeout() {
                    Class::Timeout
                } else {
                    Class::Unreachable
                },
            }),
            Err(_) => Err(StepError::Helper {
                message: format!("http {} {url}: no answer before the deadline", req.method),
                class: Class::Timeout,
            }),
        };
        record(
            false,
            match &result {
                Ok(r) => format!("HTTP {}", r.status.unwrap_or_default()),
                Err(e) => e.to_string(),
            },
            duration_ms,
        );
        result
    }
}

/// Whether `url` lies under `prefix`: same scheme, host and port, and a path that starts with the
/// prefix's path (both normalized).
fn under(url: &Url, prefix: &Url) -> bool {
    url.scheme() == prefix.scheme()
        && url.host_str() == prefix.host_str()
        && url.port_or_known_default() == prefix.port_or_known_default()
        && url.path().starts_with(prefix.path())
}

/// A reqwest error with its causes, the way a person reads it.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(prefixes: &[&str]) -> HttpPolicy {
        crate::tls::install_crypto_provider();
        HttpPolicy {
            client: Some(reqwest::Client::new()),
            allow: prefixes.iter().map(|p| parse_prefix(p).unwrap()).collect(),
            credentials: Vec::new(),
            max_body: 1024,
        }
    }

    #[test]
    fn only_urls_under_an_allowed_prefix_pass_after_normalizing() {
        let p = policy(&["https://admin.internal/api/", "http://127.0.0.1:8080"]);
        for ok in [
            "https://admin.internal/api/restart",
            "https://ADMIN.internal:443/api/x?y=1",
            "http://127.0.0.1:8080/anything",
        ] {
            assert!(p.check(ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://admin.internal/apis",
            "https://admin.internal/api/../secret",
            "https://admin.internal.evil.com/api/",
            "https://admin.internal@evil.com/api/",
            "https://user:pw@admin.internal/api/",
            "http://admin.internal/api/",
            "https://admin.internal:8443/api/",
            "http://127.0.0.1:8081/",
            "file:///etc/passwd",
            "not a url",
        ] {
            let e = p.check(refused).unwrap_err();
            assert_eq!(e.metric_label(), "refused", "{refused}: {e}");
            assert!(e.to_string().contains("nothing was sent"), "{e}");
        }
        assert!(HttpPolicy::default()
            .check("https://admin.internal/")
            .unwrap_err()
            .to_string()
            .contains("http.allow is empty"));
    }

    #[test]
    fn a_prefix_must_be_a_plain_http_url() {
        assert!(parse_prefix("https://admin.internal/").is_ok());
        for bad in [
            "admin.internal",
            "ftp://x/",
            "https://u:p@x/",
            "https://x/?a=b",
        ] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
    }
}
