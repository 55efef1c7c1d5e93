//! `reactor oncall [TEAM] [--at TIME]`: who is on call now (or at a time) for each team, and whom
//! each level of its escalation policy would notify, read from the on-call files. It needs no
//! running service, so it answers the same on a laptop with the repository checked out.

use std::process::ExitCode;

use jiff::civil::DateTime;
use jiff::Timestamp;

use crate::config::Settings;
use crate::incident::oncall::{self, OnCall, OnDuty, Team};

/// `TIME` as an instant: RFC 3339 (`2027-03-29T07:30:00Z`), or a local date and time read in
/// the team's zone (`2027-03-29T09:30`).
fn instant(at: Option<&str>, team: &Team) -> Result<Timestamp, String> {
    let Some(text) = at else {
        return Ok(Timestamp::now());
    };
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    let zone = team
        .schedule
        .as_ref()
        .map_or(jiff::tz::TimeZone::UTC, |s| s.time_zone.clone());
    text.parse::<DateTime>()
        .ok()
        .and_then(|dt| dt.to_zoned(zone).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| {
            format!("--at {text:?}: expected an RFC 3339 instant (2027-03-29T07:30:00Z) or a local time (2027-03-29T09:30)")
        })
}

fn duty(d: &OnDuty, team: &Team) -> String {
    let zone = team
        .schedule
        .as_ref()
        .map_or(jiff::tz::TimeZone::UTC, |s| s.time_zone.clone());
    match d.until {
        Some(until) => format!(
            "{} ({}, until {})",
            d.person,
            d.why,
            until.to_zoned(zone).strftime("%Y-%m-%d %H:%M %Z")
        ),
        None => format!("{} ({})", d.person, d.why),
    }
}

fn show(oncall: &OnCall, team: &Team, t: Timestamp) -> String {
    let zone = team
        .schedule
        .as_ref()
        .map_or(jiff::tz::TimeZone::UTC, |s| s.time_zone.clone());
    let mut out = format!(
        "{} at {}\n",
        team.name,
        t.to_zoned(zone).strftime("%Y-%m-%d %H:%M %Z (%:z)")
    );
    let none = "nobody".to_owned();
    out.push_str(&format!(
        "  on call: {}\n",
        oncall
            .oncall(team, t)
            .map_or(none.clone(), |d| duty(&d, team))
    ));
    out.push_str(&format!(
        "  escalation contact: {}\n",
        oncall
            .escalation_contact(team, t)
            .map_or(none.clone(), |d| duty(&d, team))
    ));
    if let Some(policy) = &team.policy {
        for (i, level) in policy.levels.iter().enumerate() {
            let who: Vec<String> = oncall
                .level_duty(team, level, t)
                .iter()
                .map(|(_, d)| format!("{} ({})", d.person, d.why))
                .collect();
            out.push_str(&format!(
                "  level {} (then {}): {}\n",
                i + 1,
                humantime::format_duration(level.timeout),
                if who.is_empty() {
                    none.clone()
                } else {
                    who.join(", ")
                }
            ));
        }
        if policy.repeat > 0 {
            out.push_str(&format!("  repeated {} time(s)\n", policy.repeat));
        }
    }
    out
}

pub(super) fn oncall(settings: &Settings, team: Option<String>, at: Option<String>) -> ExitCode {
    let loaded = match oncall::load_dir(&settings.oncall_dir) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let teams: Vec<&Team> = match &team {
        Some(name) => match loaded.teams.get(name) {
            Some(t) => vec![t],
            None => {
                let known: Vec<&str> = loaded.teams.keys().map(String::as_str).collect();
                eprintln!("unknown team {name:?} (teams: {})", known.join(", "));
                return ExitCode::FAILURE;
            }
        },
        None => loaded.teams.values().collect(),
    };
    if teams.is_empty() {
        eprintln!("no teams in {}", settings.oncall_dir.display());
        return ExitCode::FAILURE;
    }
    for team in teams {
        match instant(at.as_deref(), team) {
            Ok(t) => print!("{}", show(&loaded, team, t)),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::SUCCESS
}
