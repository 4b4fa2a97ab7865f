//! Latency samples and their percentiles. Every sample is kept (microseconds as `u32`,
//! 4 bytes each): a run produces at most a few million, and exact percentiles need no
//! histogram library.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Default, Debug)]
pub struct Samples(Vec<u32>);

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sorts once so that the percentile queries are cheap.
    pub fn sorted(mut self) -> Sorted {
        self.0.sort_unstable();
        Sorted(self.0)
    }
}

/// Samples in ascending order.
pub struct Sorted(Vec<u32>);

impl Sorted {
    /// Nearest-rank percentile (`p` in 0..=100) in milliseconds; 0 without samples.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.0.len()) - 1;
        f64::from(self.0[i]) / 1_000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.0.last().map_or(0.0, |&us| f64::from(us) / 1_000.0)
    }

    /// `p50_ms=… p99_ms=… max_ms=…` with the given key prefix.
    pub fn fields(&self, prefix: &str) -> String {
        format!(
            "{prefix}p50_ms={:.3} {prefix}p99_ms={:.3} {prefix}max_ms={:.3}",
            self.percentile_ms(50.0),
            self.percentile_ms(99.0),
            self.max_ms()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut s = Samples::default();
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        let s = s.sorted();
        assert!((s.percentile_ms(50.0) - 50.0).abs() < 1e-9);
        assert!((s.percentile_ms(99.0) - 99.0).abs() < 1e-9);
        assert!((s.max_ms() - 100.0).abs() < 1e-9);
        assert!(Samples::default().sorted().percentile_ms(99.0).abs() < 1e-9);
    }
}
