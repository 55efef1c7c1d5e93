//! The durable ceiling on this machine, for the Performance section of the README: the issue's
//! reference "minimal axum server that writes each payload to sled with group-committed
//! flushes", built on reactor's own [`GroupCommit`]. With `CEILING=store` it records through
//! reactor's [`Store::accept`] instead (decode, one intake entry per alert, group commit): the
//! accept path alone, with no engine behind it. Not part of reactor.
//!
//! It takes reactor's command line (`--config FILE serve`, reading `listen:` and `data_dir:`), so
//! the load benchmark drives it like reactor; its history check then fails, as nothing runs:
//!
//! ```sh
//! cargo build --release -p reactor-bench --example durable_ceiling --bin reactor-bench
//! target/release/reactor-bench --reactor target/release/examples/durable_ceiling --drain-timeout 1s
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use reactor::domain::decode_webhook;
use reactor::history::{GroupCommit, Store};

enum Sink {
    /// The whole payload under one key, then the group commit.
    Raw {
        db: sled::Db,
        commit: GroupCommit,
        seq: AtomicU64,
    },
    /// reactor's intake.
    Store(Store),
}

async fn receive(State(sink): State<Arc<Sink>>, body: Bytes) -> StatusCode {
    let stored = match &*sink {
        Sink::Raw { db, commit, seq } => {
            if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                return StatusCode::BAD_REQUEST;
            }
            let key = seq.fetch_add(1, Ordering::Relaxed).to_be_bytes();
            db.insert(key, &body[..]).is_ok() && commit.durable().await.is_ok()
        }
        Sink::Store(store) => {
            let Ok(n) = decode_webhook(&body) else {
                return StatusCode::BAD_REQUEST;
            };
            store.accept(n.alerts, jiff::Timestamp::now()).await.is_ok()
        }
    };
    if stored {
        StatusCode::ACCEPTED
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config_path = std::env::args()
        .skip_while(|a| a != "--config")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: durable_ceiling --config FILE serve"))?;
    let config = std::fs::read_to_string(config_path)?;
    let field = |name: &str| {
        config
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .ok_or_else(|| anyhow::anyhow!("no `{name}` in the config"))
    };
    let dir = std::path::PathBuf::from(field("data_dir:")?);
    let sink = if std::env::var("CEILING").as_deref() == Ok("store") {
        Sink::Store(Store::open(&dir)?)
    } else {
        let db = sled::Config::new()
            .path(&dir)
            .flush_every_ms(Some(200))
            .open()?;
        Sink::Raw {
            commit: GroupCommit::spawn(
                "ceiling-flush",
                db.clone(),
                None,
                std::time::Duration::ZERO,
            )?,
            db,
            seq: AtomicU64::new(0),
        }
    };
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/webhook/alertmanager", post(receive))
        .with_state(Arc::new(sink));
    let listener = tokio::net::TcpListener::bind(field("listen:")?).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
