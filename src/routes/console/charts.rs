//! Server-side SVG charts for the console: runs per hour by outcome over the last day, and the
//! daily median time to claim and to resolve over the last 30 days. Built from numbers and fixed
//! words only, so the SVG is safe to place in a page as it is.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use jiff::{SignedDuration, Timestamp};

use crate::incident::Incident;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 24.0;

/// The colour of an outcome (fixed words only reach the SVG).
fn colour(outcome: &str) -> (&'static str, &'static str) {
    match outcome {
        "succeeded" => ("succeeded", "#2e7d32"),
        "failed" => ("failed", "#c62828"),
        "verifying" | "running" => ("in progress", "#1565c0"),
        _ => ("other", "#9e9e9e"),
    }
}

fn frame(svg: &mut String, title: &str, max: f64, unit: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}" class="chart"><title>{title}</title>"#
    );
    for k in 0..=4 {
        let y = (HEIGHT - BOTTOM) * (1.0 - k as f64 / 4.0);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{WIDTH}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{}{unit}</text>",
            LEFT - 4.0,
            y + 3.0,
            fmt_number(max * k as f64 / 4.0)
        );
    }
}

fn fmt_number(v: f64) -> String {
    if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Stacked bars: runs received in each of the last 24 hours, by outcome.
pub fn runs_per_hour(runs: &[(Timestamp, &str)], now: Timestamp) -> String {
    let hour = |t: Timestamp| (now.as_second() - t.as_second()).div_euclid(3600);
    let mut buckets: BTreeMap<i64, BTreeMap<&'static str, u32>> = BTreeMap::new();
    for (t, outcome) in runs {
        let h = hour(*t);
        if (0..24).contains(&h) {
            *buckets
                .entry(23 - h)
                .or_default()
                .entry(colour(outcome).0)
                .or_default() += 1;
        }
    }
    let max = buckets
        .values()
        .map(|b| b.values().sum::<u32>())
        .max()
        .unwrap_or(0)
        .max(4) as f64;
    let mut svg = String::new();
    frame(&mut svg, "Runs per hour by outcome, last 24 hours", max, "");
    let slot = (WIDTH - LEFT) / 24.0;
    let plot = HEIGHT - BOTTOM;
    for (i, b) in &buckets {
        let mut y = plot;
        for (label, fill) in [
            colour("succeeded"),
            colour("failed"),
            colour("running"),
            colour("other"),
        ] {
            let n = b.get(label).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let h = plot * f64::from(n) / max;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{fill}\"><title>{n} {label}</title></rect>",
                LEFT + *i as f64 * slot + 1.0,
                slot - 2.0
            );
        }
    }
    x_labels(&mut svg, slot, &[(0, "-24h"), (12, "-12h"), (23, "now")]);
    legend(
        &mut svg,
        &[
            colour("succeeded"),
            colour("failed"),
            colour("running"),
            colour("other"),
        ],
    );
    svg.push_str("</svg>");
    svg
}

/// Labels under the slots `k` of width `slot`.
fn x_labels(svg: &mut String, slot: f64, labels: &[(usize, &str)]) {
    for (k, label) in labels {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{label}</text>",
            LEFT + *k as f64 * slot,
            HEIGHT - 6.0
        );
    }
}

fn legend(svg: &mut String, items: &[(&str, &str)]) {
    for (k, (label, fill)) in items.iter().enumerate() {
        let x = LEFT + 8.0 + k as f64 * 110.0;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"4\" width=\"10\" height=\"10\" fill=\"{fill}\"/><text x=\"{:.1}\" y=\"13\" font-size=\"11\">{label}</text>",
            x + 14.0
        );
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Two lines: the daily median minutes from opening to claim and to resolution, last 30 days.
pub fn claim_and_resolve(incidents: &[Incident], now: Timestamp) -> String {
    let day = |t: Timestamp| (now.as_second() - t.as_second()).div_euclid(86_400);
    let minutes = |d: SignedDuration| d.as_secs_f64().max(0.0) / 60.0;
    let mut claim: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let mut resolve: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for i in incidents {
        let d = day(i.created_at);
        if !(0..30).contains(&d) {
            continue;
        }
        if let Some(c) = i.claimed_at {
            claim
                .entry(29 - d)
                .or_default()
                .push(minutes(c.duration_since(i.created_at)));
        }
        if let Some(r) = i.resolved_at {
            resolve
                .entry(29 - d)
                .or_default()
                .push(minutes(r.duration_since(i.created_at)));
        }
    }
    let claim: BTreeMap<i64, f64> = claim
        .into_iter()
        .filter_map(|(d, v)| Some((d, median(v)?)))
        .collect();
    let resolve: BTreeMap<i64, f64> = resolve
        .into_iter()
        .filter_map(|(d, v)| Some((d, median(v)?)))
        .collect();
    let max = claim
        .values()
        .chain(resolve.values())
        .copied()
        .fold(10.0_f64, f64::max);
    let mut svg = String::new();
    frame(
        &mut svg,
        "Median minutes to claim and to resolve, by day, last 30 days",
        max,
        "m",
    );
    let slot = (WIDTH - LEFT) / 30.0;
    let plot = HEIGHT - BOTTOM;
    for (points, fill) in [(&claim, "#1565c0"), (&resolve, "#2e7d32")] {
        let path: Vec<String> = points
            .iter()
            .map(|(d, m)| {
                format!(
                    "{:.1},{:.1}",
                    LEFT + (*d as f64 + 0.5) * slot,
                    plot * (1.0 - m / max)
                )
            })
            .collect();
        if path.len() > 1 {
            let _ = write!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{fill}\" stroke-width=\"2\"/>",
                path.join(" ")
            );
        }
        for p in &path {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(
                svg,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{fill}\"/>"
            );
        }
    }
    x_labels(&mut svg, slot, &[(0, "-30d"), (15, "-15d"), (29, "today")]);
    legend(
        &mut svg,
        &[("time to claim", "#1565c0"), ("time to resolve", "#2e7d32")],
    );
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_charts_are_svg_with_a_bar_per_outcome_and_a_point_per_day() {
        let now: Timestamp = "2027-03-29T12:00:00Z".parse().unwrap();
        let runs = [
            ("2027-03-29T11:10:00Z".parse().unwrap(), "succeeded"),
            ("2027-03-29T11:20:00Z".parse().unwrap(), "failed"),
            ("2027-03-28T11:20:00Z".parse().unwrap(), "failed"),
        ];
        let svg = runs_per_hour(&runs, now);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(
            svg.contains("<title>1 succeeded</title>") && svg.contains("<title>1 failed</title>")
        );
        assert_eq!(
            svg.matches("<rect x").count(),
            2 + 4,
            "two bars, four legend keys"
        );
        assert!(claim_and_resolve(&[], now).contains("time to claim"));
    }
}
