//! Values with units in the config: sizes, durations and rates.
//!
//! Only unambiguous units are accepted, and errors name the ones that are:
//! `10M` could mean 10,000,000 or 10,485,760 bytes, and `1M` could mean a
//! minute or a month, so both are refused with the spellings that work.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, de};

const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1_000),
    ("kB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];
const SIZE_HINT: &str =
    "use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)";

const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];
const DURATION_HINT: &str = "use ms, s, m (minutes), h or d, e.g. \"10s\" or \"5m\"";

/// The period of a rate: per second or per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Second,
    Minute,
}

impl Period {
    pub fn nanos(self) -> u64 {
        match self {
            Period::Second => 1_000_000_000,
            Period::Minute => 60_000_000_000,
        }
    }

    fn parse(s: &str) -> Result<Period, String> {
        match s {
            "s" | "sec" | "second" => Ok(Period::Second),
            "m" | "min" | "minute" => Ok(Period::Minute),
            other => Err(format!(
                "unknown rate period \"/{other}\": use \"/s\" or \"/m\""
            )),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Period::Second => "s",
            Period::Minute => "m",
        }
    }
}

/// Splits "123abc" into (123, "abc"), refusing signs, fractions and empty numbers.
fn split_number(s: &str) -> Result<(u64, &str), String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(format!("\"{s}\" does not start with a whole number"));
    }
    let rest = s[digits..].trim_start();
    if rest.starts_with('.') || rest.starts_with(',') {
        return Err(format!(
            "\"{s}\": only whole numbers are accepted; use a smaller unit instead of a fraction"
        ));
    }
    let n = s[..digits]
        .parse::<u64>()
        .map_err(|_| format!("\"{s}\": number too large"))?;
    Ok((n, rest))
}

/// A number of bytes, such as "4MiB" or "64KB" (or a bare TOML integer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let (n, unit) = split_number(s)?;
        if unit.is_empty() {
            return Err(format!("\"{s}\" has no unit; {SIZE_HINT}"));
        }
        let Some(&(_, factor)) = SIZE_UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(format!(
                "unknown or ambiguous size unit \"{unit}\" in \"{s}\"; {SIZE_HINT}"
            ));
        };
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("\"{s}\" is too large"))
    }
}

impl fmt::Display for ByteSize {
    /// In the unit, binary or decimal, that writes the value exactly with
    /// the fewest digits ("4MiB", "12500MB", "1TB").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (number, unit) = SIZE_UNITS
            .iter()
            .filter(|(_, factor)| self.0 >= *factor && self.0.is_multiple_of(*factor))
            .map(|(unit, factor)| (self.0 / factor, *unit))
            .min_by_key(|(number, unit)| (*number, !unit.ends_with("iB")))
            .unwrap_or((self.0, "B"));
        write!(f, "{number}{unit}")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom(format!("expected a size such as \"4MiB\"; {SIZE_HINT}"))
        })? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// A duration such as "10s" or "5m".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<HumanDuration, String> {
        let (n, unit) = split_number(s)?;
        if unit.is_empty() {
            return Err(format!("\"{s}\" has no unit; {DURATION_HINT}"));
        }
        let Some(&(_, factor)) = DURATION_UNITS.iter().find(|(u, _)| *u == unit) else {
            let hint = if unit == "M" {
                " (\"M\" could mean minutes or months)"
            } else {
                ""
            };
            return Err(format!(
                "unknown duration unit \"{unit}\" in \"{s}\"{hint}; {DURATION_HINT}"
            ));
        };
        let nanos = n
            .checked_mul(factor)
            .ok_or_else(|| format!("\"{s}\" is too long"))?;
        Ok(HumanDuration(Duration::from_nanos(nanos)))
    }

    pub fn nanos(&self) -> u64 {
        self.0.as_nanos() as u64
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.nanos();
        for (unit, factor) in [
            ("d", 86_400_000_000_000u64),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
        ] {
            if ns >= factor && ns.is_multiple_of(factor) {
                return write!(f, "{}{unit}", ns / factor);
            }
        }
        write!(f, "{}ms", ns / 1_000_000)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom(format!("expected a duration string; {DURATION_HINT}"))
        })?;
        HumanDuration::parse(&s).map_err(de::Error::custom)
    }
}

/// What a rate counts: connections ([`Count`]) or bytes ([`ByteSize`]).
pub trait Quantity: Copy + fmt::Display {
    /// An example rate, for error messages.
    const EXAMPLE: &'static str;
    fn parse(s: &str) -> Result<Self, String>;
    fn amount(&self) -> u64;
}

/// A plain number of events, such as connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u64);

impl Quantity for Count {
    const EXAMPLE: &'static str = "20/s";
    fn parse(s: &str) -> Result<Count, String> {
        let (n, rest) = split_number(s)?;
        if !rest.is_empty() {
            return Err(format!(
                "\"{s}\": a connection rate is a plain count, such as \"20/s\""
            ));
        }
        Ok(Count(n))
    }
    fn amount(&self) -> u64 {
        self.0
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Quantity for ByteSize {
    const EXAMPLE: &'static str = "1MiB/s";
    fn parse(s: &str) -> Result<ByteSize, String> {
        ByteSize::parse(s)
    }
    fn amount(&self) -> u64 {
        self.0
    }
}

/// A rate such as "20/s", "600/m" or "1MiB/s", or "unlimited".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate<Q> {
    Unlimited,
    Per { amount: Q, period: Period },
}

/// New connections per period.
pub type ConnectionRate = Rate<Count>;
/// Bytes per period.
pub type ByteRate = Rate<ByteSize>;

impl<Q: Quantity> Rate<Q> {
    pub fn parse(s: &str) -> Result<Rate<Q>, String> {
        if s.trim() == "unlimited" {
            return Ok(Rate::Unlimited);
        }
        let Some((amount, period)) = s.split_once('/') else {
            return Err(format!(
                "\"{s}\" is not a rate: write \"{}\", use \"/m\" for per minute, or \"unlimited\"",
                Q::EXAMPLE
            ));
        };
        let amount = Q::parse(amount)?;
        if amount.amount() == 0 {
            return Err(format!(
                "\"{s}\": a rate of zero would drop everything; use the deny list for that"
            ));
        }
        Ok(Rate::Per {
            amount,
            period: Period::parse(period.trim())?,
        })
    }

    /// The amount per second, rounded up, for burst sanity checks.
    pub fn per_second_ceil(&self) -> Option<u64> {
        match *self {
            Rate::Unlimited => None,
            Rate::Per {
                amount,
                period: Period::Second,
            } => Some(amount.amount()),
            Rate::Per {
                amount,
                period: Period::Minute,
            } => Some(amount.amount().div_ceil(60)),
        }
    }
}

impl<Q: Quantity> fmt::Display for Rate<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Unlimited => f.write_str("unlimited"),
            Rate::Per { amount, period } => write!(f, "{amount}/{}", period.suffix()),
        }
    }
}

impl<'de, Q: Quantity> Deserialize<'de> for Rate<Q> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            de::Error::custom(format!("expected a rate string such as \"{}\"", Q::EXAMPLE))
        })?;
        Rate::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("4MiB").unwrap().0, 4 << 20);
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("1500B").unwrap().0, 1500);
        assert!(ByteSize::parse("10M").unwrap_err().contains("ambiguous"));
        assert!(ByteSize::parse("10").unwrap_err().contains("no unit"));
        assert!(
            ByteSize::parse("1.5MiB")
                .unwrap_err()
                .contains("whole numbers")
        );
        assert!(ByteSize::parse("-1MiB").is_err());
        assert_eq!(ByteSize(4 << 20).to_string(), "4MiB");
    }

    #[test]
    fn durations() {
        assert_eq!(
            HumanDuration::parse("5m").unwrap().0,
            Duration::from_secs(300)
        );
        assert_eq!(
            HumanDuration::parse("10s").unwrap().0,
            Duration::from_secs(10)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert!(HumanDuration::parse("1M").unwrap_err().contains("months"));
        assert!(HumanDuration::parse("10").unwrap_err().contains("no unit"));
        assert_eq!(HumanDuration::parse("300s").unwrap().to_string(), "5m");
    }

    #[test]
    fn rates() {
        assert_eq!(
            ConnectionRate::parse("20/s").unwrap(),
            Rate::Per {
                amount: Count(20),
                period: Period::Second
            }
        );
        assert_eq!(
            ConnectionRate::parse("600/m").unwrap(),
            Rate::Per {
                amount: Count(600),
                period: Period::Minute
            }
        );
        assert_eq!(ConnectionRate::parse("unlimited").unwrap(), Rate::Unlimited);
        assert!(ConnectionRate::parse("20").is_err());
        assert!(ConnectionRate::parse("20/h").unwrap_err().contains("/s"));
        assert!(ConnectionRate::parse("0/s").is_err());
        assert!(
            ConnectionRate::parse("2MiB/s")
                .unwrap_err()
                .contains("plain count")
        );
        assert_eq!(
            ByteRate::parse("1MiB/s").unwrap().per_second_ceil(),
            Some(1 << 20)
        );
        assert!(ByteRate::parse("1M/s").unwrap_err().contains("ambiguous"));
    }
}
