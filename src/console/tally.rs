//! What the store cannot know: requests answered without being stored (refused for their
//! address, signature, size, ...) and duplicates. The ingress counts every answer through
//! `telemetry::count_delivery`, which moves the `labelhook_deliveries_total{outcome}` counter
//! and, in the same call, a total per outcome that can be read in process (so the two cannot
//! drift apart, and nothing renders `/metrics` to read a number back). The console samples
//! those totals once a minute, so that it can tell what happened in the last hour and in each
//! part of it.
//!
//! The counts are this process's since it started: on several replicas, each console shows its
//! own replica's refusals.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::delivery::{Clock, UnixMillis};

/// How often the counts are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(60);
/// Samples kept: a little more than an hour's.
const SAMPLES_KEPT: usize = 64;
/// Outcomes of deliveries that were stored or had been; every other outcome is a refusal.
pub const ACCEPTED: &str = "accepted";
pub const DUPLICATE: &str = "duplicate";

/// Counts by outcome.
pub type Counts = BTreeMap<String, u64>;

/// Where the counts come from: the ingress's totals, or (tests) anything else.
pub type Source = Box<dyn Fn() -> Counts + Send + Sync>;

/// The answers the ingress gave, by outcome, sampled over time.
pub struct Tally {
    source: Source,
    /// (when, counts then), oldest first.
    samples: Mutex<VecDeque<(UnixMillis, Counts)>>,
}

impl Tally {
    /// Reads the totals of the answers this process gave (`telemetry::deliveries_by_outcome`).
    pub fn of_this_process() -> Tally {
        Tally::new(Box::new(crate::telemetry::deliveries_by_outcome))
    }

    pub fn new(source: Source) -> Tally {
        Tally {
            source,
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// The counts now.
    pub fn now(&self) -> Counts {
        (self.source)()
    }

    /// Takes a sample of the counts at `at`.
    pub fn sample(&self, at: UnixMillis) {
        let counts = self.now();
        if let Ok(mut samples) = self.samples.lock() {
            samples.push_back((at, counts));
            while samples.len() > SAMPLES_KEPT {
                samples.pop_front();
            }
        }
    }

    /// The counts as they were at `at`: the last sample taken by then, or none at all (zero)
    /// before the first one, when this process had counted next to nothing yet.
    fn at(&self, at: UnixMillis) -> Counts {
        let Ok(samples) = self.samples.lock() else {
            return Counts::new();
        };
        samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }

    /// What was counted from `from` to `now` (`now` meaning the counts now).
    pub fn since(&self, from: UnixMillis) -> Counts {
        difference(&self.now(), &self.at(from))
    }

    /// What was counted in each of the buckets starting at `starts`, each `bucket_ms` long,
    /// the last one up to now.
    pub fn per_bucket(&self, starts: &[UnixMillis], bucket_ms: i64) -> Vec<Counts> {
        let now = self.now();
        starts
            .iter()
            .enumerate()
            .map(|(i, &start)| {
                let end = if i + 1 == starts.len() {
                    now.clone()
                } else {
                    self.at(start + bucket_ms)
                };
                difference(&end, &self.at(start))
            })
            .collect()
    }
}

/// Samples `tally` every [`SAMPLE_INTERVAL`] until `stop`.
pub async fn sample_until_stopped(
    tally: std::sync::Arc<Tally>,
    clock: std::sync::Arc<dyn Clock>,
    stop: CancellationToken,
) {
    loop {
        tally.sample(clock.now());
        tokio::select! {
            () = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Outcomes counted in a refusal: everything but accepted and duplicate.
pub fn refusals(counts: &Counts) -> impl Iterator<Item = (&str, u64)> {
    counts
        .iter()
        .filter(|(outcome, _)| !matches!(outcome.as_str(), ACCEPTED | DUPLICATE))
        .map(|(outcome, n)| (outcome.as_str(), *n))
}

pub fn total(counts: &Counts) -> u64 {
    counts.values().sum()
}

fn difference(later: &Counts, earlier: &Counts) -> Counts {
    later
        .iter()
        .map(|(outcome, n)| {
            let before = earlier.get(outcome).copied().unwrap_or(0);
            (outcome.clone(), n.saturating_sub(before))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_every_outcome_but_accepted_and_duplicate() {
        let counts: Counts = [("accepted", 4), ("duplicate", 1), ("signature_mismatch", 2)]
            .into_iter()
            .map(|(outcome, n)| (outcome.to_owned(), n))
            .collect();
        assert_eq!(
            refusals(&counts).collect::<Vec<_>>(),
            [("signature_mismatch", 2)]
        );
        assert_eq!(total(&counts), 7);
    }

    #[test]
    fn a_window_counts_only_what_came_after_its_start() {
        let value = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(5));
        let read = value.clone();
        let tally = Tally::new(Box::new(move || {
            let n = read.load(std::sync::atomic::Ordering::Relaxed);
            Counts::from([("too_large".to_owned(), n)])
        }));
        tally.sample(1_000);
        value.store(8, std::sync::atomic::Ordering::Relaxed);
        tally.sample(61_000);
        value.store(10, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(tally.since(1_000).get("too_large"), Some(&5));
        assert_eq!(tally.since(61_000).get("too_large"), Some(&2));
        // Before the first sample the process had counted nothing.
        assert_eq!(tally.since(0).get("too_large"), Some(&10));
        let buckets = tally.per_bucket(&[1_000, 61_000], 60_000);
        assert_eq!(buckets[0].get("too_large"), Some(&3));
        assert_eq!(buckets[1].get("too_large"), Some(&2));
    }
}
