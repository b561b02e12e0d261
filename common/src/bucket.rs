//! Token buckets in integer arithmetic that the BPF verifier accepts (no
//! division, no floating point, no unbounded loops).
//!
//! A rate is "`count` tokens per `period_ns`" (per second or per minute). One
//! token costs `unit = period_ns` scaled units and `refill_per_ns = count`
//! scaled units arrive each nanosecond, so any whole-number rate per second or
//! per minute is exact. User space precomputes the parameters; the kernel only
//! multiplies, adds and compares.

use crate::assert_size;

/// Precomputed parameters of one bucket. `capacity == 0` means unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketParams {
    /// Scaled units one token costs.
    pub unit: u64,
    /// Scaled units added per nanosecond.
    pub refill_per_ns: u64,
    /// Bucket size in scaled units (burst × unit).
    pub capacity: u64,
    /// Nanoseconds to refill an empty bucket; elapsed time is clamped to it so
    /// that `elapsed × refill_per_ns` cannot overflow.
    pub fill_ns: u64,
}
assert_size!(BucketParams, 32);

/// Largest scaled capacity we accept, leaving headroom so that
/// `tokens + elapsed × refill` stays below `u64::MAX`.
pub const MAX_SCALED_CAPACITY: u64 = 1 << 62;

impl BucketParams {
    pub const UNLIMITED: BucketParams = BucketParams {
        unit: 0,
        refill_per_ns: 0,
        capacity: 0,
        fill_ns: 0,
    };

    /// Parameters for `count` tokens per `period_ns`, holding at most `burst`
    /// tokens. Returns `None` when the numbers are zero or would overflow the
    /// kernel's arithmetic.
    pub fn new(count: u64, period_ns: u64, burst: u64) -> Option<BucketParams> {
        if count == 0 || period_ns == 0 || burst == 0 {
            return None;
        }
        let capacity = burst.checked_mul(period_ns)?;
        if capacity > MAX_SCALED_CAPACITY {
            return None;
        }
        let fill_ns = capacity.div_ceil(count);
        // Refilling for fill_ns must itself stay in range.
        if fill_ns.checked_mul(count)? > MAX_SCALED_CAPACITY + count {
            return None;
        }
        Some(BucketParams {
            unit: period_ns,
            refill_per_ns: count,
            capacity,
            fill_ns,
        })
    }

    pub fn is_unlimited(&self) -> bool {
        self.capacity == 0
    }

    /// Whole tokens the bucket holds when full.
    pub fn burst(&self) -> u64 {
        self.capacity.checked_div(self.unit).unwrap_or(0)
    }
}

/// State of one bucket. A zeroed bucket (`last_ns == 0`) is treated as full,
/// so a new map entry starts with its whole burst.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Scaled units available at `last_ns`.
    pub tokens: u64,
    /// Last time the bucket was refilled (CLOCK_MONOTONIC ns); 0 = never.
    pub last_ns: u64,
}
assert_size!(TokenBucket, 16);

impl TokenBucket {
    /// Refills the bucket up to `now_ns` and takes `cost` tokens if it holds
    /// them. Returns whether the tokens were taken. An unlimited bucket always
    /// grants. Time that runs backwards (another CPU raced us) refills nothing.
    #[inline(always)]
    pub fn take(&mut self, params: &BucketParams, now_ns: u64, cost: u64) -> bool {
        if params.capacity == 0 {
            return true;
        }
        let available = if self.last_ns == 0 {
            params.capacity
        } else {
            let mut elapsed = now_ns.saturating_sub(self.last_ns);
            if elapsed > params.fill_ns {
                elapsed = params.fill_ns;
            }
            // elapsed ≤ fill_ns, so the product stays within capacity plus one
            // refill step (checked by BucketParams::new): no overflow, and no
            // 128-bit multiply, which BPF does not have.
            let refilled = self
                .tokens
                .saturating_add(elapsed.wrapping_mul(params.refill_per_ns));
            if refilled > params.capacity {
                params.capacity
            } else {
                refilled
            }
        };
        if now_ns > self.last_ns {
            self.last_ns = now_ns;
        }
        // cost is a packet length (< 2^17) or 1, unit ≤ 60e9 ns: no overflow.
        let need = cost.wrapping_mul(params.unit);
        if available >= need {
            self.tokens = available - need;
            true
        } else {
            self.tokens = available;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let p = BucketParams::new(10, SEC, 20).unwrap();
        let mut b = TokenBucket::default();
        let now = 5 * SEC;
        let granted = (0..30).filter(|_| b.take(&p, now, 1)).count();
        assert_eq!(granted, 20);
        // Half a second later, five more tokens.
        let granted = (0..30).filter(|_| b.take(&p, now + SEC / 2, 1)).count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn per_minute_rates_are_exact() {
        let p = BucketParams::new(20, 60 * SEC, 1).unwrap();
        let mut b = TokenBucket::default();
        assert!(b.take(&p, SEC, 1));
        assert!(!b.take(&p, SEC + 2 * SEC, 1), "one token every 3 s");
        assert!(b.take(&p, SEC + 3 * SEC, 1));
    }

    #[test]
    fn rejects_overflowing_parameters() {
        assert!(BucketParams::new(1, SEC, u64::MAX / 2).is_none());
        assert!(BucketParams::new(0, SEC, 1).is_none());
        assert!(BucketParams::new(1 << 40, SEC, 4 << 30).is_some());
        assert!(BucketParams::new(1 << 40, SEC, 5 << 30).is_none());
    }

    #[test]
    fn long_idle_does_not_overflow() {
        let p = BucketParams::new(1 << 40, SEC, 4 << 30).unwrap();
        let mut b = TokenBucket::default();
        assert!(b.take(&p, 1, 1500));
        assert!(b.take(&p, u64::MAX - 1, 1500));
        assert!(b.tokens <= p.capacity);
    }
}
