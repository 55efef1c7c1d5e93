//! Who is on call at an instant, and whom each level of an escalation policy reaches.
//!
//! A team's schedule is read in its own time zone, so a hand-off at 09:00 stays at 09:00 local
//! time across daylight-saving changes. Precedence, highest first: an override covering the
//! instant, the calendar's entry for the local day, then the rotations (the last one listed that
//! has started). A rotation of whole days (`daily`, `weekly`, `3d`) hands off at the local
//! hand-off time on calendar days; any other length (`12h`) counts elapsed time from its start.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

/// How long one participant's shift lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    /// Whole calendar days, handed off at the local hand-off time.
    Days(u32),
    /// Elapsed time from the rotation's start.
    Fixed(Duration),
}

#[derive(Debug, Clone)]
pub struct Rotation {
    pub name: String,
    pub shift: Shift,
    pub handoff: Time,
    /// The first participant's first shift starts at the hand-off time of this local day.
    pub start: Date,
    pub participants: Vec<String>,
}

/// A person covering `from` until `to`.
#[derive(Debug, Clone)]
pub struct Override {
    pub person: String,
    pub from: Timestamp,
    pub to: Timestamp,
}

/// One local day of the on-call calendar: who is on call that day and who is the escalation
/// contact (from midnight to midnight in the schedule's zone).
#[derive(Debug, Clone, Default)]
pub struct CalendarDay {
    pub oncall: Option<String>,
    pub escalation_contact: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub time_zone: TimeZone,
    pub time_zone_name: String,
    pub rotations: Vec<Rotation>,
    pub overrides: Vec<Override>,
    pub calendar: BTreeMap<Date, CalendarDay>,
}

/// A person on duty, and why (`override`, `calendar`, `rotation NAME`, `team`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDuty {
    pub person: String,
    pub why: String,
    /// When this duty ends, where the schedule knows it (a rotation's hand-off, an override's end).
    pub until: Option<Timestamp>,
}

/// The local day's start and the next local midnight, as instants.
fn day_bounds(date: Date, tz: &TimeZone) -> Option<(Timestamp, Timestamp)> {
    let start = date.to_zoned(tz.clone()).ok()?.timestamp();
    let end = date.tomorrow().ok()?.to_zoned(tz.clone()).ok()?.timestamp();
    Some((start, end))
}

/// The instant of `time` on local day `date` (a time skipped by a daylight-saving gap moves
/// forward by the gap, as clocks do).
fn at_local(date: Date, time: Time, tz: &TimeZone) -> Option<Timestamp> {
    Some(
        date.to_datetime(time)
            .to_zoned(tz.clone())
            .ok()?
            .timestamp(),
    )
}

fn add_days(date: Date, days: i64) -> Option<Date> {
    date.checked_add(Span::new().try_days(days).ok()?).ok()
}

impl Rotation {
    /// Who holds the rotation at `t` and until when; `None` before its start.
    pub fn at(&self, t: Timestamp, tz: &TimeZone) -> Option<OnDuty> {
        if self.participants.is_empty() {
            return None;
        }
        let n = self.participants.len() as i64;
        let why = format!("rotation {}", self.name);
        match self.shift {
            Shift::Days(days) => {
                let days = i64::from(days.max(1));
                let mut date = t.to_zoned(tz.clone()).date();
                if t < at_local(date, self.handoff, tz)? {
                    date = date.yesterday().ok()?;
                }
                let elapsed = i64::from(date.since(self.start).ok()?.get_days());
                if elapsed < 0 {
                    return None;
                }
                let shift = elapsed / days;
                let end = add_days(self.start, (shift + 1) * days)?;
                Some(OnDuty {
                    person: self.participants[(shift % n) as usize].clone(),
                    why,
                    until: at_local(end, self.handoff, tz),
                })
            }
            Shift::Fixed(length) => {
                let start = at_local(self.start, self.handoff, tz)?;
                let length = length.as_millis().max(1) as i64;
                let elapsed = t.as_millisecond() - start.as_millisecond();
                if elapsed < 0 {
                    return None;
                }
                let shift = elapsed / length;
                Some(OnDuty {
                    person: self.participants[(shift % n) as usize].clone(),
                    why,
                    until: Timestamp::from_millisecond(
                        start.as_millisecond().saturating_add((shift + 1) * length),
                    )
                    .ok(),
                })
            }
        }
    }
}

impl Schedule {
    /// The on-call at `t`: an override, else the calendar's day, else the rotations.
    pub fn oncall(&self, t: Timestamp) -> Option<OnDuty> {
        if let Some(o) = self
            .overrides
            .iter()
            .rev()
            .find(|o| o.from <= t && t < o.to)
        {
            return Some(OnDuty {
                person: o.person.clone(),
                why: "override".into(),
                until: Some(o.to),
            });
        }
        let date = t.to_zoned(self.time_zone.clone()).date();
        if let Some(person) = self.calendar.get(&date).and_then(|d| d.oncall.as_ref()) {
            return Some(OnDuty {
                person: person.clone(),
                why: "calendar".into(),
                until: day_bounds(date, &self.time_zone).map(|(_, end)| end),
            });
        }
        self.rotations
            .iter()
            .rev()
            .find_map(|r| r.at(t, &self.time_zone))
    }

    /// The calendar's escalation contact for the local day of `t`.
    pub fn escalation_contact(&self, t: Timestamp) -> Option<OnDuty> {
        let date = t.to_zoned(self.time_zone.clone()).date();
        let person = self.calendar.get(&date)?.escalation_contact.clone()?;
        Some(OnDuty {
            person,
            why: "calendar".into(),
            until: day_bounds(date, &self.time_zone).map(|(_, end)| end),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn daily(handoff: &str) -> Rotation {
        Rotation {
            name: "primary".into(),
            shift: Shift::Days(1),
            handoff: handoff.parse().unwrap(),
            start: "2027-03-25".parse().unwrap(),
            participants: vec!["alice".into(), "bob".into(), "carol".into()],
        }
    }

    #[test]
    fn a_daily_hand_off_stays_at_local_time_across_the_spring_daylight_saving_change() {
        // Berlin moves from UTC+1 to UTC+2 at 2027-03-28 01:00 UTC.
        let r = daily("09:00");
        let who = |t: &str| r.at(ts(t), &berlin()).map(|d| d.person);
        // 2027-03-25 09:00 +01:00 starts alice; 26 bob; 27 carol; 28 alice; 29 bob.
        assert_eq!(
            who("2027-03-27T07:59:00Z").as_deref(),
            Some("bob"),
            "08:59 CET"
        );
        assert_eq!(
            who("2027-03-27T08:00:00Z").as_deref(),
            Some("carol"),
            "09:00 CET"
        );
        assert_eq!(
            who("2027-03-28T06:59:00Z").as_deref(),
            Some("carol"),
            "08:59 CEST"
        );
        // 09:00 local is now 07:00 UTC: a hand-off kept at 08:00 UTC would still say carol.
        assert_eq!(
            who("2027-03-28T07:00:00Z").as_deref(),
            Some("alice"),
            "09:00 CEST"
        );
        assert_eq!(who("2027-03-28T07:30:00Z").as_deref(), Some("alice"));
        assert_eq!(who("2027-03-29T07:30:00Z").as_deref(), Some("bob"));
        assert_eq!(
            who("2027-03-25T07:59:00Z"),
            None,
            "before the rotation starts"
        );
        let duty = r.at(ts("2027-03-28T07:00:00Z"), &berlin()).unwrap();
        assert_eq!(duty.until, Some(ts("2027-03-29T07:00:00Z")));
    }

    #[test]
    fn a_hand_off_inside_the_autumn_overlap_and_the_spring_gap_still_happens_once_a_day() {
        let r = daily("02:30");
        let who = |t: &str| r.at(ts(t), &berlin()).unwrap().person;
        // 2027-03-28 02:30 does not exist in Berlin: the hand-off is at 03:30 CEST (01:30 UTC).
        assert_eq!(who("2027-03-28T01:29:00Z"), "carol");
        assert_eq!(who("2027-03-28T01:30:00Z"), "alice");
        // 2027-10-31 02:30 happens twice; the first one hands off.
        let mut r = daily("02:30");
        r.start = "2027-10-29".parse().unwrap();
        let who = |t: &str| r.at(ts(t), &berlin()).unwrap().person;
        assert_eq!(who("2027-10-31T00:29:00Z"), "bob", "02:29 CEST");
        assert_eq!(who("2027-10-31T00:30:00Z"), "carol", "02:30 CEST");
        assert_eq!(
            who("2027-10-31T01:30:00Z"),
            "carol",
            "02:30 CET, no second hand-off"
        );
    }

    #[test]
    fn overrides_win_over_the_calendar_and_the_calendar_over_the_rotation() {
        let mut calendar = BTreeMap::new();
        calendar.insert(
            "2027-03-29".parse().unwrap(),
            CalendarDay {
                oncall: Some("dave".into()),
                escalation_contact: Some("erin".into()),
            },
        );
        let s = Schedule {
            time_zone: berlin(),
            time_zone_name: "Europe/Berlin".into(),
            rotations: vec![daily("09:00")],
            overrides: vec![Override {
                person: "frank".into(),
                from: ts("2027-03-29T10:00:00Z"),
                to: ts("2027-03-29T12:00:00Z"),
            }],
            calendar,
        };
        let who = |t: &str| s.oncall(ts(t)).map(|d| (d.person, d.why));
        assert_eq!(
            who("2027-03-28T12:00:00Z"),
            Some(("alice".into(), "rotation primary".into()))
        );
        assert_eq!(
            who("2027-03-29T09:00:00Z"),
            Some(("dave".into(), "calendar".into()))
        );
        assert_eq!(
            who("2027-03-29T11:00:00Z"),
            Some(("frank".into(), "override".into()))
        );
        assert_eq!(
            who("2027-03-29T12:00:00Z"),
            Some(("dave".into(), "calendar".into()))
        );
        assert_eq!(
            s.escalation_contact(ts("2027-03-29T21:59:00Z"))
                .unwrap()
                .person,
            "erin",
            "23:59 local is still the 29th"
        );
        assert!(s.escalation_contact(ts("2027-03-29T22:00:00Z")).is_none());
    }

    #[test]
    fn a_fixed_length_shift_counts_elapsed_time() {
        let r = Rotation {
            shift: Shift::Fixed(Duration::from_secs(12 * 3600)),
            ..daily("08:00")
        };
        let who = |t: &str| r.at(ts(t), &berlin()).unwrap().person;
        assert_eq!(who("2027-03-25T07:00:00Z"), "alice");
        assert_eq!(who("2027-03-25T19:00:00Z"), "bob");
        assert_eq!(who("2027-03-26T07:00:00Z"), "carol");
        assert_eq!(who("2027-03-26T19:00:00Z"), "alice");
    }
}
