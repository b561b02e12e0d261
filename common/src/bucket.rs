//! Token buckets in integer arithmetic that the BPF verifier accepts (no
//! division, no floating point, no unbounded loops).
//!
//! A rate is "`count` tokens per `period_ns`" (per second or per minute). One
//! token costs `unit` scaled units and `refill_per_ns` scaled units arrive
//! each nanosecond, with `refill_per_ns / unit = count / period_ns`: both are
//! the rate's fraction in lowest terms, so any whole-number rate per second
//! or per minute is exact. Only when a burst times that unit would not fit
//! the 64-bit arithmetic (a byte burst of many GiB with a rate that shares
//! few factors with 10^9) is the unit made smaller and the refill rounded,
//! which moves the rate by less than one part in a million. User space
//! precomputes the parameters; the kernel only multiplies, adds and
//! compares, all in 64 bits.

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

/// A rounded refill is at least this, so rounding it moves the rate by
/// less than one part in a million (half a unit in 2^20).
const MIN_ROUNDED_REFILL: u128 = 1 << 20;

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

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
        let common = gcd(count, period_ns);
        let (mut unit, mut refill_per_ns) = (period_ns / common, count / common);
        if burst.checked_mul(unit)? > MAX_SCALED_CAPACITY {
            // The largest unit the burst allows, and the refill rounded to
            // it; refused where rounding would move the rate by a millionth
            // or more.
            unit = MAX_SCALED_CAPACITY / burst;
            let exact = u128::from(count) * u128::from(unit);
            let rounded = (exact + u128::from(period_ns) / 2) / u128::from(period_ns);
            if unit == 0 || rounded < MIN_ROUNDED_REFILL {
                return None;
            }
            refill_per_ns = u64::try_from(rounded).ok()?;
        }
        let capacity = burst.checked_mul(unit)?;
        let fill_ns = capacity.div_ceil(refill_per_ns);
        // Refilling for fill_ns must itself stay in range.
        if fill_ns.checked_mul(refill_per_ns)? > MAX_SCALED_CAPACITY + refill_per_ns {
            return None;
        }
        Some(BucketParams {
            unit,
            refill_per_ns,
            capacity,
            fill_ns,
        })
    }

    /// The share (scaled units) each of `cpus` CPUs takes from a bucket
    /// shared by all of them at a time: a quarter of the burst spread over
    /// the CPUs, so that the shares CPUs hold unspent are at most a quarter
    /// of the burst. 0 (each packet takes exactly what it needs) when that
    /// is less than one token: a bucket that small is not busy enough for
    /// the CPUs to contend for it.
    pub fn share(&self, cpus: u32) -> u64 {
        let share = self.capacity / (4 * u64::from(cpus.max(1)));
        if share < self.unit { 0 } else { share }
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
        let available = self.refill(params, now_ns);
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

    /// Refills the bucket up to `now_ns` and takes up to `scaled` units
    /// (not whole tokens): what it took. For a bucket shared by all CPUs,
    /// from which each CPU takes a share at a time.
    #[inline(always)]
    pub fn take_up_to(&mut self, params: &BucketParams, now_ns: u64, scaled: u64) -> u64 {
        let available = self.refill(params, now_ns);
        let taken = if available < scaled {
            available
        } else {
            scaled
        };
        self.tokens = available - taken;
        taken
    }

    /// The scaled units the bucket would hold at `now_ns` (changing nothing).
    pub fn level(&self, params: &BucketParams, now_ns: u64) -> u64 {
        let mut copy = *self;
        copy.refill(params, now_ns)
    }

    /// The scaled units the bucket holds at `now_ns`; moves `last_ns` on.
    #[inline(always)]
    fn refill(&mut self, params: &BucketParams, now_ns: u64) -> u64 {
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
        available
    }
}

/// A bucket shared by every CPU, taken from a share at a time: each CPU
/// spends its own share (a per-CPU value, so no cache line bounces between
/// CPUs), and only when it runs out takes the next share from the shared
/// bucket. `share` is the CPU's unspent scaled units; `chunk` the size of
/// a share (see [`BucketParams::share`]).
#[inline(always)]
pub fn take_shared(
    share: &mut u64,
    shared: &mut TokenBucket,
    params: &BucketParams,
    chunk: u64,
    now_ns: u64,
    cost: u64,
) -> bool {
    if params.capacity == 0 {
        return true;
    }
    let need = cost.wrapping_mul(params.unit);
    if *share < need {
        // What this packet lacks, and a share for the next ones.
        *share += shared.take_up_to(params, now_ns, need - *share + chunk);
    }
    if *share >= need {
        *share -= need;
        true
    } else {
        false
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
        // A tiny rate with a huge burst cannot be rounded to a millionth.
        assert!(BucketParams::new(3, SEC, 1 << 40).is_none());
    }

    #[test]
    fn rates_of_100_gbit_hosts_fit_with_their_default_bursts() {
        const GIB: u64 = 1 << 30;
        for (rate, burst) in [
            (10 * GIB, 10 * GIB),
            (12_500_000_000, 12_500_000_000),
            (100 * GIB, 100 * GIB),
            // Shares no factor with 10^9: the rounded unit.
            (10_000_000_001, 10_000_000_001),
        ] {
            let p = BucketParams::new(rate, SEC, burst).expect("fits");
            let per_second = p.refill_per_ns as f64 * 1e9 / p.unit as f64;
            let error = (per_second - rate as f64).abs() / rate as f64;
            assert!(error < 1e-6, "{rate}/s: off by {error}");
            assert_eq!(p.burst(), burst, "{rate}/s keeps its burst");
            // A second of full-size frames: exactly the rate (±1 frame).
            let mut b = TokenBucket::default();
            let frame = 1500;
            let start = SEC;
            let mut granted = 0u64;
            while b.take(&p, start, frame) {
                granted += frame;
            }
            assert!(granted + frame > burst && granted <= burst);
            let mut later = 0u64;
            for ms in 1..=1000u64 {
                while b.take(&p, start + ms * 1_000_000, frame) {
                    later += frame;
                }
            }
            let want = rate as f64;
            assert!(
                (later as f64 - want).abs() <= want * 1e-6 + 2.0 * frame as f64,
                "{rate}/s: {later} bytes in the second after the burst"
            );
        }
    }

    #[test]
    fn shares_hand_out_exactly_the_shared_burst() {
        let p = BucketParams::new(10, SEC, 100).unwrap();
        let chunk = 7 * p.unit;
        let mut shared = TokenBucket::default();
        let mut shares = [0u64; 3];
        // Three CPUs in turn, no time passing: exactly the burst, in total.
        let granted = (0..300)
            .filter(|i| take_shared(&mut shares[i % 3], &mut shared, &p, chunk, SEC, 1))
            .count();
        assert_eq!(granted, 100);
        assert_eq!(shared.tokens, 0);
        assert!(shares.iter().all(|s| *s < p.unit));
        // A second later, ten more tokens, wherever they are asked for.
        let granted = (0..30)
            .filter(|i| take_shared(&mut shares[i % 3], &mut shared, &p, chunk, 2 * SEC, 1))
            .count();
        assert_eq!(granted, 10);
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
