//! A latency histogram of fixed buckets that many tasks fill at once without a lock.
//!
//! Values (microseconds) below 128 have a bucket each; above, every power of two is cut into 64
//! buckets, so a quantile read back is at most 1/64 (1.6 %) above the true value, whatever the
//! range: enough to tell 2 ms from 2.1 ms, or 2 s from 2.1 s. 2,304 counters, 18 KiB.
//!
//! The load tasks [`AtomicHistogram::record`] into one shared histogram; every report
//! [`AtomicHistogram::take`]s what was recorded since the last one (each counter swapped for 0),
//! and the summary merges those.

use std::sync::atomic::{AtomicU64, Ordering};

/// Values below this have a bucket of their own.
const EXACT_BELOW: u64 = 128;
/// `EXACT_BELOW` is 2 to this power.
const EXACT_POWER: u32 = 7;
/// Buckets per power of two above `EXACT_BELOW`, as a number of bits.
const SUB_BITS: u32 = 6;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// The highest power of two with buckets of its own (2^40 us is 12.7 days); anything larger
/// is counted in the last bucket.
const MAX_POWER: u32 = 40;
const BUCKETS: usize = EXACT_BELOW as usize + (MAX_POWER - EXACT_POWER + 1) as usize * SUB_BUCKETS;

/// The bucket `value` is counted in.
fn bucket_of(value: u64) -> usize {
    if value < EXACT_BELOW {
        return value as usize;
    }
    let power = 63 - value.leading_zeros();
    if power > MAX_POWER {
        return BUCKETS - 1;
    }
    // The SUB_BITS bits below the highest one pick the bucket within the power of two.
    let sub = (value >> (power - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    EXACT_BELOW as usize + (power - EXACT_POWER) as usize * SUB_BUCKETS + sub
}

/// The largest value counted in `bucket`.
fn highest_in(bucket: usize) -> u64 {
    if bucket < EXACT_BELOW as usize {
        return bucket as u64;
    }
    let above = bucket - EXACT_BELOW as usize;
    let power = EXACT_POWER + (above / SUB_BUCKETS) as u32;
    let width = 1u64 << (power - SUB_BITS);
    let lowest = (SUB_BUCKETS + above % SUB_BUCKETS) as u64 * width;
    lowest + width - 1
}

/// Filled by many tasks at once; read by [`AtomicHistogram::take`].
pub struct AtomicHistogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    pub fn record(&self, micros: u64) {
        self.counts[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    /// What was recorded since the last call, leaving this empty. A value recorded while this
    /// runs is in this result or in the next one, never lost.
    pub fn take(&self) -> Histogram {
        Histogram {
            counts: self
                .counts
                .iter()
                .map(|c| c.swap(0, Ordering::Relaxed))
                .collect(),
            max: self.max.swap(0, Ordering::Relaxed),
        }
    }
}

/// Counts read out of an [`AtomicHistogram`].
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            max: 0,
        }
    }
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The largest value recorded; `None` when nothing was.
    pub fn max(&self) -> Option<u64> {
        (self.count() > 0).then_some(self.max)
    }

    /// The value `q` (0 to 1) of the recorded ones are at or below: the highest value of its
    /// bucket, but never above the largest recorded. `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        // The rank of the value asked for, 1-based: p99 of 100 values is the 99th.
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(highest_in(bucket).min(self.max));
            }
        }
        Some(self.max)
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_that_holds_it() {
        let mut value = 0u64;
        while value < 1 << 42 {
            let bucket = bucket_of(value);
            assert!(bucket < BUCKETS, "{value}");
            if value < 1 << (MAX_POWER + 1) {
                assert!(highest_in(bucket) >= value, "{value} above its bucket");
                let below = bucket.checked_sub(1).map_or(0, |b| highest_in(b) + 1);
                assert!(below <= value, "{value} below its bucket");
            }
            value = value * 17 / 16 + 1;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_a_sixtyfourth_of_the_truth() {
        let histogram = AtomicHistogram::default();
        for micros in 1..=100_000 {
            histogram.record(micros);
        }
        let h = histogram.take();
        assert_eq!(h.count(), 100_000);
        for (q, truth) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.001, 100.0)] {
            let got = h.quantile(q).expect("values") as f64;
            assert!(
                got >= truth && got <= truth * (1.0 + 1.0 / 64.0),
                "q{q}: {got} for {truth}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(100_000));
        assert_eq!(h.max(), Some(100_000));
    }

    #[test]
    fn take_empties_it_and_merge_adds_up() {
        let histogram = AtomicHistogram::default();
        histogram.record(10);
        histogram.record(3_000);
        let first = histogram.take();
        assert_eq!(histogram.take().count(), 0);
        assert_eq!(histogram.take().quantile(0.99), None);
        histogram.record(7);
        let mut total = first;
        total.merge(&histogram.take());
        assert_eq!(total.count(), 3);
        assert_eq!(total.quantile(0.0), Some(7));
        assert_eq!(total.max(), Some(3_000));
    }
}
