//! A decision as the fleet shares it: what it is about (a source's ban, a
//! user's ban, a runtime deny or allow entry), set or lifted, until when
//! (wall-clock milliseconds, since hosts do not share a monotonic clock),
//! and which host made it. Everything read from Redis is checked like
//! operator input before it reaches a map.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wsguard_common::{Ban, SourceKey};

use crate::{
    config::parse_cidr,
    control,
    kernel::{Maps, lists, monotonic_ns},
};

/// What a decision is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A source's ban, by its tracking prefix (`protect.ipv4_prefix` or
    /// `ipv6_prefix`, which every host of the fleet must share).
    Source(IpNet),
    /// A user's ban (version 2 tickets).
    User(String),
    Deny(IpNet),
    Allow(IpNet),
}

impl Target {
    /// The key's suffix after `<key_prefix>:`.
    pub fn key(&self) -> String {
        match self {
            Target::Source(net) => format!("ban:{net}"),
            Target::User(user) => format!("user-ban:{user}"),
            Target::Deny(net) => format!("deny:{net}"),
            Target::Allow(net) => format!("allow:{net}"),
        }
    }

    /// The kind, as events and `status --fleet` name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Source(_) => "ban",
            Target::User(_) => "user_ban",
            Target::Deny(_) => "deny",
            Target::Allow(_) => "allow",
        }
    }

    /// What it applies to: a CIDR or a user id.
    pub fn subject(&self) -> String {
        match self {
            Target::Source(net) | Target::Deny(net) | Target::Allow(net) => net.to_string(),
            Target::User(user) => user.clone(),
        }
    }

    /// A source's tracking prefix (a ban's key, or a fleet load report's
    /// entry): a CIDR at this host's tracking prefix for its family.
    pub fn parse_source(cidr: &str, rules: &Rules) -> Result<Target, Rejected> {
        let net = parse_cidr(cidr).map_err(|_| Rejected::BadKey)?;
        let prefix = match net.addr() {
            IpAddr::V4(_) => rules.ipv4_prefix,
            IpAddr::V6(_) => rules.ipv6_prefix,
        };
        if net.prefix_len() != prefix {
            return Err(Rejected::PrefixMismatch);
        }
        Ok(Target::Source(net))
    }

    fn parse(key: &str, rules: &Rules) -> Result<Target, Rejected> {
        let (kind, subject) = key.split_once(':').ok_or(Rejected::BadKey)?;
        let net = || parse_cidr(subject).map_err(|_| Rejected::BadKey);
        match kind {
            "ban" => Target::parse_source(subject, rules),
            "user-ban" => crate::handshake::ticket::User::new(subject, None)
                .map(|u| Target::User(u.id))
                .map_err(|_| Rejected::BadKey),
            "deny" => Ok(Target::Deny(net()?)),
            "allow" if rules.accept_allow => Ok(Target::Allow(net()?)),
            "allow" => Err(Rejected::AllowNotAccepted),
            _ => Err(Rejected::BadKey),
        }
    }
}

/// Set until `until_ms` (0: until lifted, for list entries), or lifted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Set { until_ms: u64 },
    Lift,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub change: Change,
    /// The host that made it.
    pub host: String,
    /// When it was sent (wall clock, ms): the receivers' propagation delay.
    pub sent_ms: u64,
}

/// Why a decision read from the fleet was not applied (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejected {
    /// Not JSON of the expected shape.
    BadValue,
    /// Not `ban:`, `user-ban:`, `deny:` or `allow:` with a valid CIDR or
    /// user id.
    BadKey,
    /// A ban on a prefix other than this host's tracking prefix.
    PrefixMismatch,
    /// An expiry in the past or too far ahead, or a ban without one.
    BadTtl,
    /// An allow entry, while `fleet.accept_allow` is off.
    AllowNotAccepted,
}

impl Rejected {
    pub const ALL: [Rejected; 5] = [
        Rejected::BadValue,
        Rejected::BadKey,
        Rejected::PrefixMismatch,
        Rejected::BadTtl,
        Rejected::AllowNotAccepted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rejected::BadValue => "bad_value",
            Rejected::BadKey => "bad_key",
            Rejected::PrefixMismatch => "prefix_mismatch",
            Rejected::BadTtl => "bad_ttl",
            Rejected::AllowNotAccepted => "allow_not_accepted",
        }
    }
}

/// Longest a decision from the fleet may last: a year.
const MAX_DECISION_MS: u64 = 366 * 24 * 3600 * 1000;

/// What a host checks decisions from the fleet against.
#[derive(Clone, Debug)]
pub struct Rules {
    pub accept_allow: bool,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

/// A decision on the wire (the pub/sub channel).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub key: String,
    /// "set" or "lift".
    pub op: String,
    #[serde(default)]
    pub until_ms: u64,
    pub host: String,
    pub sent_ms: u64,
}

/// A live decision's value in Redis (its key expires with it).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub until_ms: u64,
    pub host: String,
    pub since_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A wall-clock time (ms) as CLOCK_MONOTONIC ns, the clock the maps use.
pub fn monotonic_at(wall_ms: u64) -> u64 {
    let (now_ms, now_ns) = (now_ms(), monotonic_ns());
    if wall_ms >= now_ms {
        now_ns.saturating_add((wall_ms - now_ms).saturating_mul(1_000_000))
    } else {
        now_ns.saturating_sub((now_ms - wall_ms).saturating_mul(1_000_000))
    }
}

/// A CLOCK_MONOTONIC time (ns) as wall-clock ms.
pub fn wall_at(monotonic: u64) -> u64 {
    let (now_ms, now_ns) = (now_ms(), monotonic_ns());
    if monotonic >= now_ns {
        now_ms.saturating_add((monotonic - now_ns) / 1_000_000)
    } else {
        now_ms.saturating_sub((now_ns - monotonic) / 1_000_000)
    }
}

impl Decision {
    pub fn message(&self) -> Message {
        let (op, until_ms) = match self.change {
            Change::Set { until_ms } => ("set", until_ms),
            Change::Lift => ("lift", 0),
        };
        Message {
            key: self.target.key(),
            op: op.into(),
            until_ms,
            host: self.host.clone(),
            sent_ms: self.sent_ms,
        }
    }

    /// A decision read from the pub/sub channel. `Ok(None)`: one that
    /// needs nothing (it has expired).
    pub fn from_message(text: &[u8], rules: &Rules) -> Result<Option<Decision>, Rejected> {
        let message: Message = serde_json::from_slice(text).map_err(|_| Rejected::BadValue)?;
        let change = match message.op.as_str() {
            "set" => Change::Set {
                until_ms: message.until_ms,
            },
            "lift" => Change::Lift,
            _ => return Err(Rejected::BadValue),
        };
        Decision::checked(&message.key, change, message.host, message.sent_ms, rules)
    }

    /// A live decision read back from its key (`key` without the prefix).
    pub fn from_stored(
        key: &str,
        text: &[u8],
        rules: &Rules,
    ) -> Result<Option<Decision>, Rejected> {
        let stored: Stored = serde_json::from_slice(text).map_err(|_| Rejected::BadValue)?;
        let change = Change::Set {
            until_ms: stored.until_ms,
        };
        Decision::checked(key, change, stored.host, stored.since_ms, rules)
    }

    fn checked(
        key: &str,
        change: Change,
        host: String,
        sent_ms: u64,
        rules: &Rules,
    ) -> Result<Option<Decision>, Rejected> {
        if host.is_empty() || host.len() > 64 {
            return Err(Rejected::BadValue);
        }
        let target = Target::parse(key, rules)?;
        if let Change::Set { until_ms } = change {
            let now = now_ms();
            let is_ban = matches!(target, Target::Source(_) | Target::User(_));
            if (until_ms == 0 && is_ban) || until_ms > now.saturating_add(MAX_DECISION_MS) {
                return Err(Rejected::BadTtl);
            }
            if until_ms != 0 && until_ms <= now {
                return Ok(None);
            }
        }
        Ok(Some(Decision {
            target,
            change,
            host,
            sent_ms,
        }))
    }

    /// Writes the decision into this host's maps. A ban or entry already
    /// there that lasts longer is kept (the longest wins). Whether the maps
    /// changed.
    pub fn apply(&self, maps: &mut impl Maps) -> Result<bool> {
        match (&self.target, self.change) {
            (Target::Source(net), Change::Set { until_ms }) => {
                let key = SourceKey::from(net.addr());
                let until_ns = monotonic_at(until_ms);
                if maps.ban_of(&key)?.is_some_and(|b| b.until_ns >= until_ns) {
                    return Ok(false);
                }
                maps.set_ban(
                    &key,
                    Ban {
                        since_ns: monotonic_ns(),
                        until_ns,
                    },
                )?;
                Ok(true)
            }
            (Target::Source(net), Change::Lift) => maps.remove_ban(&SourceKey::from(net.addr())),
            (Target::User(user), Change::Set { until_ms }) => {
                control::ban_user(maps, user, monotonic_at(until_ms))?;
                Ok(true)
            }
            (Target::User(user), Change::Lift) => control::lift_user_ban(maps, user),
            (Target::Deny(net) | Target::Allow(net), Change::Set { until_ms }) => {
                let allow = matches!(self.target, Target::Allow(_));
                let expires = if until_ms == 0 {
                    0
                } else {
                    monotonic_at(until_ms)
                };
                maps.with_list(allow, |list| lists::extend_runtime(list, net, expires))
            }
            (Target::Deny(net) | Target::Allow(net), Change::Lift) => {
                let allow = matches!(self.target, Target::Allow(_));
                // Not there (never applied, or the config's own): nothing to lift.
                Ok(maps
                    .with_list(allow, |list| lists::remove_runtime(list, net))
                    .is_ok())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            accept_allow: false,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }

    fn message(key: &str, op: &str, until_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&Message {
            key: key.into(),
            op: op.into(),
            until_ms,
            host: "web-2".into(),
            sent_ms: 1,
        })
        .unwrap()
    }

    #[test]
    fn decisions_round_trip_through_their_message() {
        let soon = now_ms() + 60_000;
        for (target, change) in [
            (
                Target::Source("198.18.0.7/32".parse().unwrap()),
                Change::Set { until_ms: soon },
            ),
            (
                Target::Source("2001:db8:1:2::/64".parse().unwrap()),
                Change::Lift,
            ),
            (
                Target::User("alice@example".into()),
                Change::Set { until_ms: soon },
            ),
            (
                Target::Deny("198.18.4.0/24".parse().unwrap()),
                Change::Set { until_ms: 0 },
            ),
        ] {
            let decision = Decision {
                target,
                change,
                host: "web-1".into(),
                sent_ms: 5,
            };
            let text = serde_json::to_vec(&decision.message()).unwrap();
            assert_eq!(Decision::from_message(&text, &rules()), Ok(Some(decision)));
        }
    }

    #[test]
    fn what_the_fleet_sends_is_checked_like_operator_input() {
        let soon = now_ms() + 60_000;
        let rules = rules();
        let check = |key: &str, op: &str, until: u64| {
            Decision::from_message(&message(key, op, until), &rules).map(|d| d.is_some())
        };
        assert_eq!(check("ban:198.18.0.7/32", "set", soon), Ok(true));
        assert_eq!(
            check("ban:198.18.0.7/24", "set", soon),
            Err(Rejected::BadKey),
            "host bits"
        );
        assert_eq!(
            check("ban:198.18.0.0/24", "set", soon),
            Err(Rejected::PrefixMismatch)
        );
        assert_eq!(
            check("ban:not-an-address/32", "set", soon),
            Err(Rejected::BadKey)
        );
        assert_eq!(
            check("ban:198.18.0.7/32", "set", 0),
            Err(Rejected::BadTtl),
            "forever"
        );
        assert_eq!(
            check("ban:198.18.0.7/32", "set", soon + 2 * MAX_DECISION_MS),
            Err(Rejected::BadTtl)
        );
        assert_eq!(
            check("ban:198.18.0.7/32", "set", 1),
            Ok(false),
            "expired: nothing to do"
        );
        assert_eq!(check("user-ban:", "set", soon), Err(Rejected::BadKey));
        assert_eq!(
            check("user-ban:bell\u{7}", "set", soon),
            Err(Rejected::BadKey),
            "a control character"
        );
        assert_eq!(
            check("allow:198.18.0.0/24", "set", 0),
            Err(Rejected::AllowNotAccepted)
        );
        assert_eq!(check("deny:198.18.0.0/24", "set", 0), Ok(true));
        assert_eq!(check("drop-table:x", "set", soon), Err(Rejected::BadKey));
        assert_eq!(
            check("deny:198.18.0.0/24", "explode", 0),
            Err(Rejected::BadValue)
        );
        assert_eq!(
            Decision::from_message(b"{\"key\": 1}", &rules),
            Err(Rejected::BadValue)
        );
        let accepting = Rules {
            accept_allow: true,
            ..rules
        };
        assert!(matches!(
            Decision::from_message(&message("allow:198.18.0.0/24", "set", 0), &accepting),
            Ok(Some(_))
        ));
    }

    #[test]
    fn wall_and_monotonic_times_convert_both_ways() {
        let in_a_minute = now_ms() + 60_000;
        let back = wall_at(monotonic_at(in_a_minute));
        assert!(back.abs_diff(in_a_minute) <= 2, "{back} vs {in_a_minute}");
    }
}
