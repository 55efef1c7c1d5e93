//! The console's pages: each handler reads what it shows (incidents, runs, the on-call files,
//! the playbooks in force and their guards, health) and renders one template. Forms post back
//! here with the session's CSRF token; a claim link's page and form need no session.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use jiff::{SignedDuration, Timestamp};
use minijinja::{context, Value};
use serde::Deserialize;

use super::{charts, csrf_ok, csrf_refused, message, render, Session};
use crate::history::{Outcome, RunFilter, RunId};
use crate::incident::keys::Scope;
use crate::incident::{Action, Filter, Incident, IncidentError, State as IncidentState};
use crate::routes::AppState;

/// "3m", "2h 5m", "4d 1h": an age or a wait, to the minute.
fn human(d: SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (days, hours, mins) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (days, hours) {
        (0, 0) if mins == 0 => format!("{secs}s"),
        (0, 0) => format!("{mins}m"),
        (0, _) => format!("{hours}h {mins}m"),
        _ => format!("{days}d {hours}h"),
    }
}

fn internal(session: Option<&Session>, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "console page failed");
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        session,
        "Something failed",
        &format!("reactor could not read what this page shows: {e}"),
    )
}

/// Who the escalation notified in the incident's current opening.
fn notified(i: &Incident) -> Vec<String> {
    let start = i
        .timeline
        .iter()
        .rposition(|e| e.event == "reopened")
        .unwrap_or(0);
    let mut seen = BTreeSet::new();
    i.timeline[start..]
        .iter()
        .filter(|e| e.event == "notified")
        .filter_map(|e| e.by.clone())
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

#[derive(Deserialize, Default)]
pub(super) struct IncidentQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    severity: String,
}

pub(super) async fn incidents(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    query: Result<Query<IncidentQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let filter = Filter {
        state: IncidentState::parse(&q.state),
        service: Some(q.service.clone()).filter(|s| !s.is_empty()),
        since: None,
        limit: 1000,
    };
    let now = state.desk.clock.now();
    let incidents = state.desk.incidents.clone();
    let severity = q.severity.clone();
    // Off the async workers: the chart reads the last 30 days.
    let read = tokio::task::spawn_blocking(move || {
        let mut shown = incidents.list(&filter)?;
        shown.retain(|i| severity.is_empty() || i.severity.as_str() == severity);
        let month = Filter {
            since: now.checked_sub(SignedDuration::from_hours(30 * 24)).ok(),
            limit: 100_000,
            ..Filter::default()
        };
        let chart = charts::claim_and_resolve(&incidents.list(&month)?, now);
        Ok::<_, crate::history::StoreError>((shown, chart))
    })
    .await;
    let (mut shown, chart) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return internal(Some(&session), e),
        Err(e) => return internal(Some(&session), e),
    };
    // Open ones first, then claimed, then resolved; newest first within each.
    shown.sort_by_key(|i| (i.state as u8, std::cmp::Reverse(i.number)));
    let rows: Vec<Value> = shown
        .iter()
        .map(|i: &Incident| {
            context! {
                number => i.number,
                severity => i.severity.as_str(),
                state => i.state.as_str(),
                service => i.service,
                title => i.title,
                age => human(now.duration_since(i.created_at)),
                level => i.escalation.as_ref().map_or(0, |e| e.level),
                notified => notified(i),
                claimed_by => i.claimed_by,
            }
        })
        .collect();
    let services: Vec<&String> = state.desk.oncall.services.keys().collect();
    render(
        "incidents.html",
        context! {
            session => session, rows => rows, services => services, q => context! {
                state => q.state, service => q.service, severity => q.severity },
            chart => Value::from_safe_string(chart),
        },
    )
}

/// The remediation runs behind an incident, as stored.
fn runs_of(state: &AppState, i: &Incident) -> Vec<crate::history::Run> {
    i.runs
        .iter()
        .filter_map(|id| id.parse::<RunId>().ok())
        .filter_map(|id| state.store.get_run(id).ok().flatten())
        .collect()
}

pub(super) async fn incident(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(number): Path<u64>,
) -> Response {
    let i = match state.desk.incidents.get(number) {
        Ok(Some(i)) => i,
        Ok(None) => {
            return message(
                StatusCode::NOT_FOUND,
                Some(&session),
                "No such incident",
                &format!("there is no incident {number}"),
            )
        }
        Err(e) => return internal(Some(&session), e),
    };
    let now = state.desk.clock.now();
    let runs = runs_of(&state, &i);
    render(
        "incident.html",
        context! {
            session => session,
            i => i,
            age => human(now.duration_since(i.created_at)),
            notified => notified(&i),
            runs => runs,
            may_ack => session.may(Scope::IncidentsAck),
        },
    )
}

#[derive(Deserialize)]
pub(super) struct ActForm {
    #[serde(default)]
    action: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    csrf: String,
}

/// A form that changes state comes from this site with the session's CSRF token, and the
/// session's key has `incidents:ack`; otherwise the page that says why.
fn refusal(session: &Session, headers: &axum::http::HeaderMap, csrf: &str) -> Option<Response> {
    if super::cross_site(headers) || !csrf_ok(session, csrf) {
        return Some(csrf_refused(session));
    }
    if !session.may(Scope::IncidentsAck) {
        return Some(message(
            StatusCode::FORBIDDEN,
            Some(session),
            "Not allowed",
            &format!(
                "the key {:?} lacks the scope incidents:ack: nothing was changed",
                session.name
            ),
        ));
    }
    None
}

pub(super) async fn act(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Extension(session): Extension<Session>,
    Path(number): Path<u64>,
    form: Result<Form<ActForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return csrf_refused(&session);
    };
    if let Some(refused) = refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let action = match form.action.as_str() {
        "claim" => Action::Claim,
        "resolve" => Action::Resolve,
        "reopen" => Action::Reopen,
        "note" => Action::Note,
        other => {
            return message(
                StatusCode::BAD_REQUEST,
                Some(&session),
                "Unknown action",
                &format!("action {other:?}: expected claim, resolve, reopen or note"),
            )
        }
    };
    let note = Some(form.note.trim().to_owned()).filter(|n| !n.is_empty());
    if action == Action::Note && note.is_none() {
        return message(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "Empty note",
            "note: write something to add",
        );
    }
    if note
        .as_ref()
        .is_some_and(|n| n.len() > crate::incident::MESSAGE_MAX)
    {
        return message(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "Note too long",
            "note: at most 64 KiB",
        );
    }
    let now = state.desk.clock.now();
    match state
        .desk
        .incidents
        .act(number, action, &session.name, note, now)
        .await
    {
        Ok(_) => Redirect::to(&format!("/ui/incidents/{number}")).into_response(),
        Err(e @ IncidentError::Conflict { .. }) => message(
            StatusCode::CONFLICT,
            Some(&session),
            "Nothing changed",
            &e.to_string(),
        ),
        Err(e @ IncidentError::NotFound(_)) => message(
            StatusCode::NOT_FOUND,
            Some(&session),
            "No such incident",
            &e.to_string(),
        ),
        Err(e) => internal(Some(&session), e),
    }
}

pub(super) async fn report(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(number): Path<u64>,
) -> Response {
    match state.desk.incidents.get(number) {
        Ok(Some(i)) => {
            let runs = runs_of(&state, &i);
            render(
                "message.html",
                context! {
                    session => session,
                    title => format!("Report of incident {number}"),
                    text => "",
                    pre => crate::incident::report(&i, &runs),
                    back => format!("/ui/incidents/{number}"),
                },
            )
        }
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            Some(&session),
            "No such incident",
            &format!("there is no incident {number}"),
        ),
        Err(e) => internal(Some(&session), e),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct RunQuery {
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    playbook: String,
    #[serde(default)]
    alertname: String,
}

pub(super) async fn runs(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    query: Result<Query<RunQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let outcome: Option<Outcome> =
        serde_json::from_value(serde_json::Value::String(q.outcome.clone())).ok();
    let filter = RunFilter {
        playbook: Some(q.playbook.clone()).filter(|s| !s.is_empty()),
        outcome,
        alertname: Some(q.alertname.clone()).filter(|s| !s.is_empty()),
        mode: None,
        limit: Some(200),
    };
    let store = state.store.clone();
    let now = state.desk.clock.now();
    let read = tokio::task::spawn_blocking(move || {
        let list = store.list_runs(&filter)?;
        // The last day's runs, for the chart (at most the newest 20,000).
        let since = now
            .checked_sub(SignedDuration::from_hours(24))
            .unwrap_or(now);
        let mut recent = Vec::new();
        for r in store.all_runs().rev().take(20_000) {
            let r = r?;
            if r.received_at < since {
                break;
            }
            recent.push((r.received_at, r.outcome.as_str()));
        }
        Ok::<_, crate::history::StoreError>((list, recent))
    })
    .await;
    let (list, recent) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return internal(Some(&session), e),
        Err(e) => return internal(Some(&session), e),
    };
    let rows: Vec<Value> = list
        .iter()
        .map(|r| {
            context! {
                id => r.id.to_string(),
                outcome => r.outcome.as_str(),
                playbook => r.playbook,
                alertname => r.alert.alertname(),
                target => r.alert.labels.get("instance").or(r.alert.labels.get("pod")),
                received => r.received_at.to_string(),
                age => human(now.duration_since(r.received_at)),
                incident => r.incident,
            }
        })
        .collect();
    render(
        "runs.html",
        context! {
            session => session, rows => rows,
            q => context! { outcome => q.outcome, playbook => q.playbook, alertname => q.alertname },
            outcomes => ["succeeded", "failed", "verifying", "running", "skipped", "deduplicated", "cancelled", "interrupted", "shadow", "paused", "awaiting_approval", "denied"],
            chart => Value::from_safe_string(charts::runs_per_hour(&recent, now)),
        },
    )
}

pub(super) async fn run(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let Ok(run_id) = id.parse::<RunId>() else {
        return message(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "No such run",
            &format!("{id:?} is not a run id (SEQ-INDEX)"),
        );
    };
    match state.store.get_run(run_id) {
        Ok(Some(r)) => render(
            "run.html",
            context! { session => session, r => serde_json::to_value(&r).unwrap_or_default() },
        ),
        Ok(None) => message(
            StatusCode::NOT_FOUND,
            Some(&session),
            "No such run",
            &format!("there is no run {id}"),
        ),
        Err(e) => internal(Some(&session), e),
    }
}

fn local(t: Timestamp, zone: &jiff::tz::TimeZone, fmt: &str) -> String {
    t.to_zoned(zone.clone()).strftime(fmt).to_string()
}

pub(super) async fn oncall(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Response {
    let now = state.desk.clock.now();
    let oncall = &state.desk.oncall;
    let teams: Vec<Value> = oncall
        .teams
        .values()
        .map(|team| {
            let zone = team
                .schedule
                .as_ref()
                .map_or(jiff::tz::TimeZone::UTC, |s| s.time_zone.clone());
            let levels: Vec<Value> = team
                .policy
                .iter()
                .flat_map(|p| p.levels.iter().enumerate())
                .map(|(n, level)| {
                    let who: Vec<String> = oncall
                        .level_duty(team, level, now)
                        .into_iter()
                        .map(|(_, d)| format!("{} ({})", d.person, d.why))
                        .collect();
                    context! { number => n + 1, who => who, wait => humantime::format_duration(level.timeout).to_string() }
                })
                .collect();
            let duty = oncall.oncall(team, now);
            // The next hand-offs: follow the on-call's `until` a few times.
            let mut handoffs = Vec::new();
            let mut at = duty.as_ref().and_then(|d| d.until);
            while let (Some(t), true) = (at, handoffs.len() < 3) {
                let next = oncall.oncall(team, t);
                handoffs.push(context! {
                    at => local(t, &zone, "%a %Y-%m-%d %H:%M %Z"),
                    to => next.as_ref().map(|d| d.person.clone()),
                });
                at = next.and_then(|d| d.until).filter(|u| *u > t);
            }
            let today = now.to_zoned(zone.clone()).date();
            let days: Vec<Value> = (0..14)
                .filter_map(|d| {
                    let date = today.checked_add(jiff::Span::new().days(d)).ok()?;
                    let noon = date.to_datetime(jiff::civil::Time::midnight())
                        .checked_add(jiff::Span::new().hours(12)).ok()?
                        .to_zoned(zone.clone()).ok()?.timestamp();
                    Some(context! {
                        date => date.strftime("%a %d %b").to_string(),
                        weekend => matches!(date.weekday(), jiff::civil::Weekday::Saturday | jiff::civil::Weekday::Sunday),
                        oncall => oncall.oncall(team, noon).map(|d| d.person),
                        contact => oncall.escalation_contact(team, noon).map(|d| d.person),
                    })
                })
                .collect();
            context! {
                name => team.name,
                zone => team.schedule.as_ref().map_or("UTC".to_owned(), |s| s.time_zone_name.clone()),
                now_local => local(now, &zone, "%Y-%m-%d %H:%M %Z"),
                oncall => duty.map(|d| format!("{} ({})", d.person, d.why)),
                contact => oncall.escalation_contact(team, now).map(|d| format!("{} ({})", d.person, d.why)),
                levels => levels,
                handoffs => handoffs,
                days => days,
                services => oncall.services.values().filter(|s| s.team == team.name).map(|s| s.name.clone()).collect::<Vec<_>>(),
            }
        })
        .collect();
    render(
        "oncall.html",
        context! { session => session, teams => teams },
    )
}

pub(super) async fn playbooks(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Response {
    let in_force = state.reloader.in_force().current();
    let now = state.desk.clock.now();
    // The newest runs, once, bucketed by playbook.
    let mut last: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in state.store.all_runs().rev().take(5000).flatten() {
        if let Some(p) = &r.playbook {
            let runs = last.entry(p.clone()).or_default();
            if runs.len() < 5 {
                runs.push(context! { id => r.id.to_string(), outcome => r.outcome.as_str(), age => human(now.duration_since(r.received_at)) });
            }
        }
    }
    let mut rows = Vec::new();
    for p in in_force.iter() {
        let g = &p.guards;
        let breaker = match state.guards.breaker_state(&p.name) {
            Ok(b) => b,
            Err(e) => return internal(Some(&session), e),
        };
        let breaker_text = match (&g.breaker, breaker) {
            (None, _) => "none".to_owned(),
            (Some(_), Some(b)) if b.opened_at.is_some() => format!(
                "OPEN since {}",
                human(now.duration_since(b.opened_at.unwrap_or(now)))
            ),
            (Some(_), Some(b)) => format!(
                "closed ({} failure(s) of the last {})",
                b.recent.iter().filter(|f| **f).count(),
                b.recent.len()
            ),
            (Some(_), None) => "closed".to_owned(),
        };
        let targets: Vec<Value> = match state.guards.targets_of(&p.name, 20) {
            Ok(t) => t,
            Err(e) => return internal(Some(&session), e),
        }
        .into_iter()
        .map(|(labels, t)| {
            let window_start = crate::clock::earlier(now, g.window);
            let cooldown_left = t
                .last_start
                .map(|s| crate::clock::later(s, g.cooldown))
                .filter(|end| *end > now)
                .map(|end| human(end.duration_since(now)));
            context! {
                labels => labels,
                attempts => t.attempts.iter().filter(|a| **a >= window_start).count(),
                cooldown_left => cooldown_left,
            }
        })
        .collect();
        rows.push(context! {
            name => p.name,
            description => p.description,
            file => p.origin.file.display().to_string(),
            matchers => p.matchers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            steps => p.steps.len(),
            cooldown => humantime::format_duration(g.cooldown).to_string(),
            max_attempts => g.max_attempts,
            window => humantime::format_duration(g.window).to_string(),
            breaker => breaker_text,
            targets => targets,
            last => last.remove(&p.name).unwrap_or_default(),
        });
    }
    render(
        "playbooks.html",
        context! { session => session, rows => rows },
    )
}

pub(super) async fn health(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Response {
    let checks: Vec<Value> = state
        .health
        .report()
        .into_iter()
        .map(|(check, r)| context! { name => check.as_str(), ok => r.ok, detail => r.detail })
        .collect();
    // Counting reads entries: off the async workers, and at most 100,000 of each.
    let (store, incidents) = (state.store.clone(), state.desk.incidents.clone());
    let counts = tokio::task::spawn_blocking(move || {
        const CAP: usize = 100_000;
        let notify = store
            .tree("notify_due")
            .map(|t| t.iter().take(CAP).count())
            .unwrap_or(0);
        let open = incidents
            .list(&Filter {
                state: Some(IncidentState::Open),
                limit: CAP,
                ..Filter::default()
            })
            .map(|l| l.len())
            .unwrap_or(0);
        (notify, open)
    })
    .await;
    let (notify_backlog, open_incidents) = counts.unwrap_or((0, 0));
    let heartbeat = state.health.heartbeat_age();
    render(
        "health.html",
        context! {
            session => session,
            checks => checks,
            started => !state.health.report().is_empty(),
            heartbeat_age => if heartbeat.as_secs() > 365 * 86_400 { "never".to_owned() } else { human(SignedDuration::try_from(heartbeat).unwrap_or_default()) },
            queue => state.health.backlog.depth(),
            alertmanager_backlog => state.metrics.escalations_pending.get(),
            notify_backlog => notify_backlog,
            open_incidents => open_incidents,
            playbooks => state.reloader.in_force().current().len(),
            mode => if state.dry_run { "dry run" } else { "live" },
        },
    )
}

/// What a claim link's token names, or why it does not work: it was changed, it expired, or
/// it was sent before the incident was reopened.
fn open_link(state: &AppState, token: &str) -> Result<crate::incident::links::Claim, String> {
    let claim = state
        .desk
        .signer
        .claim(token, state.desk.clock.now())
        .map_err(|e| e.to_string())?;
    let epoch = state
        .desk
        .incidents
        .get(claim.number)
        .ok()
        .flatten()
        .and_then(|i| i.escalation)
        .map_or(0, |e| e.epoch);
    if epoch != claim.epoch {
        return Err(format!(
            "this link was sent before incident {} was reopened; it cannot claim it now",
            claim.number
        ));
    }
    Ok(claim)
}

/// The page of a claim link that does not work.
fn link_refused(why: &str) -> Response {
    message(
        StatusCode::GONE,
        None,
        "This claim link does not work",
        &format!("{why}. Nothing was changed."),
    )
}

/// The claim link's page: the incident, and a Claim button. A GET never changes anything, so a
/// mail system's link scanner cannot claim.
pub(super) async fn claim_form(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Response {
    let claim = match open_link(&state, &token) {
        Ok(c) => c,
        Err(why) => return link_refused(&why),
    };
    let i = match state.desk.incidents.get(claim.number) {
        Ok(Some(i)) => i,
        Ok(None) => {
            return message(
                StatusCode::NOT_FOUND,
                None,
                "No such incident",
                &format!("there is no incident {}", claim.number),
            )
        }
        Err(e) => return internal(None, e),
    };
    render(
        "claim.html",
        context! {
            i => i,
            person => claim.person,
            csrf => state.desk.signer.sign("claim-form", token.as_bytes()),
            token => token,
            open => i.state == IncidentState::Open,
            approval => i.approvers.is_some() && i.state != IncidentState::Resolved,
        },
    )
}

#[derive(Deserialize)]
pub(super) struct ClaimForm {
    #[serde(default)]
    by: String,
    /// On an approval request's link: `approve` or `deny` instead of a claim.
    #[serde(default)]
    decision: String,
    #[serde(default)]
    csrf: String,
}

pub(super) async fn claim(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Path(token): Path<String>,
    form: Result<Form<ClaimForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if super::cross_site(&headers) {
        return super::cross_site_refused();
    }
    let now = state.desk.clock.now();
    let claim = match open_link(&state, &token) {
        Ok(c) => c,
        Err(why) => return link_refused(&why),
    };
    let form = form.ok().map(|Form(f)| f);
    let genuine = form.as_ref().is_some_and(|f| {
        state
            .desk
            .signer
            .verify("claim-form", &f.csrf)
            .is_some_and(|t| t == token.as_bytes())
    });
    if !genuine {
        return message(
            StatusCode::FORBIDDEN,
            None,
            "Form expired",
            "This form's security token is missing or does not match the link: nothing was changed. Open the link again.",
        );
    }
    // A link sent to one person claims as that person; a link for a channel's audience (the
    // Alertmanager page) takes the name typed, and the timeline says so.
    let decision = form
        .as_ref()
        .map(|f| f.decision.clone())
        .unwrap_or_default();
    let typed: String = form
        .map(|f| f.by.trim().chars().take(crate::incident::BY_MAX).collect())
        .unwrap_or_default();
    let (by, note) = match &claim.person {
        Some(person) => (person.clone(), "through their claim link"),
        None if !typed.is_empty() => (typed, "through a claim link, name as typed"),
        None => {
            return message(
                StatusCode::BAD_REQUEST,
                None,
                "Who claims?",
                "by: type your name to claim. Nothing was changed.",
            )
        }
    };
    if !decision.is_empty() {
        // An approval request's link answers for the run behind it.
        let run = match state.desk.incidents.get(claim.number) {
            Ok(i) => i
                .filter(|i| i.approvers.is_some())
                .and_then(|i| i.runs.first().and_then(|r| r.parse::<RunId>().ok())),
            Err(e) => return internal(None, e),
        };
        let Some(run) = run else {
            return message(
                StatusCode::BAD_REQUEST,
                None,
                "Not an approval",
                &format!(
                    "incident {} asks for no approval. Nothing was changed.",
                    claim.number
                ),
            );
        };
        let meant = |a: &crate::history::Approval| a.incident == Some(claim.number);
        return answer_run(&state, None, run, &decision, &by, meant).await;
    }
    match state
        .desk
        .incidents
        .act(claim.number, Action::Claim, &by, Some(note.into()), now)
        .await
    {
        Ok(i) => message(
            StatusCode::OK,
            None,
            &format!("Incident {} is yours", i.number),
            &format!(
                "incident {} is now {} by {by}: the escalation has stopped.",
                i.number,
                i.state.as_str()
            ),
        ),
        Err(e @ IncidentError::Conflict { .. }) => message(
            StatusCode::CONFLICT,
            None,
            "Nothing changed",
            &format!("{e}."),
        ),
        Err(e) => internal(None, e),
    }
}

#[derive(Deserialize)]
pub(super) struct AnswerForm {
    #[serde(default)]
    decision: String,
    /// The gated step the page showed.
    #[serde(default)]
    step: String,
    #[serde(default)]
    csrf: String,
}

/// The answer a form gives: `approve` or `deny`.
fn answer_of(decision: &str) -> Option<crate::engine::Answer> {
    match decision {
        "approve" => Some(crate::engine::Answer::Approve),
        "deny" => Some(crate::engine::Answer::Deny),
        _ => None,
    }
}

/// Answers the approval request `id` waits on, as `by`: a page saying what happened.
async fn answer_run(
    state: &AppState,
    session: Option<&Session>,
    id: RunId,
    decision: &str,
    by: &str,
    meant: impl Fn(&crate::history::Approval) -> bool,
) -> Response {
    let Some(answer) = answer_of(decision) else {
        return message(
            StatusCode::BAD_REQUEST,
            session,
            "Unknown answer",
            &format!("decision {decision:?}: expected approve or deny. Nothing was changed."),
        );
    };
    let Some(approver) = &state.approver else {
        return message(
            StatusCode::SERVICE_UNAVAILABLE,
            session,
            "Approvals unavailable",
            "approvals are not served here",
        );
    };
    match crate::routes::runs::decide(approver, id, answer, by, meant).await {
        Ok(run) => message(
            StatusCode::OK,
            session,
            &format!("Run {id}: {decision}d"),
            &format!(
                "run {id} is now {} ({decision}d by {by}).",
                run.outcome.as_str()
            ),
        ),
        Err(e) => message(
            e.status,
            session,
            "Nothing changed",
            &format!("{}.", e.message),
        ),
    }
}

/// `POST /ui/runs/{id}`: Approve or Deny on a run waiting for approval.
pub(super) async fn answer(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    form: Result<Form<AnswerForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return csrf_refused(&session);
    };
    if let Some(refused) = refusal(&session, &headers, &form.csrf) {
        return refused;
    }
    let Ok(run_id) = id.parse::<RunId>() else {
        return message(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "No such run",
            &format!("{id:?} is not a run id (SEQ-INDEX)"),
        );
    };
    let by = session.name.clone();
    let meant = |a: &crate::history::Approval| a.step == form.step;
    answer_run(&state, Some(&session), run_id, &form.decision, &by, meant).await
}
