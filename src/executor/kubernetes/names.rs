//! Kubernetes names as the API server accepts them, checked before any call. A name or namespace
//! usually comes from an alert's labels, which anyone who can write a metric controls; kube-rs
//! joins names into request paths as they are, so `web#` would cut off `?dryRun=All` and
//! `shop/../kube-system` would climb out of the namespace policy. [`Namespace`] and
//! [`ObjectName`] can only be built from strings that follow the DNS-1123 rules (lower-case
//! letters, digits, `-` and `.`, no empty or dot-only segment), so every path segment built from
//! them is literal: the checks are the encoding.

use std::fmt;

/// Longest namespace (a DNS-1123 label).
const MAX_LABEL: usize = 63;
/// Longest object name (a DNS-1123 subdomain).
const MAX_SUBDOMAIN: usize = 253;
/// How much of a refused value an error repeats.
const SHOWN: usize = 80;

/// A name refused before any call: which parameter, the value, and the rule it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {shown}: not a valid Kubernetes {what} ({rule}); nothing was sent", shown = shown(.value))]
pub struct InvalidName {
    pub field: &'static str,
    pub value: String,
    pub what: &'static str,
    pub rule: &'static str,
}

/// A namespace: a DNS-1123 label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(String);

/// The name of a pod, workload, node, Job or HPA: a DNS-1123 subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName(String);

impl Namespace {
    pub fn parse(field: &'static str, value: &str) -> Result<Namespace, InvalidName> {
        let err = |rule| InvalidName {
            field,
            value: value.to_owned(),
            what: "namespace",
            rule,
        };
        if value.len() > MAX_LABEL {
            return Err(err("at most 63 characters"));
        }
        check_label(value).map_err(err)?;
        Ok(Namespace(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ObjectName {
    pub fn parse(field: &'static str, value: &str) -> Result<ObjectName, InvalidName> {
        let err = |rule| InvalidName {
            field,
            value: value.to_owned(),
            what: "object name",
            rule,
        };
        if value.len() > MAX_SUBDOMAIN {
            return Err(err("at most 253 characters"));
        }
        for label in value.split('.') {
            check_label(label).map_err(err)?;
        }
        Ok(ObjectName(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn check_label(label: &str) -> Result<(), &'static str> {
    let bytes = label.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err("must not be empty, nor have an empty part between dots");
    };
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err("only lower-case letters, digits, '-' and '.' are allowed");
    }
    if *first == b'-' || *last == b'-' {
        return Err("each part must start and end with a letter or digit");
    }
    Ok(())
}

/// The value as an error shows it: quoted and escaped, cut short when long.
fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}…", &value[..cut]),
        None => format!("{value:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass() {
        for n in [
            "web",
            "web-7d9c-abcde",
            "a",
            "0",
            "ip-10-0-1-2.eu-west-1.compute.internal",
        ] {
            assert_eq!(ObjectName::parse("name", n).unwrap().as_str(), n);
        }
        for n in ["default", "shop-2", "x"] {
            assert_eq!(Namespace::parse("namespace", n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn names_that_would_change_the_request_are_refused() {
        for n in [
            "api%23",
            "cart?dryRun=",
            "a/b",
            "..",
            ".",
            "",
            "Web",
            "web ",
            "-web",
            "web-",
            "a..b",
            "caf\u{e9}",
            "web\n",
            "x;y",
        ] {
            let e = ObjectName::parse("name", n).unwrap_err();
            assert_eq!(e.field, "name", "{n:?}");
        }
        for n in [
            "shop/../kube-system",
            "shop.prod",
            "kube_system",
            &"n".repeat(64),
        ] {
            assert!(Namespace::parse("namespace", n).is_err(), "{n:?}");
        }
        assert!(ObjectName::parse("pod", &"p".repeat(254)).is_err());
        let e = ObjectName::parse("deployment", "checkout#top").unwrap_err();
        assert_eq!(
            e.to_string(),
            "deployment \"checkout#top\": not a valid Kubernetes object name (only lower-case \
             letters, digits, '-' and '.' are allowed); nothing was sent"
        );
    }

    #[test]
    fn a_long_refused_value_is_shown_cut_short() {
        let e = ObjectName::parse("pod", &"é".repeat(500)).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
    }

    proptest::proptest! {
        /// Whatever a label holds, an accepted name is a literal path segment: no separator, no
        /// query or fragment, no escape, no dot segment.
        #[test]
        fn an_accepted_name_is_always_a_literal_path_segment(s in "\\PC{0,40}|[a-z0-9.%#?/-]{0,12}") {
            if let Ok(n) = ObjectName::parse("name", &s) {
                let n = n.as_str();
                proptest::prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
                proptest::prop_assert!(n != "." && n != ".." && !n.is_empty());
            }
            if let Ok(n) = Namespace::parse("namespace", &s) {
                proptest::prop_assert!(n.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            }
        }
    }
}
