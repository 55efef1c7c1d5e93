//! `{{ labels.instance }}`-style templates for step parameters and escalation text. A template is
//! parsed once when its playbook loads, so an unknown variable is a load error, not a 3 a.m.
//! surprise; rendering is a walk over pre-split segments.

use std::fmt::Write;

use crate::domain::Alert;

/// Variables a template may name. A label or annotation that the alert lacks renders as "".
pub const VARIABLES: &str = "labels.NAME, annotations.NAME, alertname, fingerprint, status, \
startsAt, playbook, run.id, run.url, step, error";

#[derive(Debug, Clone, PartialEq)]
enum Var {
    Label(String),
    Annotation(String),
    Alertname,
    Fingerprint,
    Status,
    StartsAt,
    Playbook,
    RunId,
    RunUrl,
    Step,
    Error,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    Var(Var),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// What a template is rendered against. Fields other than the alert are optional because step
/// parameters render before a step has failed, and `reactor test` renders without a run.
#[derive(Debug, Clone, Copy)]
pub struct TemplateContext<'a> {
    pub alert: &'a Alert,
    pub playbook: &'a str,
    pub run_id: &'a str,
    pub run_url: &'a str,
    pub step: &'a str,
    pub error: &'a str,
}

impl<'a> TemplateContext<'a> {
    pub fn new(alert: &'a Alert, playbook: &'a str) -> Self {
        TemplateContext {
            alert,
            playbook,
            run_id: "",
            run_url: "",
            step: "",
            error: "",
        }
    }
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                segments.push(Segment::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed '{{{{' in template {src:?}"))?;
            segments.push(Segment::Var(parse_var(after[..close].trim())?));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Text(rest.to_owned()));
        }
        Ok(Template { segments })
    }

    /// True when the template is plain text, so callers may skip rendering.
    pub fn is_literal(&self) -> bool {
        self.segments.iter().all(|s| matches!(s, Segment::Text(_)))
    }

    pub fn render(&self, ctx: &TemplateContext<'_>) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Text(t) => out.push_str(t),
                Segment::Var(v) => {
                    let a = ctx.alert;
                    let value = match v {
                        Var::Label(n) => a.labels.get(n).map(String::as_str).unwrap_or(""),
                        Var::Annotation(n) => {
                            a.annotations.get(n).map(String::as_str).unwrap_or("")
                        }
                        Var::Alertname => a.alertname(),
                        Var::Fingerprint => a.fingerprint.as_str(),
                        Var::Status => a.status.as_str(),
                        Var::StartsAt => {
                            let _ = write!(out, "{}", a.starts_at);
                            continue;
                        }
                        Var::Playbook => ctx.playbook,
                        Var::RunId => ctx.run_id,
                        Var::RunUrl => ctx.run_url,
                        Var::Step => ctx.step,
                        Var::Error => ctx.error,
                    };
                    out.push_str(value);
                }
            }
        }
        out
    }
}

fn parse_var(name: &str) -> Result<Var, String> {
    let unknown = || format!("unknown template variable {name:?}; expected one of {VARIABLES}");
    if let Some(l) = name.strip_prefix("labels.") {
        return valid_key(l)
            .then(|| Var::Label(l.to_owned()))
            .ok_or_else(unknown);
    }
    if let Some(l) = name.strip_prefix("annotations.") {
        return valid_key(l)
            .then(|| Var::Annotation(l.to_owned()))
            .ok_or_else(unknown);
    }
    Ok(match name {
        "alertname" => Var::Alertname,
        "fingerprint" => Var::Fingerprint,
        "status" => Var::Status,
        "startsAt" => Var::StartsAt,
        "playbook" => Var::Playbook,
        "run.id" => Var::RunId,
        "run.url" => Var::RunUrl,
        "step" => Var::Step,
        "error" => Var::Error,
        _ => return Err(unknown()),
    })
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::decode_webhook;
    use proptest::prelude::*;

    fn alert() -> Alert {
        let body = include_str!("../../tests/fixtures/alertmanager-0.25-firing.json");
        decode_webhook(body.as_bytes()).unwrap().alerts.remove(0)
    }

    #[test]
    fn renders_labels_annotations_and_fingerprint() {
        let a = alert();
        let t = Template::parse(
            "{{ labels.instance }}/{{annotations.summary}} #{{ fingerprint }} {{ startsAt }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&TemplateContext::new(&a, "p")),
            "curl-test/posted via curl to /api/v2/alerts #3e27bcf000d7dae4 2026-11-20T23:35:13.24322Z"
        );
    }

    #[test]
    fn missing_labels_render_empty() {
        let a = alert();
        let t = Template::parse("[{{ labels.nope }}]").unwrap();
        assert_eq!(t.render(&TemplateContext::new(&a, "p")), "[]");
    }

    #[test]
    fn unknown_variables_and_unclosed_braces_are_load_errors() {
        let e = Template::parse("{{ label.instance }}").unwrap_err();
        assert!(
            e.contains("unknown template variable \"label.instance\""),
            "{e}"
        );
        assert!(Template::parse("{{ labels.instance")
            .unwrap_err()
            .contains("unclosed"));
        assert!(Template::parse("{{ labels. }}").is_err());
    }

    #[test]
    fn run_context_variables_render() {
        let a = alert();
        let mut ctx = TemplateContext::new(&a, "disk");
        ctx.run_id = "7-0";
        ctx.step = "clean";
        ctx.error = "boom";
        let t = Template::parse(
            "{{playbook}} {{run.id}} {{step}}: {{error}} ({{alertname}}, {{status}})",
        )
        .unwrap();
        assert_eq!(t.render(&ctx), "disk 7-0 clean: boom (HarnessCurl, firing)");
    }

    proptest! {
        #[test]
        fn text_without_braces_renders_verbatim(s in "[^{}]{0,40}") {
            let a = alert();
            let t = Template::parse(&s).unwrap();
            prop_assert!(t.is_literal());
            prop_assert_eq!(t.render(&TemplateContext::new(&a, "p")), s);
        }
    }
}
