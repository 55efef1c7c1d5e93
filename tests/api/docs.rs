//! The user docs hold together: every relative link in README.md, CONTRIBUTING.md and docs/*.md
//! names a file that exists and, with a `#anchor`, a heading that file has; the README stays a
//! first ten minutes, not a reference.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use regex::Regex;

const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, CONTRIBUTING.md and every markdown file in docs/.
fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md"), root().join("CONTRIBUTING.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ is readable").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The text as rendered, for link-finding: fenced code blocks and inline code spans removed,
/// since brackets and parentheses there are code, not links.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            let mut in_code = false;
            for part in line.split('`') {
                if !in_code {
                    out.push_str(part);
                }
                in_code = !in_code;
            }
            out.push('\n');
        }
    }
    out
}

/// GitHub's anchor for a heading: lower-case, punctuation other than `-` and `_` dropped, each
/// space a `-`.
fn github_slug(heading: &str) -> String {
    heading
        .replace('`', "")
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file's headings, with GitHub's `-1`, `-2` for repeats.
fn anchors(markdown: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if fenced || !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let slug = github_slug(line[hashes..].trim());
        let mut anchor = slug.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// Relative link targets in a markdown file: inline `[text](target)` and reference
/// `[label]: target` links, without web and mail addresses.
fn relative_links(markdown: &str) -> Vec<String> {
    let inline = Regex::new(r#"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)"#).unwrap();
    let reference = Regex::new(r"(?m)^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?").unwrap();
    let text = prose(markdown);
    inline
        .captures_iter(&text)
        .chain(reference.captures_iter(&text))
        .map(|c| c[1].to_owned())
        .filter(|t| {
            !["http://", "https://", "mailto:"]
                .iter()
                .any(|s| t.starts_with(s))
        })
        .collect()
}

/// What is wrong with `target` as written in `from`, if anything.
fn broken(from: &Path, target: &str) -> Option<String> {
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        from.to_path_buf()
    } else {
        from.parent().expect("a file has a directory").join(path)
    };
    if !file.exists() {
        return Some(format!("{} does not exist", file.display()));
    }
    let anchor = anchor?;
    if file.extension().is_none_or(|x| x != "md") {
        return None;
    }
    let text = std::fs::read_to_string(&file).expect("a linked markdown file is readable");
    (!anchors(&text).contains(anchor)).then(|| {
        format!(
            "{} has no heading with the anchor #{anchor}",
            file.display()
        )
    })
}

#[test]
fn github_slugs_drop_punctuation_and_keep_hyphens_and_underscores() {
    assert_eq!(github_slug("Crashes and shutdown"), "crashes-and-shutdown");
    assert_eq!(
        github_slug("Self-checks, `/readyz` and `ReactorUnhealthy`"),
        "self-checks-readyz-and-reactorunhealthy"
    );
    assert_eq!(
        github_slug("Guards: exactly-once remediation"),
        "guards-exactly-once-remediation"
    );
    assert_eq!(github_slug("`max_concurrent` & co."), "max_concurrent--co");
    let repeated = anchors("# Notes\n```\n# not a heading\n```\n## Notes\n");
    assert_eq!(repeated, HashSet::from(["notes".into(), "notes-1".into()]));
}

#[test]
fn relative_links_skip_code_and_web_addresses() {
    let text = "See [ops](docs/operations.md#health) and [web](https://example.com).\n\
                `[not](a-link.md)`\n```\n[nor](this.md)\n```\n[ref]: CONTRIBUTING.md\n";
    assert_eq!(
        relative_links(text),
        ["docs/operations.md#health", "CONTRIBUTING.md"]
    );
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in doc_files() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for target in relative_links(&text) {
            checked += 1;
            if let Some(problem) = broken(&file, &target) {
                let name = file.strip_prefix(root()).unwrap_or(&file).display();
                problems.push(format!("{name}: ({target}): {problem}"));
            }
        }
    }
    assert!(
        checked > 0,
        "no relative links found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "{} broken link(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_readme_stays_under_300_lines() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; at most {README_MAX_LINES}: move reference material to docs/"
    );
}
