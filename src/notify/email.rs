//! Email through SMTP with lettre: STARTTLS (default), TLS from the first byte, or none (a relay
//! on loopback). One message with a plain-text and an HTML part carrying the same content and
//! the run's link. The server's certificate is verified against the platform's roots and, when
//! set, `ca_file`'s. A permanent SMTP refusal (5xx) is final; anything else is tried again.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Action, Notice, SendError, Sent};
use crate::config::{EmailSettings, SmtpTls};

fn subject(notice: &Notice, action: Action) -> String {
    let s = match action {
        Action::Trigger => format!("[reactor] {}", notice.summary),
        Action::Resolve => format!("[reactor] Resolved: {}", notice.summary),
    };
    // A header is one line.
    super::ellipsize(&s.replace(['\r', '\n'], " "), 250)
}

pub(super) fn text(notice: &Notice, action: Action) -> String {
    let mut out = format!(
        "{}\n\n",
        subject(notice, action).trim_start_matches("[reactor] ")
    );
    if !notice.description.is_empty() {
        out.push_str(&notice.description);
        out.push_str("\n\n");
    }
    for (k, v) in notice.facts() {
        out.push_str(&format!("{k}: {v}\n"));
    }
    if !notice.link.is_empty() {
        out.push_str(&format!("\n{}: {}\n", notice.link_label(), notice.link));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

pub(super) fn html(notice: &Notice, action: Action) -> String {
    let title = escape(subject(notice, action).trim_start_matches("[reactor] "));
    let mut out = format!("<!doctype html><html><body><h2>{title}</h2>");
    if !notice.description.is_empty() {
        out.push_str(&format!("<p>{}</p>", escape(&notice.description)));
    }
    out.push_str("<table>");
    for (k, v) in notice.facts() {
        out.push_str(&format!(
            "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
            escape(&k),
            escape(&v)
        ));
    }
    out.push_str("</table>");
    if !notice.link.is_empty() {
        let link = escape(&notice.link);
        out.push_str(&format!(
            "<p><a href=\"{link}\">{}</a></p>",
            notice.link_label()
        ));
    }
    out.push_str("</body></html>");
    out
}

pub(super) async fn send(
    settings: &EmailSettings,
    notice: &Notice,
    action: Action,
    timeout: Duration,
) -> Result<Sent, SendError> {
    let address = |a: &str| {
        a.parse::<Mailbox>()
            .map_err(|e| SendError::final_(format!("address {a:?}: {e}")))
    };
    let mut builder = Message::builder()
        .from(address(&settings.from)?)
        .subject(subject(notice, action));
    // A page for one person goes to their address alone.
    for to in notice
        .to
        .iter()
        .chain(settings.to.iter().filter(|_| notice.to.is_none()))
    {
        builder = builder.to(address(to)?);
    }
    let message = builder
        .multipart(MultiPart::alternative_plain_html(
            text(notice, action),
            html(notice, action),
        ))
        .map_err(|e| SendError::final_(format!("cannot build the message: {e}")))?;
    let (host, port) = settings
        .smarthost
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| {
            SendError::final_(format!(
                "smarthost {:?}: expected host:port",
                settings.smarthost
            ))
        })?;
    let smtp_error = |e: lettre::transport::smtp::Error| {
        let reason = format!("SMTP: {e}");
        if e.is_permanent() {
            SendError::final_(reason)
        } else {
            SendError::retry(reason)
        }
    };
    // The platform's roots, plus `ca_file`'s certificates when set (read at each send).
    let extra_roots = match &settings.ca_file {
        None => None,
        Some(path) => {
            let ca_error = |e: &dyn std::fmt::Display| {
                SendError::final_(format!("ca_file {}: {e}", path.display()))
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(&e))?;
            let cert = Certificate::from_pem(&pem).map_err(|e| ca_error(&e))?;
            let params = TlsParameters::builder(host.to_owned())
                .add_root_certificate(cert)
                .build_rustls()
                .map_err(smtp_error)?;
            Some(params)
        }
    };
    type Transport = AsyncSmtpTransport<Tokio1Executor>;
    let mut transport = match (settings.tls, extra_roots) {
        (SmtpTls::Starttls, None) => Transport::starttls_relay(host).map_err(smtp_error)?,
        (SmtpTls::Starttls, Some(p)) => Transport::builder_dangerous(host).tls(Tls::Required(p)),
        (SmtpTls::Tls, None) => Transport::relay(host).map_err(smtp_error)?,
        (SmtpTls::Tls, Some(p)) => Transport::builder_dangerous(host).tls(Tls::Wrapper(p)),
        (SmtpTls::None, _) => Transport::builder_dangerous(host),
    }
    .port(port)
    .timeout(Some(timeout));
    if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
        let password = password.read().map_err(SendError::final_)?;
        transport =
            transport.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
    }
    transport.build().send(message).await.map_err(smtp_error)?;
    Ok(Sent::default())
}
