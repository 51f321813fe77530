//! A small shared random source for filters (splitmix64 on an atomic
//! counter): lock-free across queue threads, reproducible with a seed.

use std::sync::atomic::{AtomicU64, Ordering};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Random numbers for every queue at once.
#[derive(Debug)]
pub struct Rng(AtomicU64);

impl Rng {
    /// A generator starting from `seed`, or from the clock and pid without one.
    pub fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            // The low bits carry the entropy; the truncation is wanted.
            #[allow(clippy::cast_possible_truncation)]
            let nanos = nanos as u64;
            nanos ^ u64::from(std::process::id()).rotate_left(32)
        });
        Rng(AtomicU64::new(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        // 53 bits: exactly representable, uniform.
        #[allow(clippy::cast_precision_loss)]
        let v = (self.next_u64() >> 11) as f64;
        v / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        p >= 1.0 || (p > 0.0 && self.unit() < p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_is_reproducible_and_spread() {
        let (a, b) = (Rng::new(Some(7)), Rng::new(Some(7)));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let r = Rng::new(Some(1));
        let n = 100_000;
        let mean = (0..n).map(|_| r.unit()).sum::<f64>() / f64::from(n);
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!(r.chance(1.0) && !r.chance(0.0));
    }
}
