//! reactor: a self-healing remediation engine wired as a Prometheus Alertmanager webhook receiver.
//!
//! An alert travels `routes` (HTTP edge) → `domain` (parse the wire payload once) → `playbook`
//! (match) → `engine` + `executor` (run steps in the Rhai sandbox) → `history` (sled) →
//! `escalation` (page humans through Alertmanager when the fix fails). `poller` is the second
//! intake (alerts Alertmanager holds back while reactor is alive), `watchdog` makes reactor's own
//! failures page, `alertmanager` is the API client both use. `app` assembles these from `config`;
//! `cli` is the command line; `allocator` is the binary's memory allocator.

pub mod alertmanager;
pub mod allocator;
pub mod app;
pub mod bounds;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod engine;
pub mod escalation;
pub mod executor;
pub mod guard;
pub mod ha;
pub mod health;
pub mod history;
pub mod incident;
pub mod metrics;
pub mod notify;
pub mod pause;
pub mod playbook;
pub mod poller;
pub mod reload;
pub mod retention;
pub mod routes;
pub mod telemetry;
pub mod tls;
pub mod watchdog;

/// The unit tests count memory per thread as the binary does (the sandbox's memory bound).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: allocator::Allocator = allocator::Allocator;
