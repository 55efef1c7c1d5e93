//! Alertmanager's label matcher syntax: `name="value"`, `name!="value"`, `name=~"regex"`,
//! `name!~"regex"`, optionally as a `{a="b", c=~"d"}` list. Semantics follow Alertmanager: a
//! missing label matches as the empty string, and regexes are fully anchored (`^(?:re)$`).

use std::fmt;

use regex::Regex;

use crate::domain::Labels;

/// The four matcher operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

impl MatchOp {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchOp::Equal => "=",
            MatchOp::NotEqual => "!=",
            MatchOp::Regex => "=~",
            MatchOp::NotRegex => "!~",
        }
    }
}

/// One validated matcher; regexes are compiled once, when the playbook loads.
#[derive(Debug, Clone)]
pub struct LabelMatcher {
    name: String,
    op: MatchOp,
    value: String,
    regex: Option<Pattern>,
}

/// A compiled `=~`/`!~` value. A plain list of literal alternatives (`warning|critical`, the
/// common case) is matched as a set, as Prometheus' `FastRegexMatcher` does: the same answer as
/// the anchored regex, without a regex's ~14 KB and ~70 µs to build (measured, 1,000 playbooks).
#[derive(Debug, Clone)]
enum Pattern {
    Set(Vec<String>),
    Regex(Regex),
}

impl Pattern {
    fn is_match(&self, v: &str) -> bool {
        match self {
            Pattern::Set(set) => set.iter().any(|s| s == v),
            Pattern::Regex(re) => re.is_match(v),
        }
    }

    /// The alternatives when `value` has no regex syntax beyond `|`.
    fn literal_set(value: &str) -> Option<Vec<String>> {
        let literal = |c: char| c.is_ascii_alphanumeric() || "_-:/@=,; ".contains(c);
        value
            .chars()
            .all(|c| c == '|' || literal(c))
            .then(|| value.split('|').map(str::to_owned).collect())
    }
}

impl PartialEq for LabelMatcher {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.op == other.op && self.value == other.value
    }
}

/// A matcher that does not parse: where in the text, and what was expected there.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("bad matcher {input:?} at column {column}: {expected}")]
pub struct MatcherError {
    pub input: String,
    /// 1-based character column in `input`.
    pub column: usize,
    pub expected: String,
}

impl LabelMatcher {
    pub fn new(name: &str, op: MatchOp, value: &str) -> Result<Self, String> {
        if !is_label_name(name) {
            return Err(format!(
                "label name {name:?} must match [a-zA-Z_][a-zA-Z0-9_]*"
            ));
        }
        let regex = match op {
            MatchOp::Regex | MatchOp::NotRegex => match Pattern::literal_set(value) {
                Some(set) => Some(Pattern::Set(set)),
                None => Some(Pattern::Regex(
                    Regex::new(&format!("^(?:{value})$")).map_err(|e| {
                        // regex's syntax errors draw a caret diagram over several lines; keep the gist.
                        let text = e.to_string();
                        let gist = text
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("")
                            .trim()
                            .to_owned();
                        format!("invalid regex {value:?}: {gist}")
                    })?,
                )),
            },
            _ => None,
        };
        Ok(LabelMatcher {
            name: name.to_owned(),
            op,
            value: value.to_owned(),
            regex,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn op(&self) -> MatchOp {
        self.op
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    /// True when the label set satisfies this matcher (absent labels count as "").
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.name).map(String::as_str).unwrap_or("");
        match (self.op, &self.regex) {
            (MatchOp::Equal, _) => v == self.value,
            (MatchOp::NotEqual, _) => v != self.value,
            (MatchOp::Regex, Some(re)) => re.is_match(v),
            (MatchOp::NotRegex, Some(re)) => !re.is_match(v),
            (_, None) => unreachable!("regex operators always carry a compiled regex"),
        }
    }
}

impl fmt::Display for LabelMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}\"", self.name, self.op.as_str())?;
        for c in self.value.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses one matcher or a comma-separated list, optionally wrapped in `{}`.
pub fn parse_matchers(input: &str) -> Result<Vec<LabelMatcher>, MatcherError> {
    let mut p = Parser {
        input,
        chars: input.chars().collect(),
        pos: 0,
    };
    p.skip_ws();
    let braced = p.eat('{');
    let mut out = Vec::new();
    loop {
        p.skip_ws();
        if braced && p.eat('}') {
            break;
        }
        if p.at_end() {
            if braced {
                return Err(p.error("'}' to close the matcher list"));
            }
            break;
        }
        out.push(p.matcher()?);
        p.skip_ws();
        if p.eat(',') {
            continue;
        }
        if braced {
            p.skip_ws();
            if p.eat('}') {
                break;
            }
            return Err(p.error("',' or '}'"));
        }
        if !p.at_end() {
            return Err(p.error("',' between matchers"));
        }
    }
    p.skip_ws();
    if !p.at_end() {
        return Err(p.error("end of input"));
    }
    if out.is_empty() {
        return Err(p.error("at least one matcher such as severity=\"critical\""));
    }
    Ok(out)
}

struct Parser<'a> {
    input: &'a str,
    chars: Vec<char>,
    pos: usize,
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn error(&self, expected: &str) -> MatcherError {
        MatcherError {
            input: self.input.to_owned(),
            column: self.pos + 1,
            expected: format!("expected {expected}"),
        }
    }

    fn matcher(&mut self) -> Result<LabelMatcher, MatcherError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        let name: String = self.chars[start..self.pos].iter().collect();
        if name.is_empty() {
            return Err(self.error("a label name"));
        }
        self.skip_ws();
        let op_pos = self.pos;
        let op = match (self.peek(), self.chars.get(self.pos + 1).copied()) {
            (Some('='), Some('~')) => MatchOp::Regex,
            (Some('!'), Some('~')) => MatchOp::NotRegex,
            (Some('!'), Some('=')) => MatchOp::NotEqual,
            (Some('='), _) => MatchOp::Equal,
            _ => return Err(self.error("an operator: =, !=, =~ or !~")),
        };
        self.pos += op.as_str().len();
        self.skip_ws();
        let value = if self.eat('"') {
            self.quoted()?
        } else {
            let start = self.pos;
            while self.peek().is_some_and(|c| c != ',' && c != '}') {
                self.pos += 1;
            }
            let v: String = self.chars[start..self.pos].iter().collect();
            let v = v.trim_end().to_owned();
            if v.contains('"') {
                self.pos = start;
                return Err(self.error("a value in double quotes"));
            }
            v
        };
        LabelMatcher::new(&name, op, &value).map_err(|expected| MatcherError {
            input: self.input.to_owned(),
            column: if is_label_name(&name) {
                op_pos + 1
            } else {
                start + 1
            },
            expected,
        })
    }

    fn quoted(&mut self) -> Result<String, MatcherError> {
        let mut v = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("a closing '\"'")),
                Some('"') => {
                    self.pos += 1;
                    return Ok(v);
                }
                Some('\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some('n') => v.push('\n'),
                        Some('"') => v.push('"'),
                        Some('\\') => v.push('\\'),
                        // Keep regex escapes such as \d intact, as Alertmanager does.
                        Some(c) => {
                            v.push('\\');
                            v.push(c);
                        }
                        None => return Err(self.error("a character after '\\'")),
                    }
                    self.pos += 1;
                }
                Some(c) => {
                    v.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn one(s: &str) -> LabelMatcher {
        let mut m = parse_matchers(s).unwrap();
        assert_eq!(m.len(), 1);
        m.remove(0)
    }

    #[test]
    fn parses_all_four_operators() {
        assert_eq!(one(r#"a="b""#).op(), MatchOp::Equal);
        assert_eq!(one(r#"a!="b""#).op(), MatchOp::NotEqual);
        assert_eq!(one(r#"a=~"b""#).op(), MatchOp::Regex);
        assert_eq!(one(r#"a!~"b""#).op(), MatchOp::NotRegex);
        assert_eq!(one("severity = critical").value(), "critical");
    }

    #[test]
    fn regexes_are_anchored_like_alertmanager() {
        let m = one(r#"severity=~"warn|crit""#);
        assert!(m.matches(&labels(&[("severity", "warn")])));
        assert!(m.matches(&labels(&[("severity", "crit")])));
        assert!(!m.matches(&labels(&[("severity", "warning")])));
        assert!(!m.matches(&labels(&[("severity", "xcrit")])));
    }

    #[test]
    fn missing_label_matches_as_empty_string() {
        let l = labels(&[("a", "1")]);
        assert!(one(r#"team="""#).matches(&l));
        assert!(one(r#"team!="x""#).matches(&l));
        assert!(!one(r#"team=~".+""#).matches(&l));
        assert!(one(r#"team!~".+""#).matches(&l));
    }

    #[test]
    fn parses_braced_lists_with_escapes() {
        let ms =
            parse_matchers(r#"{alertname="Disk", path=~"/var/\"x\"|\\d+", env!="dev",}"#).unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[1].value(), r#"/var/"x"|\d+"#);
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let e = parse_matchers(r#"severity=~"(unclosed""#).unwrap_err();
        assert!(e.expected.contains("invalid regex"), "{e}");
        let e = parse_matchers(r#"severity"x""#).unwrap_err();
        assert_eq!(e.column, 9);
        assert!(e.expected.contains("operator"), "{e}");
        let e = parse_matchers(r#"a="b"#).unwrap_err();
        assert!(e.expected.contains("closing"), "{e}");
        let e = parse_matchers(r#"{a="b""#).unwrap_err();
        assert!(e.expected.contains("'}'"), "{e}");
        assert!(parse_matchers("").is_err());
        assert!(parse_matchers("1a=b").is_err());
    }

    fn op() -> impl Strategy<Value = MatchOp> {
        prop_oneof![
            Just(MatchOp::Equal),
            Just(MatchOp::NotEqual),
            Just(MatchOp::Regex),
            Just(MatchOp::NotRegex)
        ]
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(
            name in "[a-zA-Z_][a-zA-Z0-9_]{0,12}",
            op in op(),
            value in "[ -~\n]{0,20}",
        ) {
            // Values that are not valid regexes cannot form a regex matcher at all.
            prop_assume!(LabelMatcher::new(&name, op, &value).is_ok());
            let m = LabelMatcher::new(&name, op, &value).unwrap();
            let parsed = parse_matchers(&m.to_string()).unwrap();
            prop_assert_eq!(parsed, vec![m]);
        }

        #[test]
        fn literal_sets_match_exactly_like_the_anchored_regex(
            value in "[a-c_:|-]{0,10}",
            label in "[a-c_:|-]{0,6}",
        ) {
            let m = LabelMatcher::new("l", MatchOp::Regex, &value).unwrap();
            prop_assert!(matches!(m.regex, Some(Pattern::Set(_))));
            let re = Regex::new(&format!("^(?:{value})$")).unwrap();
            prop_assert_eq!(m.matches(&labels(&[("l", &label)])), re.is_match(&label));
        }

        #[test]
        fn parser_never_panics(input in "\\PC{0,40}") {
            let _ = parse_matchers(&input);
        }

        #[test]
        fn equality_matches_exactly_its_value(value in "[a-z]{0,8}", other in "[a-z]{0,8}") {
            let m = LabelMatcher::new("l", MatchOp::Equal, &value).unwrap();
            prop_assert_eq!(m.matches(&labels(&[("l", &other)])), value == other);
            let n = LabelMatcher::new("l", MatchOp::NotEqual, &value).unwrap();
            prop_assert_eq!(n.matches(&labels(&[("l", &other)])), value != other);
        }
    }
}
