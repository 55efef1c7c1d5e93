//! The ranges of every number a playbook or the configuration can set, in one place. They are
//! checked when a file is loaded, so `reactor check` and `serve` refuse a value outside them with
//! the file, the line and the range; nothing at run time has to guard against `retries:
//! 4294967295` wrapping or `timeout: 500000000000y` overflowing a deadline. docs/operations.md
//! lists the same table for users.

use std::time::Duration;

/// An inclusive range of counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub min: u64,
    pub max: u64,
}

/// An inclusive range of durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub min: Duration,
    pub max: Duration,
}

const fn count(min: u64, max: u64) -> Count {
    Count { min, max }
}

const fn secs(min: u64, max: u64) -> Span {
    Span {
        min: Duration::from_secs(min),
        max: Duration::from_secs(max),
    }
}

const MINUTE: u64 = 60;
const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;

// Playbooks.
pub const STEPS: Count = count(1, 100);
/// How long a gated step waits for its approval.
pub const APPROVAL_TIMEOUT: Span = secs(1, 7 * DAY);
pub const STEP_TIMEOUT: Span = Span {
    min: Duration::from_millis(1),
    max: Duration::from_secs(DAY),
};
pub const STEP_RETRIES: Count = count(0, 100);
pub const RETRY_DELAY: Span = secs(0, HOUR);
pub const PLAYBOOK_MAX_CONCURRENT: Count = count(0, 10_000);
pub const GUARD_COOLDOWN: Span = secs(0, 30 * DAY);
pub const GUARD_WINDOW: Span = secs(1, 30 * DAY);
pub const GUARD_MAX_ATTEMPTS: Count = count(0, 10_000);
pub const BREAKER_FAILURES: Count = count(0, 1_000);
pub const BREAKER_COOLDOWN: Span = secs(0, 30 * DAY);
pub const VERIFY_WITHIN: Span = secs(1, 7 * DAY);
/// The leader's Lease: how long it holds, how often it is renewed, the clock-skew margin.
pub const LEASE_DURATION: Span = secs(2, 10 * MINUTE);
pub const LEASE_RENEW: Span = secs(1, 5 * MINUTE);
pub const LEASE_SKEW: Span = secs(0, MINUTE);
/// An escalation level's wait for a claim, and the length of an on-call shift.
pub const ACK_TIMEOUT: Span = secs(1, 7 * DAY);
pub const SHIFT_LENGTH: Span = secs(MINUTE, 365 * DAY);
/// Levels of an escalation policy, its repeats, a rotation's participants.
pub const POLICY_LEVELS: Count = count(1, 20);
pub const POLICY_REPEAT: Count = count(0, 10);
pub const PARTICIPANTS: Count = count(1, 1_000);
/// The longest a playbook's steps may take together: every timeout times its attempts, plus
/// the delays between them. Past it, the stuck-run check could never fire.
pub const PLAYBOOK_BUDGET: Span = secs(0, 7 * DAY);
pub const SCALE_BY: Count = count(1, 1_000);
pub const SCALE_FACTOR_MAX: f64 = 100.0;
pub const MAX_REPLICAS: Count = count(1, 10_000);

// Configuration: the Rhai sandbox. `max_call_levels` sizes the stack of the threads scripts run
// on (see `executor::sandbox::STACK_PER_CALL_LEVEL`).
pub const SANDBOX_OPERATIONS: Count = count(0, 1_000_000_000);
pub const SANDBOX_CALL_LEVELS: Count = count(1, 256);
pub const SANDBOX_EXPR_DEPTH: Count = count(1, 256);
pub const SANDBOX_STRING_SIZE: Count = count(1, 64 << 20);
pub const SANDBOX_ARRAY_SIZE: Count = count(1, 10_000_000);
pub const SANDBOX_MAP_SIZE: Count = count(1, 1_000_000);
pub const SANDBOX_MEMORY: Count = count(1 << 20, 4 << 30);
/// Bytes kept of each output stream of a program run by `exec()` or a `command:` step.
pub const EXEC_OUTPUT_BYTES: Count = count(1 << 10, 64 << 20);
/// Bytes kept of a response body for `http::` calls.
pub const HTTP_BODY_BYTES: Count = count(1 << 10, 64 << 20);

// Configuration: the webhook and the runs.
pub const MAX_BODY_BYTES: Count = count(1 << 10, 256 << 20);
pub const MAX_ALERTS_PER_PAYLOAD: Count = count(1, 100_000);
pub const MAX_LABELS_PER_ALERT: Count = count(1, 10_000);
pub const MAX_LABEL_BYTES: Count = count(1, 1 << 20);
pub const QUEUE_CAPACITY: Count = count(1, 10_000_000);
pub const MAX_CONCURRENT_RUNS: Count = count(1, 100_000);
pub const SHUTDOWN_GRACE: Span = secs(0, HOUR);
pub const MAX_CONNECTIONS: Count = count(1, 1_000_000);
pub const CONNECTION_TIMEOUT: Span = Span {
    min: Duration::from_millis(100),
    max: Duration::from_secs(HOUR),
};
pub const BUFFERED_BODY_BYTES: Count = count(1 << 10, 16 << 30);

// Configuration: peers and background tasks.
pub const PEER_TIMEOUT: Span = Span {
    min: Duration::from_millis(10),
    max: Duration::from_secs(10 * MINUTE),
};
pub const RETRY_BACKOFF: Span = Span {
    min: Duration::from_millis(1),
    max: Duration::from_secs(MINUTE),
};
pub const PAGE_TTL: Span = secs(MINUTE, 30 * DAY);
pub const POLL_INTERVAL: Span = secs(0, HOUR);
/// Pages to one channel within the storm window before folding (0: storm control off).
pub const STORM_THRESHOLD: Count = count(0, 100_000);
pub const STORM_WINDOW: Span = Span {
    min: Duration::from_millis(10),
    max: Duration::from_secs(DAY),
};
pub const WATCHDOG_INTERVAL: Span = Span {
    min: Duration::from_millis(10),
    max: Duration::from_secs(DAY),
};
pub const HISTORY_MAX_AGE: Span = secs(MINUTE, 10 * 365 * DAY);
pub const HISTORY_MAX_RUNS: Count = count(1, 1_000_000_000);
pub const PRUNE_INTERVAL: Span = Span {
    min: Duration::from_millis(10),
    max: Duration::from_secs(DAY),
};
pub const JOB_DEADLINE: Span = secs(1, DAY);
pub const JOB_POLL_INTERVAL: Span = Span {
    min: Duration::from_millis(10),
    max: Duration::from_secs(HOUR),
};
pub const JOB_TTL: Span = secs(0, 30 * DAY);

impl Count {
    /// `value` if it lies in the range, else why not, naming `field`.
    pub fn check(self, field: &str, value: u64) -> Result<u64, String> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(format!(
                "{field}: {value} is outside the allowed range {}..={}",
                self.min, self.max
            ))
        }
    }
}

impl Span {
    /// `value` if it lies in the range, else why not, naming `field`.
    pub fn check(self, field: &str, value: Duration) -> Result<Duration, String> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if value > self.max {
            Err(format!(
                "{field}: {} is longer than the longest allowed, {}",
                show(value),
                show(self.max)
            ))
        } else if value < self.min {
            Err(format!(
                "{field}: {} is shorter than the shortest allowed, {}",
                show(value),
                show(self.min)
            ))
        } else {
            Ok(value)
        }
    }
}

/// Any duration at all: for settings whose range the configuration checks once every layer is
/// applied (`Settings::validate`).
pub const ANY: Span = Span {
    min: Duration::ZERO,
    max: Duration::MAX,
};
/// `older_than` of a cleanup Job: `find -mmin` counts minutes.
pub const CLEANUP_AGE: Span = secs(MINUTE, 100 * 365 * DAY);
/// `older_than` of the `disk_cleanup` helper.
pub const HELPER_CLEANUP_AGE: Span = secs(0, 100 * 365 * DAY);

/// Parses a duration such as `30s` or `5m`, naming `field` and the range when it does not parse
/// or falls outside `span`: the one place reactor reads a duration from text.
pub fn parse_duration(field: &str, text: &str, span: Span) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{field}: expected a duration like 30s or 5m, got {text:?} ({e})"))?;
    span.check(field, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_a_range_are_refused_with_the_field_and_range() {
        assert_eq!(STEP_RETRIES.check("retries", 3), Ok(3));
        assert_eq!(
            STEP_RETRIES.check("retries", u32::MAX as u64),
            Err("retries: 4294967295 is outside the allowed range 0..=100".into())
        );
        let e = parse_duration("timeout", "400000000000y", STEP_TIMEOUT).unwrap_err();
        assert!(e.starts_with("timeout: "), "{e}");
        let e = parse_duration("timeout", "25h", STEP_TIMEOUT).unwrap_err();
        assert_eq!(
            e,
            "timeout: 1day 1h is longer than the longest allowed, 1day"
        );
        assert!(parse_duration("window", "0s", GUARD_WINDOW)
            .unwrap_err()
            .contains("shorter than the shortest allowed, 1s"));
    }
}
