//! The on-call files: every `*.yaml` in the on-call directory (`oncall_dir`, default `oncall/`)
//! names people and how to reach them, teams with their schedule and escalation policy, and the
//! services the teams own. They are checked like playbooks: a problem is reported with its file,
//! line and what was expected, and an unknown team, person or channel is named.
//!
//! ```yaml
//! people:
//!   - name: alice
//!     contacts: [{channel: ops-mail, address: alice@example.com}]
//! teams:
//!   - name: devops
//!     escalation_contact: alice
//!     schedule:
//!       time_zone: Europe/Berlin
//!       rotations:
//!         - {name: primary, shift: weekly, handoff: "09:00", start: 2027-01-04, participants: [alice]}
//!     policy:
//!       levels:
//!         - {notify: [oncall], timeout: 10m}
//!         - {notify: [escalation_contact]}
//! services:
//!   - name: athens
//!     team: devops
//! ```

pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::bounds;
use crate::playbook::{LoadError, LoadErrors};
pub use schedule::{CalendarDay, OnDuty, Override, Rotation, Schedule, Shift};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    people: Vec<Spanned<RawPerson>>,
    #[serde(default)]
    teams: Vec<Spanned<RawTeam>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerson {
    name: String,
    #[serde(default)]
    contacts: Vec<Spanned<RawContact>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContact {
    channel: String,
    #[serde(default)]
    address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    escalation_contact: Option<Spanned<String>>,
    #[serde(default)]
    schedule: Option<Spanned<RawSchedule>>,
    #[serde(default)]
    policy: Option<Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    rotations: Vec<Spanned<RawRotation>>,
    #[serde(default)]
    overrides: Vec<Spanned<RawOverride>>,
    #[serde(default)]
    calendar: Vec<Spanned<RawDay>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    name: String,
    shift: String,
    #[serde(default = "midnight")]
    handoff: String,
    start: String,
    participants: Vec<String>,
}

fn midnight() -> String {
    "00:00".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    person: String,
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDay {
    date: String,
    #[serde(default)]
    oncall: Option<String>,
    #[serde(default)]
    escalation_contact: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    repeat: u64,
    levels: Vec<Spanned<RawLevel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLevel {
    notify: Vec<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    team: Spanned<String>,
    #[serde(default)]
    description: String,
}

/// A service and the team that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub team: String,
    pub description: String,
}

/// One way to reach a person: a configured channel, and their address on it (an email address,
/// a Slack member id, an Opsgenie user) where the channel needs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub channel: String,
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub name: String,
    pub contacts: Vec<Contact>,
}

/// Whom a level notifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The schedule's on-call at that moment.
    OnCall,
    /// The calendar day's escalation contact, else the team's.
    EscalationContact,
    Person(String),
    /// A channel as it is configured (a team's Slack channel), no person.
    Channel(String),
}

impl Target {
    fn parse(s: &str) -> Option<Target> {
        match s {
            "oncall" | "on-call" => Some(Target::OnCall),
            "escalation_contact" | "manager" => Some(Target::EscalationContact),
            _ => match s.split_once(':') {
                Some(("person", p)) if !p.is_empty() => Some(Target::Person(p.to_owned())),
                Some(("channel", c)) if !c.is_empty() => Some(Target::Channel(c.to_owned())),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    pub notify: Vec<Target>,
    /// How long to wait for a claim before the next level.
    pub timeout: Duration,
}

/// Ordered levels, gone through `repeat + 1` times while nobody claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub levels: Vec<Level>,
    pub repeat: u32,
}

impl Policy {
    /// How many notifications steps the policy has in all (levels × rounds).
    pub fn steps(&self) -> u32 {
        (self.levels.len() as u32).saturating_mul(self.repeat.saturating_add(1))
    }
}

#[derive(Debug, Clone)]
pub struct Team {
    pub name: String,
    pub description: String,
    pub escalation_contact: Option<String>,
    pub schedule: Option<Schedule>,
    pub policy: Option<Policy>,
}

/// The level's default wait for a claim.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(600);

/// One notification an escalation level sends: a channel, and the person and their address on
/// it (none when the level names the channel itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub person: Option<String>,
    pub channel: String,
    pub address: Option<String>,
    /// `oncall (rotation primary)`, `escalation contact (calendar)`, `person`, `channel`.
    pub role: String,
}

/// The people, teams and services in force.
#[derive(Debug, Clone, Default)]
pub struct OnCall {
    pub people: BTreeMap<String, Person>,
    pub teams: BTreeMap<String, Team>,
    pub services: BTreeMap<String, Service>,
    /// Every channel a contact (`true`: with an address) or a level (`None`) names, with where:
    /// checked against the configuration.
    channel_refs: Vec<(PathBuf, u64, String, Option<bool>)>,
}

impl OnCall {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// The names an approval gate's `from` may take: every team and every person.
    pub fn approvers(&self) -> Vec<String> {
        self.teams
            .keys()
            .chain(self.people.keys())
            .cloned()
            .collect()
    }

    /// Whom an approval from `from` asks, as a team and its policy: a team's own policy (or,
    /// without one, its on-call once with the default wait); a person alone, once.
    pub fn approval_route(&self, from: &str) -> Option<(Team, Policy)> {
        let once = |notify| Policy {
            levels: vec![Level {
                notify,
                timeout: DEFAULT_ACK_TIMEOUT,
            }],
            repeat: 0,
        };
        if let Some(team) = self.teams.get(from) {
            let policy = team
                .policy
                .clone()
                .unwrap_or_else(|| once(vec![Target::OnCall]));
            return Some((team.clone(), policy));
        }
        let person = self.people.get(from)?;
        let team = Team {
            name: person.name.clone(),
            description: String::new(),
            escalation_contact: None,
            schedule: None,
            policy: None,
        };
        Some((team, once(vec![Target::Person(person.name.clone())])))
    }

    /// The policy of the team that owns `service`.
    pub fn policy_of(&self, service: &str) -> Option<(&Team, &Policy)> {
        let team = self.teams.get(&self.service(service)?.team)?;
        Some((team, team.policy.as_ref()?))
    }

    /// The on-call of `team` at `t`.
    pub fn oncall(&self, team: &Team, t: Timestamp) -> Option<OnDuty> {
        team.schedule.as_ref()?.oncall(t)
    }

    /// The escalation contact of `team` at `t`: the calendar's, else the team's.
    pub fn escalation_contact(&self, team: &Team, t: Timestamp) -> Option<OnDuty> {
        team.schedule
            .as_ref()
            .and_then(|s| s.escalation_contact(t))
            .or_else(|| {
                Some(OnDuty {
                    person: team.escalation_contact.clone()?,
                    why: "team".into(),
                    until: None,
                })
            })
    }

    /// Who a level of `team`'s policy notifies at `t`, as people on duty (or a channel's name).
    pub fn level_duty(&self, team: &Team, level: &Level, t: Timestamp) -> Vec<(Target, OnDuty)> {
        level
            .notify
            .iter()
            .filter_map(|target| {
                let duty = match target {
                    Target::OnCall => self.oncall(team, t)?,
                    Target::EscalationContact => self.escalation_contact(team, t)?,
                    Target::Person(p) => OnDuty {
                        person: p.clone(),
                        why: "named".into(),
                        until: None,
                    },
                    Target::Channel(c) => OnDuty {
                        person: c.clone(),
                        why: "channel".into(),
                        until: None,
                    },
                };
                Some((target.clone(), duty))
            })
            .collect()
    }

    /// Every notification a level of `team`'s policy sends at `t`.
    pub fn recipients(&self, team: &Team, level: &Level, t: Timestamp) -> Vec<Recipient> {
        let mut out = Vec::new();
        for (target, duty) in self.level_duty(team, level, t) {
            let role = match target {
                Target::OnCall => format!("oncall ({})", duty.why),
                Target::EscalationContact => format!("escalation contact ({})", duty.why),
                Target::Person(_) => "person".into(),
                Target::Channel(c) => {
                    out.push(Recipient {
                        person: None,
                        channel: c,
                        address: None,
                        role: "channel".into(),
                    });
                    continue;
                }
            };
            for c in self
                .people
                .get(&duty.person)
                .map_or(&[][..], |p| &p.contacts)
            {
                out.push(Recipient {
                    person: Some(duty.person.clone()),
                    channel: c.channel.clone(),
                    address: c.address.clone(),
                    role: role.clone(),
                });
            }
        }
        out
    }

    /// Every channel named by a contact or a level that is not in `known`, and every contact
    /// without an address on a channel that needs one to reach a single person (email, Slack,
    /// Opsgenie: without it the page would reach the channel's whole audience), at its file and
    /// line.
    pub fn check_channels(
        &self,
        known: &[&str],
        needs_address: impl Fn(&str) -> bool,
    ) -> Result<(), LoadErrors> {
        let errors: Vec<LoadError> = self
            .channel_refs
            .iter()
            .filter_map(|(file, line, c, address)| {
                let message = if !known.contains(&c.as_str()) {
                    format!(
                        "unknown channel {c:?} (channels: {})",
                        if known.is_empty() {
                            "none configured".to_owned()
                        } else {
                            known.join(", ")
                        }
                    )
                } else if *address == Some(false) && needs_address(c) {
                    format!("a contact on channel {c:?} needs an address (the person's email address, Slack member id or Opsgenie user)")
                } else {
                    return None;
                };
                Some(LoadError {
                    file: file.clone(),
                    line: Some(*line),
                    message,
                })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LoadErrors(errors))
        }
    }
}

/// A name people, teams and services may take: letters, digits, `-`, `_`, `.`; 1 to 128
/// characters.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The problems found so far, each at its file and line.
struct Problems(Vec<LoadError>);

impl Problems {
    fn at(&mut self, file: &Path, line: u64, message: String) {
        self.0.push(LoadError {
            file: file.to_owned(),
            line: Some(line),
            message,
        });
    }

    /// Records a duplicate or an invalid name; `true` when `name` may be taken.
    fn name(
        &mut self,
        seen: &mut BTreeMap<String, (PathBuf, u64)>,
        what: &str,
        name: &str,
        file: &Path,
        line: u64,
    ) -> bool {
        if !valid_name(name) {
            self.at(
                file,
                line,
                format!("{what} name {name:?}: expected 1 to 128 letters, digits, '-', '_' or '.'"),
            );
            false
        } else if let Some((f, l)) = seen.get(name) {
            self.at(
                file,
                line,
                format!(
                    "duplicate {what} {name:?}, first defined at {}:{l}",
                    f.display()
                ),
            );
            false
        } else {
            seen.insert(name.to_owned(), (file.to_owned(), line));
            true
        }
    }
}

/// Reads every `*.yaml`/`*.yml` file of `dir`, sorted; `None` when it does not exist.
fn read_files(dir: &Path, problems: &mut Vec<LoadError>) -> Vec<(PathBuf, RawFile)> {
    let files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            problems.push(LoadError {
                file: dir.to_owned(),
                line: None,
                message: format!("cannot read the on-call directory: {e}"),
            });
            return Vec::new();
        }
        Ok(entries) => {
            let mut f: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            f.sort();
            f
        }
    };
    let mut out = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(LoadError {
                    file,
                    line: None,
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        match serde_saphyr::from_str::<RawFile>(&text) {
            Ok(raw) => out.push((file, raw)),
            Err(e) => {
                let line = e.location().map(|l| l.line());
                let message = e.to_string().lines().next().unwrap_or_default().to_owned();
                problems.push(LoadError {
                    file,
                    line,
                    message: format!("YAML: {message}"),
                });
            }
        }
    }
    out
}

/// Loads every `*.yaml`/`*.yml` file of `dir`. A directory that does not exist holds nothing.
pub fn load_dir(dir: &Path) -> Result<OnCall, LoadErrors> {
    let mut read_problems = Vec::new();
    let raw_files = read_files(dir, &mut read_problems);
    let mut p = Problems(read_problems);
    let mut oncall = OnCall::default();

    let mut seen = BTreeMap::new();
    for (file, raw) in &raw_files {
        for person in &raw.people {
            let line = person.referenced.line();
            let name = &person.value.name;
            if !p.name(&mut seen, "person", name, file, line) {
                continue;
            }
            let mut contacts = Vec::new();
            for c in &person.value.contacts {
                oncall.channel_refs.push((
                    file.clone(),
                    c.referenced.line(),
                    c.value.channel.clone(),
                    Some(c.value.address.as_ref().is_some_and(|a| !a.is_empty())),
                ));
                contacts.push(Contact {
                    channel: c.value.channel.clone(),
                    address: c.value.address.clone().filter(|a| !a.is_empty()),
                });
            }
            oncall.people.insert(
                name.clone(),
                Person {
                    name: name.clone(),
                    contacts,
                },
            );
        }
    }

    let mut seen = BTreeMap::new();
    for (file, raw) in &raw_files {
        for t in &raw.teams {
            let line = t.referenced.line();
            if !p.name(&mut seen, "team", &t.value.name, file, line) {
                continue;
            }
            let team = load_team(&t.value, file, &mut oncall, &mut p);
            oncall.teams.insert(team.name.clone(), team);
        }
    }

    let mut seen = BTreeMap::new();
    for (file, raw) in &raw_files {
        for s in &raw.services {
            let line = s.referenced.line();
            let (name, team) = (&s.value.name, &s.value.team);
            if !p.name(&mut seen, "service", name, file, line) {
                continue;
            }
            if !oncall.teams.contains_key(&team.value) {
                let known: Vec<&str> = oncall.teams.keys().map(String::as_str).collect();
                p.at(
                    file,
                    team.referenced.line(),
                    format!(
                        "service {name:?}: unknown team {:?} (teams: {})",
                        team.value,
                        known.join(", ")
                    ),
                );
                continue;
            }
            oncall.services.insert(
                name.clone(),
                Service {
                    name: name.clone(),
                    team: team.value.clone(),
                    description: s.value.description.clone(),
                },
            );
        }
    }

    let mut errors = p.0;
    if errors.is_empty() {
        Ok(oncall)
    } else {
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Err(LoadErrors(errors))
    }
}

/// A person named in a team must be defined (in any file).
fn person_known(oncall: &OnCall, who: &str) -> Result<(), String> {
    if oncall.people.contains_key(who) {
        Ok(())
    } else {
        let known: Vec<&str> = oncall.people.keys().map(String::as_str).collect();
        Err(format!(
            "unknown person {who:?} (people: {})",
            if known.is_empty() {
                "none defined".to_owned()
            } else {
                known.join(", ")
            }
        ))
    }
}

fn load_team(raw: &RawTeam, file: &Path, oncall: &mut OnCall, p: &mut Problems) -> Team {
    let name = raw.name.clone();
    let mut team = Team {
        name: name.clone(),
        description: raw.description.clone(),
        escalation_contact: None,
        schedule: None,
        policy: None,
    };
    if let Some(c) = &raw.escalation_contact {
        match person_known(oncall, &c.value) {
            Ok(()) => team.escalation_contact = Some(c.value.clone()),
            Err(e) => p.at(
                file,
                c.referenced.line(),
                format!("team {name:?}: escalation_contact: {e}"),
            ),
        }
    }
    if let Some(s) = &raw.schedule {
        let at = s.referenced.line();
        match load_schedule(&s.value, oncall) {
            Ok(schedule) => team.schedule = Some(schedule),
            Err((l, e)) => p.at(
                file,
                l.unwrap_or(at),
                format!("team {name:?}: schedule: {e}"),
            ),
        }
    }
    if let Some(policy) = &raw.policy {
        let at = policy.referenced.line();
        match load_policy(&policy.value, &team, oncall, file) {
            Ok(pol) => team.policy = Some(pol),
            Err((l, e)) => p.at(file, l.unwrap_or(at), format!("team {name:?}: policy: {e}")),
        }
    }
    team
}

type Located = (Option<u64>, String);

fn load_schedule(raw: &RawSchedule, oncall: &OnCall) -> Result<Schedule, Located> {
    let zone_name = raw.time_zone.clone().unwrap_or_else(|| "UTC".into());
    let time_zone = TimeZone::get(&zone_name).map_err(|_| {
        (
            None,
            format!("time_zone: unknown time zone {zone_name:?} (expected an IANA name such as Europe/Berlin)"),
        )
    })?;
    let date = |field: &str, s: &str| {
        s.parse::<Date>()
            .map_err(|_| format!("{field}: expected a date like 2027-03-29, got {s:?}"))
    };
    let mut rotations = Vec::new();
    for r in &raw.rotations {
        let l = Some(r.referenced.line());
        let r = &r.value;
        let located = |e: String| (l, format!("rotation {:?}: {e}", r.name));
        let shift = match r.shift.as_str() {
            "daily" => Shift::Days(1),
            "weekly" => Shift::Days(7),
            other => {
                let d = bounds::parse_duration("shift", other, bounds::SHIFT_LENGTH)
                    .map_err(located)?;
                if d.as_secs() % 86_400 == 0 && d.subsec_nanos() == 0 {
                    Shift::Days((d.as_secs() / 86_400) as u32)
                } else {
                    Shift::Fixed(d)
                }
            }
        };
        let handoff = r.handoff.parse::<Time>().map_err(|_| {
            located(format!(
                "handoff: expected a local time like 09:00, got {:?}",
                r.handoff
            ))
        })?;
        let start = date("start", &r.start).map_err(located)?;
        bounds::PARTICIPANTS
            .check("participants", r.participants.len() as u64)
            .map_err(located)?;
        for who in &r.participants {
            person_known(oncall, who).map_err(|e| located(format!("participants: {e}")))?;
        }
        rotations.push(Rotation {
            name: r.name.clone(),
            shift,
            handoff,
            start,
            participants: r.participants.clone(),
        });
    }
    let instant = |field: &str, s: &str| -> Result<Timestamp, String> {
        if let Ok(t) = s.parse::<Timestamp>() {
            return Ok(t);
        }
        s.parse::<DateTime>()
            .ok()
            .and_then(|dt| dt.to_zoned(time_zone.clone()).ok())
            .map(|z| z.timestamp())
            .ok_or_else(|| {
                format!("{field}: expected a local time like 2027-03-29T09:00 or an RFC 3339 instant, got {s:?}")
            })
    };
    let mut overrides = Vec::new();
    for o in &raw.overrides {
        let l = Some(o.referenced.line());
        let o = &o.value;
        let located = |e: String| (l, format!("override: {e}"));
        person_known(oncall, &o.person).map_err(located)?;
        let from = instant("from", &o.from).map_err(located)?;
        let to = instant("to", &o.to).map_err(located)?;
        if to <= from {
            return Err(located(format!(
                "to ({}) must come after from ({})",
                o.to, o.from
            )));
        }
        overrides.push(Override {
            person: o.person.clone(),
            from,
            to,
        });
    }
    let mut calendar = BTreeMap::new();
    for d in &raw.calendar {
        let l = Some(d.referenced.line());
        let d = &d.value;
        let located = |e: String| (l, format!("calendar: {e}"));
        let day = date("date", &d.date).map_err(located)?;
        for who in d.oncall.iter().chain(&d.escalation_contact) {
            person_known(oncall, who).map_err(located)?;
        }
        if calendar
            .insert(
                day,
                CalendarDay {
                    oncall: d.oncall.clone(),
                    escalation_contact: d.escalation_contact.clone(),
                },
            )
            .is_some()
        {
            return Err(located(format!("the day {day} is listed twice")));
        }
    }
    Ok(Schedule {
        time_zone,
        time_zone_name: zone_name,
        rotations,
        overrides,
        calendar,
    })
}

fn load_policy(
    raw: &RawPolicy,
    team: &Team,
    oncall: &mut OnCall,
    file: &Path,
) -> Result<Policy, Located> {
    bounds::POLICY_LEVELS
        .check("levels", raw.levels.len() as u64)
        .map_err(|e| (None, e))?;
    let repeat = bounds::POLICY_REPEAT
        .check("repeat", raw.repeat)
        .map_err(|e| (None, e))? as u32;
    let mut levels = Vec::new();
    for (i, level) in raw.levels.iter().enumerate() {
        let l = level.referenced.line();
        let located = |e: String| (Some(l), format!("level {}: {e}", i + 1));
        if level.value.notify.is_empty() {
            return Err(located("notify: name at least one target".into()));
        }
        let mut notify = Vec::new();
        for t in &level.value.notify {
            let target = Target::parse(t).ok_or_else(|| {
                located(format!(
                    "notify: {t:?}: expected oncall, escalation_contact, person:NAME or channel:NAME"
                ))
            })?;
            match &target {
                Target::OnCall if team.schedule.is_none() => {
                    return Err(located("notify: oncall needs the team's schedule".into()))
                }
                Target::Person(who) => person_known(oncall, who).map_err(located)?,
                Target::Channel(c) => {
                    oncall
                        .channel_refs
                        .push((file.to_owned(), l, c.clone(), None))
                }
                _ => {}
            }
            notify.push(target);
        }
        let timeout = match &level.value.timeout {
            Some(t) => {
                bounds::parse_duration("timeout", t, bounds::ACK_TIMEOUT).map_err(located)?
            }
            None => DEFAULT_ACK_TIMEOUT,
        };
        levels.push(Level { notify, timeout });
    }
    Ok(Policy { levels, repeat })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<OnCall, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("devops.yaml"), yaml).unwrap();
        load_dir(dir.path()).map_err(|e| e.to_string())
    }

    const SEED: &str = "\
people:
  - name: primary
    contacts: [{channel: pager, address: primary@example.com}]
  - name: manager
    contacts: [{channel: pager, address: manager@example.com}]
teams:
  - name: devops
    schedule:
      time_zone: Europe/Berlin
      calendar:
        - {date: 2027-03-29, oncall: primary, escalation_contact: manager}
    policy:
      levels:
        - {notify: [oncall], timeout: 10m}
        - {notify: [escalation_contact]}
services:
  - name: athens
    team: devops
";

    #[test]
    fn services_name_their_team_and_an_unknown_team_is_refused_at_its_line() {
        let errors = load(
            "teams:\n  - name: devops\nservices:\n  - name: athens\n    team: devops\n  - name: sparta\n    team: devopz\n",
        )
        .unwrap_err();
        assert!(
            errors.contains("devops.yaml:7:")
                && errors.contains("unknown team \"devopz\" (teams: devops)"),
            "{errors}"
        );
        let oncall =
            load("teams:\n  - name: devops\nservices:\n  - name: athens\n    team: devops\n")
                .unwrap();
        assert_eq!(oncall.service("athens").unwrap().team, "devops");
        assert!(load_dir(Path::new("/nonexistent/oncall"))
            .unwrap()
            .services
            .is_empty());
    }

    #[test]
    fn a_calendar_day_names_the_on_call_and_the_escalation_contact_per_level() {
        let oncall = load(SEED).unwrap();
        let (team, policy) = oncall.policy_of("athens").unwrap();
        assert_eq!(policy.levels[0].timeout, Duration::from_secs(600));
        assert_eq!(policy.levels[1].timeout, DEFAULT_ACK_TIMEOUT);
        let t: Timestamp = "2027-03-29T10:00:00Z".parse().unwrap();
        let first = oncall.recipients(team, &policy.levels[0], t);
        assert_eq!(
            first,
            vec![Recipient {
                person: Some("primary".into()),
                channel: "pager".into(),
                address: Some("primary@example.com".into()),
                role: "oncall (calendar)".into(),
            }]
        );
        let second = oncall.recipients(team, &policy.levels[1], t);
        assert_eq!(second[0].person.as_deref(), Some("manager"));
        let other_day: Timestamp = "2027-03-30T10:00:00Z".parse().unwrap();
        assert!(oncall
            .recipients(team, &policy.levels[0], other_day)
            .is_empty());
        let e = oncall
            .check_channels(&["mail"], |_| true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("devops.yaml:3: unknown channel \"pager\" (channels: mail)"),
            "{e}"
        );
        assert!(oncall.check_channels(&["pager"], |_| true).is_ok());
        let nameless = load("people:\n  - name: a\n    contacts: [{channel: mail}]\n").unwrap();
        let e = nameless
            .check_channels(&["mail"], |c| c == "mail")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("devops.yaml:3: a contact on channel \"mail\" needs an address"),
            "{e}"
        );
        assert!(
            nameless.check_channels(&["mail"], |_| false).is_ok(),
            "a webhook needs none"
        );
    }

    #[test]
    fn every_mistake_is_named_at_its_line() {
        for (yaml, line, expected) in [
            (
                "teams:\n  - name: devops\n    escalation_contact: nobody\n",
                3,
                "escalation_contact: unknown person \"nobody\"",
            ),
            (
                "teams:\n  - name: devops\n    schedule:\n      time_zone: Mars/Olympus\n",
                4,
                "unknown time zone \"Mars/Olympus\"",
            ),
            (
                "people:\n  - name: a\nteams:\n  - name: devops\n    schedule:\n      rotations:\n        - {name: r, shift: fortnightly, start: 2027-01-01, participants: [a]}\n",
                7,
                "rotation \"r\": shift: expected a duration",
            ),
            (
                "people:\n  - name: a\nteams:\n  - name: devops\n    schedule:\n      rotations:\n        - {name: r, shift: daily, handoff: '25:00', start: 2027-01-01, participants: [a]}\n",
                7,
                "handoff: expected a local time like 09:00",
            ),
            (
                "people:\n  - name: a\nteams:\n  - name: devops\n    schedule:\n      overrides:\n        - {person: a, from: 2027-01-02T00:00, to: 2027-01-01T00:00}\n",
                7,
                "must come after from",
            ),
            (
                "teams:\n  - name: devops\n    policy:\n      levels:\n        - {notify: [oncall]}\n",
                5,
                "level 1: notify: oncall needs the team's schedule",
            ),
            (
                "teams:\n  - name: devops\n    policy:\n      levels:\n        - {notify: [boss]}\n",
                5,
                "expected oncall, escalation_contact, person:NAME or channel:NAME",
            ),
            (
                "teams:\n  - name: devops\n    policy:\n      levels:\n        - {notify: ['channel:ops'], timeout: 9d}\n",
                5,
                "timeout: 9days is longer than the longest allowed, 7days",
            ),
            (
                "teams:\n  - name: devops\n    policy:\n      repeat: 99\n      levels:\n        - {notify: ['channel:ops']}\n",
                4,
                "repeat: 99 is outside the allowed range 0..=10",
            ),
        ] {
            let errors = load(yaml).unwrap_err();
            assert!(
                errors.contains(&format!("devops.yaml:{line}:")) && errors.contains(expected),
                "expected line {line} and {expected:?} in: {errors}"
            );
        }
    }
}
