//! Time, injected. Guards, cooldowns and windows read the time through [`Clock`] so that tests can
//! move it explicitly ([`ManualClock`]) instead of sleeping. Time arithmetic goes through
//! [`later`], [`earlier`] and [`deadline`], which saturate instead of overflowing: a duration too
//! long for the clock means "never", not a panic.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to; for tests of windows and cooldowns.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Timestamp>>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    pub fn advance(&self, by: std::time::Duration) {
        let mut t = self.0.lock().unwrap();
        *t = t
            .checked_add(SignedDuration::try_from(by).unwrap())
            .unwrap();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap()
    }
}

/// How far [`deadline`] reaches when the duration asked for does not fit the monotonic clock.
const NEVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `t + d`, or the end of time.
pub fn later(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `t - d`, or the start of time.
pub fn earlier(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

/// The instant `d` from now; a century away when `d` does not fit the clock.
pub fn deadline(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(NEVER))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(later(Timestamp::now(), huge), Timestamp::MAX);
        assert_eq!(earlier(Timestamp::now(), huge), Timestamp::MIN);
        assert!(deadline(huge) > Instant::now() + Duration::from_secs(365 * 86_400));
        let t = Timestamp::UNIX_EPOCH;
        assert_eq!(later(t, Duration::from_secs(60)).as_second(), 60);
        assert_eq!(
            earlier(later(t, Duration::from_secs(60)), Duration::from_secs(60)),
            t
        );
    }
}
