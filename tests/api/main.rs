//! One integration test binary (zero2prod style): the real app on port 0 with a temporary sled,
//! the real binary for crash and CLI tests, and the real Alertmanager for end-to-end tests.

/// The binary's allocator, so in-process apps bound a script's memory as the binary does.
#[global_allocator]
static ALLOCATOR: reactor::allocator::Allocator = reactor::allocator::Allocator;

mod acting;
mod alertmanager;
mod approval;
mod browser;
mod channels;
mod cli;
mod closed_loop;
mod console;
mod crash;
mod docs;
mod fake_kube;
mod guards;
mod ha;
mod hardening;
mod helpers;
mod incidents;
mod kubernetes;
mod manifests;
mod manual;
mod oncall;
mod pages;
mod paging_path;
mod pause;
mod reload;
mod router;
mod services;
mod shadow;
mod soak;
mod structure;
mod watchdog;
mod webhook;
