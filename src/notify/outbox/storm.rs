//! Storm control: past `storm.threshold` pages to one channel within `storm.window`, a page is
//! folded into one summary entry for that channel instead of being sent. The summary is sent
//! `storm.summary_after` after its first fold, its text written from what was folded into it, and
//! it resolves when every page folded into it has resolved. The counts are rebuilt from the
//! outbox at start.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::{Entry, Notifier, State};
use crate::clock::later;
use crate::history::StoreError;
use crate::notify::{Kind, Notice, Severity};

impl Notifier {
    /// Storm control's counts survive a restart: pages stored within the window, and the summary
    /// still gathering.
    pub(super) fn restore_windows(&self, now: Timestamp) -> Result<(), StoreError> {
        let since = crate::clock::earlier(now, self.storm.window);
        let mut windows = self.windows.lock().unwrap();
        for e in self.entries()? {
            if e.created < since {
                continue;
            }
            let w = windows.entry(e.channel.clone()).or_default();
            match e.notice.kind {
                Kind::Run if e.state != State::Folded => w.stored.push_back(e.created),
                Kind::Storm => w.storm = Some((e.key.clone(), e.created)),
                _ => {}
            }
        }
        for w in windows.values_mut() {
            w.stored.make_contiguous().sort();
        }
        Ok(())
    }

    /// Counts a page for `channel`; past the threshold, returns the key of the storm summary to
    /// fold it into (stored first when there is none).
    pub(super) fn fold_into(
        &self,
        channel: &str,
        now: Timestamp,
    ) -> Result<Option<String>, StoreError> {
        if self.storm.threshold == 0 {
            return Ok(None);
        }
        let since = crate::clock::earlier(now, self.storm.window);
        let mut windows = self.windows.lock().unwrap();
        let w = windows.entry(channel.to_owned()).or_default();
        while w.stored.front().is_some_and(|t| *t < since) {
            w.stored.pop_front();
        }
        if (w.stored.len() as u64) < u64::from(self.storm.threshold) {
            w.stored.push_back(now);
            return Ok(None);
        }
        if let Some((key, started)) = &w.storm {
            if *started >= since {
                if let Some(s) = self.get(key)? {
                    if matches!(s.state, State::Pending | State::Checking | State::Delivered) {
                        return Ok(Some(s.key));
                    }
                }
            }
        }
        let key = format!("storm/{channel}/{}", now.as_millisecond());
        let notice = Notice {
            kind: Kind::Storm,
            dedup_key: format!("reactor/storm/{channel}/{}", now.as_millisecond()),
            summary: String::new(),
            description: String::new(),
            severity: Severity::Critical,
            source: "reactor".into(),
            component: "reactor".into(),
            group: String::new(),
            class: "RemediationStorm".into(),
            link: format!("{}/api/v1/runs?outcome=failed", self.external_url),
            labels: [("alertname".to_owned(), "RemediationStorm".to_owned())].into(),
            annotations: Default::default(),
            details: Default::default(),
            at: now,
            to: None,
        };
        let mut s = Entry::new(key.clone(), channel, notice, now);
        s.next_attempt = later(now, self.storm.summary_after);
        self.put(&s)?;
        w.storm = Some((key.clone(), now));
        tracing::warn!(%channel, threshold = self.storm.threshold, "page storm: further pages are folded into one summary");
        Ok(Some(key))
    }

    pub(super) fn unfold(
        &self,
        summary: &str,
        folded: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.update(summary, |s| {
            s.open_folds.retain(|k| k != folded);
            if s.open_folds.is_empty() {
                // Every page folded into it resolved: so does the summary (cancelled if not sent
                // yet; a later fold opens a new one).
                self.close(s, now);
            }
        })?;
        Ok(())
    }

    /// Fills a storm summary's text from what was folded into it.
    pub(super) fn describe_storm(&self, e: &mut Entry) {
        let window = humantime::format_duration(self.storm.window);
        let top = |m: &BTreeMap<String, u32>| {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            v.iter()
                .take(5)
                .map(|(k, n)| format!("{k} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let n = e.folded_total + self.storm.threshold;
        e.notice.summary = format!(
            "{n} remediations failed within {window} on {}: further pages are folded into this one",
            e.channel
        );
        e.notice.description = format!(
            "Top playbooks: {}. Top targets: {}. {} page(s) folded; the first {} were sent on their own.",
            top(&e.by_playbook),
            top(&e.by_target),
            e.folded_total,
            self.storm.threshold
        );
        e.notice.details = [
            ("folded".to_owned(), e.folded_total.into()),
            ("top_playbooks".to_owned(), top(&e.by_playbook).into()),
            ("top_targets".to_owned(), top(&e.by_target).into()),
        ]
        .into_iter()
        .collect();
        e.notice.annotations = [
            ("summary".to_owned(), e.notice.summary.clone()),
            ("description".to_owned(), e.notice.description.clone()),
        ]
        .into();
    }
}
