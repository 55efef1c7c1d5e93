//! One integration test binary (zero2prod style): the real app on port 0 with a temporary sled,
//! the real binary for crash and CLI tests, and the real Alertmanager for end-to-end tests.

mod alertmanager;
mod cli;
mod closed_loop;
mod crash;
mod fake_kube;
mod guards;
mod helpers;
mod kubernetes;
mod router;
mod watchdog;
mod webhook;
