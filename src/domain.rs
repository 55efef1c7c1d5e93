//! The Alertmanager webhook payload (v4) as it arrives on the wire, and the validated [`Alert`] the
//! rest of reactor works with. Raw network strings live only in the `Wire*` types; they are parsed
//! once here ("parse, don't validate") so that a malformed alert is a 400 at the edge, never a
//! surprise deep inside a run.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// A label or annotation set. Ordered, so that rendering and hashing are stable.
pub type Labels = BTreeMap<String, String>;

/// Alertmanager's webhook payload, version 4, exactly as Alertmanager 0.25 sends it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WirePayload {
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub group_key: Option<String>,
    #[serde(default)]
    pub truncated_alerts: u64,
    #[serde(default)]
    pub receiver: Option<String>,
    #[serde(default)]
    pub external_url: Option<String>,
    pub alerts: Vec<WireAlert>,
}

/// One alert of a webhook payload.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireAlert {
    pub status: String,
    #[serde(default, deserialize_with = "unique_names")]
    pub labels: Labels,
    #[serde(default, deserialize_with = "unique_names")]
    pub annotations: Labels,
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: Option<String>,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
    pub fingerprint: String,
}

/// A label or annotation set in which each name appears once: JSON allows a repeated key, and a
/// map would keep the last silently, so `{"team":"a","team":"b"}` is refused instead.
fn unique_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Labels;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of string names and string values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
            let mut out = Labels::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    let shown: String = k.chars().take(40).collect();
                    return Err(serde::de::Error::custom(format!(
                        "the name {shown:?} appears twice in one alert's labels or annotations"
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visitor)
}

/// Why a payload was refused; every variant becomes a 4xx with this text as the reason.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "unsupported payload version {0:?}: reactor understands Alertmanager webhook version \"4\""
    )]
    Version(String),
    #[error("alerts[{index}]: {reason}")]
    Alert { index: usize, reason: String },
}

/// Whether the alert is firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

impl fmt::Display for AlertStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AlertStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "firing" => Ok(AlertStatus::Firing),
            "resolved" => Ok(AlertStatus::Resolved),
            other => Err(format!(
                "status must be \"firing\" or \"resolved\", got {other:?}"
            )),
        }
    }
}

/// Alertmanager's identity of an alert: a hash of its label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// Accepts what Alertmanager sends: a short, non-empty token of ASCII alphanumerics.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "fingerprint must be 1-64 ASCII alphanumerics, got {s:?}"
            ));
        }
        Ok(Fingerprint(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated alert: the unit of work. Every alert of a grouped payload becomes one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: AlertStatus,
    pub fingerprint: Fingerprint,
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    pub starts_at: Timestamp,
    /// `None` for a firing alert (Alertmanager sends the zero time `0001-01-01T00:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<Timestamp>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "generatorURL"
    )]
    pub generator_url: Option<String>,
}

impl Alert {
    pub fn alertname(&self) -> &str {
        self.labels
            .get("alertname")
            .map(String::as_str)
            .unwrap_or("")
    }

    fn from_wire(w: WireAlert) -> Result<Alert, String> {
        let status = w.status.parse()?;
        let fingerprint = Fingerprint::parse(&w.fingerprint)?;
        let starts_at = parse_time("startsAt", &w.starts_at)?
            .ok_or_else(|| "startsAt must be set".to_owned())?;
        let ends_at = match w.ends_at.as_deref() {
            None | Some("") => None,
            Some(s) => parse_time("endsAt", s)?,
        };
        Ok(Alert {
            status,
            fingerprint,
            labels: w.labels,
            annotations: w.annotations,
            starts_at,
            ends_at,
            generator_url: w.generator_url.filter(|u| !u.is_empty()),
        })
    }
}

/// Go's zero time, which Alertmanager uses for "not set", maps to `None`.
fn parse_time(field: &str, s: &str) -> Result<Option<Timestamp>, String> {
    let t: Timestamp = s
        .parse()
        .map_err(|e| format!("{field} is not an RFC 3339 time ({s:?}): {e}"))?;
    Ok(
        (t.as_second() > Timestamp::UNIX_EPOCH.as_second() - 60 * 60 * 24 * 365 * 1000)
            .then_some(t),
    )
}

/// A decoded webhook: its alerts, plus what Alertmanager said it had to leave out.
#[derive(Debug)]
pub struct Notification {
    pub alerts: Vec<Alert>,
    pub truncated_alerts: u64,
    pub receiver: Option<String>,
}

/// An alert refused for its size. It is not lost: it is recorded and paged, with a copy cut to the
/// limits (its identity and routing labels), and nothing remediates it.
#[derive(Debug, Clone)]
pub struct Oversized {
    /// Its place in the payload.
    pub index: usize,
    /// The metric label: `too_many_labels`, `label_too_long`, `too_many_annotations`,
    /// `annotation_too_long`, `generator_url_too_long`.
    pub reason: &'static str,
    /// What was over the limit, naming the label.
    pub detail: String,
    /// The alert cut to the limits.
    pub trimmed: Alert,
}

impl Notification {
    /// Takes the alerts over the limits (more labels or annotations than `max_labels`, a name or
    /// value longer than `max_bytes`) out of `alerts`, each with why and a trimmed copy.
    pub fn take_oversized(&mut self, max_labels: usize, max_bytes: usize) -> Vec<Oversized> {
        if self
            .alerts
            .iter()
            .all(|a| oversize(a, max_labels, max_bytes).is_none())
        {
            return Vec::new();
        }
        let mut refused = Vec::new();
        let mut kept = Vec::with_capacity(self.alerts.len());
        for (index, a) in std::mem::take(&mut self.alerts).into_iter().enumerate() {
            match oversize(&a, max_labels, max_bytes) {
                None => kept.push(a),
                Some((reason, detail)) => refused.push(Oversized {
                    index,
                    reason,
                    detail,
                    trimmed: trim(a, max_labels, max_bytes),
                }),
            }
        }
        self.alerts = kept;
        refused
    }
}

/// Why `a` is over the limits, if it is: the metric label and the detail, naming the label.
fn oversize(a: &Alert, max_labels: usize, max_bytes: usize) -> Option<(&'static str, String)> {
    if a.labels.len() > max_labels {
        let n = a.labels.len();
        return Some((
            "too_many_labels",
            format!("{n} labels; the limit is {max_labels}"),
        ));
    }
    if a.annotations.len() > max_labels {
        let n = a.annotations.len();
        return Some((
            "too_many_annotations",
            format!("{n} annotations; the limit is {max_labels}"),
        ));
    }
    let start = |s: &str| s.chars().take(40).collect::<String>();
    let long = |kind: &str, reason, set: &Labels| {
        set.iter().find_map(|(k, v)| {
            if k.len() > max_bytes {
                Some((
                    reason,
                    format!(
                        "{kind} name {:?}… of {} bytes; the limit is {max_bytes}",
                        start(k),
                        k.len()
                    ),
                ))
            } else if v.len() > max_bytes {
                Some((
                    reason,
                    format!(
                        "{kind} {k:?} of {} bytes ({:?}…); the limit is {max_bytes}",
                        v.len(),
                        start(v)
                    ),
                ))
            } else {
                None
            }
        })
    };
    long("label", "label_too_long", &a.labels)
        .or_else(|| long("annotation", "annotation_too_long", &a.annotations))
        .or_else(|| {
            let url = a.generator_url.as_ref().filter(|u| u.len() > max_bytes)?;
            Some((
                "generator_url_too_long",
                format!(
                    "generatorURL of {} bytes; the limit is {max_bytes}",
                    url.len()
                ),
            ))
        })
}

/// `a` cut to the limits: `alertname` first, then the other labels (and annotations) that fit, in
/// order, each value cut to `max_bytes`; a generator URL over the limit is dropped.
fn trim(a: Alert, max_labels: usize, max_bytes: usize) -> Alert {
    let cut = |s: &str| {
        let mut end = s.len().min(max_bytes);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    };
    let fit = |set: &Labels, first: Option<&str>| -> Labels {
        let firsts = first.and_then(|f| set.get_key_value(f));
        firsts
            .into_iter()
            .chain(set.iter().filter(|(k, _)| Some(k.as_str()) != first))
            .filter(|(k, _)| k.len() <= max_bytes)
            .take(max_labels)
            .map(|(k, v)| (k.clone(), cut(v)))
            .collect()
    };
    Alert {
        labels: fit(&a.labels, Some("alertname")),
        annotations: fit(&a.annotations, None),
        generator_url: a.generator_url.filter(|u| u.len() <= max_bytes),
        ..a
    }
}

/// Decodes and validates a webhook body.
pub fn decode_webhook(body: &[u8]) -> Result<Notification, PayloadError> {
    let wire: WirePayload = serde_json::from_slice(body)?;
    if let Some(v) = wire.version.as_deref() {
        if v != "4" {
            return Err(PayloadError::Version(v.to_owned()));
        }
    }
    let alerts = wire
        .alerts
        .into_iter()
        .enumerate()
        .map(|(index, w)| {
            Alert::from_wire(w).map_err(|reason| PayloadError::Alert { index, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Notification {
        alerts,
        truncated_alerts: wire.truncated_alerts,
        receiver: wire.receiver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRING: &str = include_str!("../tests/fixtures/alertmanager-0.25-firing.json");
    const RESOLVED: &str = include_str!("../tests/fixtures/alertmanager-0.25-resolved.json");

    fn one_alert(alert: &str) -> String {
        format!(r#"{{"version":"4","alerts":[{alert}]}}"#)
    }

    #[test]
    fn a_repeated_label_name_is_refused_naming_it() {
        let body = one_alert(
            r#"{"status":"firing","labels":{"alertname":"A","tier":"web","tier":"db"},"startsAt":"2026-01-01T00:00:00Z","fingerprint":"f1"}"#,
        );
        let e = decode_webhook(body.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("\"tier\" appears twice"), "{e}");
        let body = one_alert(
            r#"{"status":"firing","labels":{"alertname":"A"},"annotations":{"x":"1","x":"2"},"startsAt":"2026-01-01T00:00:00Z","fingerprint":"f1"}"#,
        );
        assert!(decode_webhook(body.as_bytes()).is_err());
    }

    #[test]
    fn annotation_names_and_generator_urls_count_toward_the_size_limit() {
        let long = "k".repeat(300);
        for alert in [
            format!(
                r#"{{"status":"firing","labels":{{"alertname":"A"}},"annotations":{{"{long}":"v"}},"startsAt":"2026-01-01T00:00:00Z","fingerprint":"f1"}}"#
            ),
            format!(
                r#"{{"status":"firing","labels":{{"alertname":"A"}},"generatorURL":"http://x/{long}","startsAt":"2026-01-01T00:00:00Z","fingerprint":"f1"}}"#
            ),
        ] {
            let mut n = decode_webhook(one_alert(&alert).as_bytes()).unwrap();
            let refused = n.take_oversized(10, 256);
            assert_eq!(refused.len(), 1);
            assert!(
                refused[0].detail.contains("the limit is 256"),
                "{:?}",
                refused[0]
            );
        }
    }

    #[test]
    fn decodes_alertmanager_0_25_firing_payload() {
        let n = decode_webhook(FIRING.as_bytes()).unwrap();
        assert_eq!(n.alerts.len(), 1);
        let a = &n.alerts[0];
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.alertname(), "HarnessCurl");
        assert_eq!(a.fingerprint.as_str(), "3e27bcf000d7dae4");
        assert_eq!(a.ends_at, None, "the zero time means not set");
        assert_eq!(a.starts_at.to_string(), "2026-11-20T23:35:13.24322Z");
    }

    #[test]
    fn decodes_alertmanager_0_25_resolved_payload() {
        let n = decode_webhook(RESOLVED.as_bytes()).unwrap();
        let a = &n.alerts[0];
        assert_eq!(a.status, AlertStatus::Resolved);
        assert!(a.ends_at.is_some());
    }

    #[test]
    fn malformed_json_names_the_problem() {
        let err = decode_webhook(b"{\"alerts\": [").unwrap_err();
        assert!(err.to_string().starts_with("malformed JSON"), "{err}");
    }

    #[test]
    fn bad_alert_names_its_index_and_field() {
        let body = FIRING.replace(
            "\"status\":\"firing\",\"labels\"",
            "\"status\":\"burning\",\"labels\"",
        );
        let err = decode_webhook(body.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("alerts[0]: status must be"),
            "{err}"
        );
        let body = FIRING.replace("2026-11-20T23:35:13.24322Z", "yesterday");
        let err = decode_webhook(body.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("startsAt is not an RFC 3339 time"),
            "{err}"
        );
    }

    #[test]
    fn other_payload_versions_are_refused() {
        let body = FIRING.replace("\"version\":\"4\"", "\"version\":\"5\"");
        assert!(matches!(
            decode_webhook(body.as_bytes()),
            Err(PayloadError::Version(_))
        ));
    }

    #[test]
    fn an_oversized_alert_is_taken_out_named_and_trimmed_and_the_others_stay() {
        let alert = |fp: &str, extra: &str| {
            format!(
                r#"{{"status":"firing","labels":{{"alertname":"A","team":"db"{extra}}},"startsAt":"2026-01-01T00:00:00Z","fingerprint":"{fp}"}}"#
            )
        };
        let long = "é".repeat(60);
        let body = format!(
            r#"{{"version":"4","alerts":[{},{},{}]}}"#,
            alert("f0", ""),
            alert("f1", &format!(r#","description":"{long}""#)),
            alert("f2", ""),
        );
        let mut n = decode_webhook(body.as_bytes()).unwrap();
        assert_eq!(n.alerts.len(), 3);
        let refused = n.take_oversized(3, 100);
        let kept: Vec<&str> = n.alerts.iter().map(|a| a.fingerprint.as_str()).collect();
        assert_eq!(kept, ["f0", "f2"]);
        assert_eq!(refused.len(), 1);
        let r = &refused[0];
        assert_eq!((r.index, r.reason), (1, "label_too_long"));
        assert!(
            r.detail.starts_with("label \"description\" of 120 bytes"),
            "{}",
            r.detail
        );
        assert!(r.detail.ends_with("the limit is 100"), "{}", r.detail);
        assert_eq!(r.trimmed.fingerprint.as_str(), "f1");
        assert_eq!(r.trimmed.labels["team"], "db");
        assert_eq!(
            r.trimmed.labels["description"],
            "é".repeat(50),
            "cut on a char boundary"
        );

        let mut n = decode_webhook(FIRING.as_bytes()).unwrap();
        let refused = n.take_oversized(2, 100);
        assert_eq!(refused[0].detail, "3 labels; the limit is 2");
        assert_eq!(refused[0].trimmed.labels.len(), 2);
        assert_eq!(
            refused[0].trimmed.alertname(),
            "HarnessCurl",
            "alertname is kept first"
        );
        let mut n = decode_webhook(FIRING.as_bytes()).unwrap();
        assert!(n.take_oversized(3, 100).is_empty());
    }

    proptest::proptest! {
        /// Fuzzing by property: no input makes the decoder panic.
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_webhook(&body);
        }

        #[test]
        fn decoder_never_panics_on_mutated_payloads(pos in 0usize..FIRING.len(), byte in proptest::num::u8::ANY, cut in 0usize..FIRING.len()) {
            let mut body = FIRING.as_bytes().to_vec();
            body[pos] = byte;
            let _ = decode_webhook(&body);
            let _ = decode_webhook(&body[..cut]);
        }
    }

    #[test]
    fn offsets_other_than_utc_are_understood() {
        let body = FIRING.replace(
            "2026-11-20T23:35:13.24322Z",
            "2026-11-21T00:35:13.24322+01:00",
        );
        let n = decode_webhook(body.as_bytes()).unwrap();
        assert_eq!(
            n.alerts[0].starts_at.to_string(),
            "2026-11-20T23:35:13.24322Z"
        );
    }
}
