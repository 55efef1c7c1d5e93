//! The web console under `/ui/`: server-rendered pages for the on-call (incidents, runs, on-call,
//! playbooks, health), built from minijinja templates shipped in the binary, working without
//! JavaScript. Signing in takes an API key (or the service's token); the session is a signed,
//! expiring, `HttpOnly`, `SameSite=Strict` cookie carrying the key's name, scopes and a CSRF token
//! that every form posts back. One-click claim links (`/ui/claim/{token}`) open without signing
//! in: the link is the credential, a GET only shows, and the Claim button posts.

mod charts;
mod pages;

use std::sync::OnceLock;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use jiff::Timestamp;
use minijinja::Environment;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::incident::keys::Scope;

/// How long a console session lasts.
const SESSION_HOURS: i64 = 12;
const COOKIE: &str = "reactor_session";

/// Who is signed in, as the cookie carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The API key's name (`admin` for the service's token).
    pub name: String,
    pub scopes: Vec<Scope>,
    /// Posted back by every form.
    pub csrf: String,
    pub expires: Timestamp,
    /// When the API key was made: a key revoked (or made again under its name) ends the
    /// sessions it opened. `None` for the service's token.
    #[serde(default)]
    pub key_created: Option<Timestamp>,
}

impl Session {
    fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // Names ending in .html are escaped: every value, whatever a label holds, is text.
        for (name, source) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("message.html", include_str!("templates/message.html")),
            ("incidents.html", include_str!("templates/incidents.html")),
            ("incident.html", include_str!("templates/incident.html")),
            ("runs.html", include_str!("templates/runs.html")),
            ("run.html", include_str!("templates/run.html")),
            ("oncall.html", include_str!("templates/oncall.html")),
            ("playbooks.html", include_str!("templates/playbooks.html")),
            ("health.html", include_str!("templates/health.html")),
            ("claim.html", include_str!("templates/claim.html")),
        ] {
            env.add_template(name, source)
                .expect("the console's templates parse");
        }
        env
    })
}

/// A page rendered from `template` with `ctx`; a template error is a 500 that names it.
pub(super) fn render(template: &str, ctx: minijinja::Value) -> Response {
    match templates()
        .get_template(template)
        .and_then(|t| t.render(ctx))
    {
        Ok(html) => page_headers(Html(html).into_response()),
        Err(e) => {
            tracing::error!(template, error = %e, "console page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the page {template} failed to render: {e}"),
            )
                .into_response()
        }
    }
}

/// No framing, no caching, and scripts from nowhere: the console needs none.
fn page_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// A short page with a title and a message, at `status`.
pub(super) fn message(
    status: StatusCode,
    session: Option<&Session>,
    title: &str,
    text: &str,
) -> Response {
    let mut resp = render(
        "message.html",
        minijinja::context! { session => session, title => title, text => text },
    );
    *resp.status_mut() = status;
    resp
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The session of the request's cookie, when it is genuine, not expired, and its key still
/// exists (with the scopes it has now).
fn session_of(state: &AppState, headers: &HeaderMap) -> Option<Session> {
    let token = cookie_value(headers, COOKIE)?;
    let payload = state.desk.signer.verify("session", &token)?;
    let mut s: Session = serde_json::from_slice(&payload).ok()?;
    if s.expires <= state.desk.clock.now() {
        return None;
    }
    if let Some(created) = s.key_created {
        let key = state.desk.keys.get(&s.name).ok()??;
        if key.created_at != created {
            return None;
        }
        s.scopes = key.scopes;
    }
    Some(s)
}

/// A POST sent by another site (a form elsewhere posting here): refused, whatever cookie it
/// carries. Browsers say where a request comes from in `Sec-Fetch-Site` and `Origin`.
pub(super) fn cross_site(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) != Some(host),
        _ => false,
    }
}

pub(super) fn cross_site_refused() -> Response {
    message(
        StatusCode::FORBIDDEN,
        None,
        "Refused",
        "This form was sent from another site: nothing was changed.",
    )
}

/// Pages behind sign-in: without a session, to the sign-in form.
async fn require_session(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match session_of(&state, req.headers()) {
        Some(s) if s.may(Scope::Read) => {
            req.extensions_mut().insert(s);
            next.run(req).await
        }
        Some(s) => message(
            StatusCode::FORBIDDEN,
            Some(&s),
            "Not allowed",
            &format!("the key {:?} lacks the scope read", s.name),
        ),
        None => Redirect::to("/ui/login").into_response(),
    }
}

/// A form's CSRF token must be the session's.
pub(super) fn csrf_ok(session: &Session, posted: &str) -> bool {
    !posted.is_empty() && bool::from(session.csrf.as_bytes().ct_eq(posted.as_bytes()))
}

fn random_token() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

async fn login_form(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if session_of(&state, &headers).is_some() {
        return Redirect::to("/ui/incidents").into_response();
    }
    render("login.html", minijinja::context! { error => "" })
}

#[derive(Deserialize)]
struct Login {
    #[serde(default)]
    key: String,
}

/// The key's name, scopes and creation time: an API key, or the service's own token (every
/// scope).
fn identify(state: &AppState, key: &str) -> Option<(String, Vec<Scope>, Option<Timestamp>)> {
    let key = key.trim();
    if key.is_empty() {
        return None;
    }
    let bearer = format!("Bearer {key}");
    let admin = state
        .credentials
        .iter()
        .fold(subtle::Choice::from(0), |acc, c| {
            acc | bearer.as_bytes().ct_eq(c.as_bytes())
        });
    if bool::from(admin) {
        return Some((
            "admin".into(),
            vec![Scope::Read, Scope::IncidentsAck, Scope::IncidentsWrite],
            None,
        ));
    }
    let k = state.desk.keys.find(key).ok()??;
    Some((k.name, k.scopes, Some(k.created_at)))
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Response {
    if cross_site(&headers) {
        return cross_site_refused();
    }
    let key = form.map(|Form(l)| l.key).unwrap_or_default();
    let Some((name, scopes, key_created)) = identify(&state, &key) else {
        let mut resp = render(
            "login.html",
            minijinja::context! { error => "That key is not known: check it, or ask for one (reactor keys create)." },
        );
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    };
    let now = state.desk.clock.now();
    let expires = now
        .checked_add(jiff::SignedDuration::from_hours(SESSION_HOURS))
        .unwrap_or(now);
    let session = Session {
        name,
        scopes,
        csrf: random_token(),
        expires,
        key_created,
    };
    let token = state.desk.signer.sign(
        "session",
        &serde_json::to_vec(&session).expect("a session serializes"),
    );
    let behind_tls = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let secure = if state.desk.external_url.starts_with("https://") || behind_tls {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_HOURS * 3600
    );
    let mut resp = Redirect::to("/ui/incidents").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
struct Csrf {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    headers: HeaderMap,
    axum::Extension(session): axum::Extension<Session>,
    form: Result<Form<Csrf>, axum::extract::rejection::FormRejection>,
) -> Response {
    let posted = form.map(|Form(c)| c.csrf).unwrap_or_default();
    if cross_site(&headers) || !csrf_ok(&session, &posted) {
        return csrf_refused(&session);
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "reactor_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

pub(super) fn csrf_refused(session: &Session) -> Response {
    message(
        StatusCode::FORBIDDEN,
        Some(session),
        "Form expired",
        "This form's security token is missing or does not match your session: nothing was changed. Go back, reload the page and try again.",
    )
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

/// The console's routes, under `/ui`.
pub fn router(state: AppState) -> Router<AppState> {
    let signed_in = Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/incidents") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/incidents") }))
        .route("/ui/incidents", get(pages::incidents))
        .route(
            "/ui/incidents/{number}",
            get(pages::incident).post(pages::act),
        )
        .route("/ui/incidents/{number}/report", get(pages::report))
        .route("/ui/runs", get(pages::runs))
        .route("/ui/runs/{id}", get(pages::run).post(pages::answer))
        .route("/ui/oncall", get(pages::oncall))
        .route("/ui/playbooks", get(pages::playbooks))
        .route("/ui/health", get(pages::health))
        .route("/ui/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/ui/login", get(login_form).post(login))
        .route(
            "/ui/claim/{token}",
            get(pages::claim_form).post(pages::claim),
        )
        .route("/ui/console.css", get(stylesheet))
        .merge(signed_in)
}
