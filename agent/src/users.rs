//! Users named by version 2 tickets: who is connected, their budgets at the
//! handshake (concurrent and new connections, judged here), their entries
//! in the kernel's user map (whose byte budget the XDP program enforces),
//! and the cut of a user who stays over budget too long.
//!
//! The kernel's maps are the truth about bytes and bans (the CLI writes
//! bans there too); this registry is the truth about which connection
//! belongs to whom, rebuilt from the kernel's maps when the agent starts.

use std::{collections::HashMap, time::Duration};

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};
use wsguard_common::{
    StreamPeers, TokenBucket, UserKey, UserState,
    maps::{USER_CLASS_BYTES, USER_ID_BYTES},
};

use crate::{
    config::UserPolicy,
    handshake::{
        Rejection,
        streams::{Peers, peers_of, stream_peers},
        ticket::User,
    },
    kernel::{Maps, monotonic_ns},
};

/// A user's key in the kernel's map (see `wsguard_common::UserKey`).
pub fn user_key(id: &str) -> UserKey {
    let digest = Sha256::new()
        .chain_update(b"wsguard-user\0")
        .chain_update(id.as_bytes())
        .finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// A new kernel entry for a user of class index `class` (named `class_name`).
pub fn new_state(id: &str, class: u32, class_name: Option<&str>) -> UserState {
    let mut state = UserState {
        class,
        id_len: id.len().min(USER_ID_BYTES) as u32,
        ..UserState::default()
    };
    state.id[..state.id_len as usize].copy_from_slice(&id.as_bytes()[..state.id_len as usize]);
    if let Some(name) = class_name {
        state.class_len = name.len().min(USER_CLASS_BYTES) as u32;
        state.class_name[..state.class_len as usize]
            .copy_from_slice(&name.as_bytes()[..state.class_len as usize]);
    }
    state
}

/// The user id a kernel entry holds.
pub fn id_of(state: &UserState) -> String {
    let len = (state.id_len as usize).min(USER_ID_BYTES);
    String::from_utf8_lossy(&state.id[..len]).into_owned()
}

/// The class name a kernel entry holds, if any.
pub fn class_of(state: &UserState) -> Option<String> {
    let len = (state.class_len as usize).min(USER_CLASS_BYTES);
    (len > 0).then(|| String::from_utf8_lossy(&state.class_name[..len]).into_owned())
}

/// How long a user with no connection and a full bucket is kept (so that
/// reconnecting does not refill a bucket it just emptied).
const IDLE_LINGER: Duration = Duration::from_secs(60);

struct Entry {
    id: String,
    class: Option<String>,
    /// Its open connections, by socket cookie.
    connections: HashMap<u64, Peers>,
    /// New connections at the handshake (CLOCK_MONOTONIC ns).
    new_connections: TokenBucket,
    /// When it last had a connection open or opened one (monotonic ns).
    last_active_ns: u64,
}

impl Entry {
    fn new(id: String, class: Option<String>, now_ns: u64) -> Entry {
        Entry {
            id,
            class,
            connections: HashMap::new(),
            new_connections: TokenBucket::default(),
            last_active_ns: now_ns,
        }
    }
}

/// A user whose connections are to be cut, with why.
pub struct Cut {
    pub user: String,
    pub class: Option<String>,
    pub connections: Vec<(u64, Peers)>,
    /// How long it stayed over budget (zero for a ban).
    pub over_budget: Duration,
    /// The user is banned (by the CLI, or by `ban.users` now).
    pub banned: bool,
}

#[derive(Default)]
pub struct Users {
    entries: HashMap<UserKey, Entry>,
    by_cookie: HashMap<u64, UserKey>,
}

impl Users {
    /// The registry as an earlier agent left it in the kernel's maps:
    /// every bound connection that is still open, and its user.
    pub fn rebuild(kernel: &mut impl Maps) -> Result<Users> {
        let mut users = Users::default();
        let mut flows: HashMap<StreamPeers, UserKey> = kernel.user_flows()?.into_iter().collect();
        let now = monotonic_ns();
        for (cookie, stream) in kernel.streams()? {
            let Some(key) = flows.remove(&stream.peers) else {
                continue;
            };
            let Some(state) = kernel.user(key) else {
                kernel.unbind_user_flow(&stream.peers);
                continue;
            };
            let entry = users
                .entries
                .entry(key)
                .or_insert_with(|| Entry::new(id_of(&state), class_of(&state), now));
            entry.connections.insert(cookie, peers_of(&stream.peers));
            users.by_cookie.insert(cookie, key);
        }
        // Bindings of connections that closed while no program saw them
        // close: a later connection on the same ports must not inherit them.
        for peers in flows.keys() {
            kernel.unbind_user_flow(peers);
        }
        Ok(users)
    }

    /// After a reload: each connected user's class index as the new config
    /// numbers its classes (the byte budgets themselves are in the kernel's
    /// table, rewritten by the reload).
    pub fn reclassify(&mut self, kernel: &mut impl Maps, policy: &UserPolicy) {
        for (&key, entry) in &self.entries {
            let (class, _) = policy.limits(entry.class.as_deref());
            if kernel.user(key).is_some_and(|s| s.class != class) {
                let _ = kernel.update_user(key, |s| s.class = class);
            }
        }
    }

    /// Users known to have a connection open.
    pub fn connected(&self) -> usize {
        self.entries
            .values()
            .filter(|e| !e.connections.is_empty())
            .count()
    }

    /// Admits an accepted upgrade for `user`, or says why not: a ban, too
    /// many connections open or opened, or no room for the user in the
    /// kernel (fail closed: a connection that cannot be held to its budget
    /// is not served). On success the connection is bound to the user.
    pub fn admit(
        &mut self,
        kernel: &mut impl Maps,
        policy: &UserPolicy,
        user: &User,
        cookie: u64,
        peers: Peers,
    ) -> Result<(), Rejection> {
        let key = user_key(&user.id);
        let now = monotonic_ns();
        let (class, limits) = policy.limits(user.class.as_deref());
        let existing = kernel.user(key);
        if let Some(state) = &existing {
            if id_of(state) != user.id {
                // Two ids with one key: the first keeps it.
                return Err(Rejection::UserTableFull);
            }
            if state.is_banned(now) {
                return Err(Rejection::UserBanned);
            }
        }
        let entry = self
            .entries
            .entry(key)
            .or_insert_with(|| Entry::new(user.id.clone(), user.class.clone(), now));
        entry.class = user.class.clone();
        if limits.concurrent_connections != 0
            && entry.connections.len() >= limits.concurrent_connections as usize
        {
            // A close record may have been lost: count what is still open.
            let by_cookie = &mut self.by_cookie;
            entry.connections.retain(|cookie, _| {
                let open = kernel.stream(*cookie).is_some();
                if !open {
                    by_cookie.remove(cookie);
                }
                open
            });
            if entry.connections.len() >= limits.concurrent_connections as usize {
                return Err(Rejection::UserConcurrency);
            }
        }
        if !entry.new_connections.take(&limits.new_connections, now, 1) {
            return Err(Rejection::UserConnectionRate);
        }
        entry.last_active_ns = now;
        let bound = match existing {
            Some(state) if state.class == class => Ok(()),
            Some(_) => kernel.update_user(key, |s| s.class = class).map(|_| ()),
            None => self.create(
                kernel,
                key,
                new_state(&user.id, class, user.class.as_deref()),
            ),
        };
        let bound = bound.and_then(|()| kernel.bind_user_flow(&stream_peers(peers), key));
        if bound.is_err() {
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.connections.is_empty())
            {
                self.entries.remove(&key);
            }
            return Err(Rejection::UserTableFull);
        }
        let entry = self.entries.get_mut(&key).expect("entered above");
        entry.connections.insert(cookie, peers);
        self.by_cookie.insert(cookie, key);
        Ok(())
    }

    /// Creates a user's kernel entry, making room by forgetting idle users
    /// when the map is full.
    fn create(&mut self, kernel: &mut impl Maps, key: UserKey, state: UserState) -> Result<()> {
        if kernel.set_user(key, state, true).is_ok() {
            return Ok(());
        }
        if kernel.user(key).is_some() {
            return Ok(());
        }
        if self.forget_idle(kernel, Duration::ZERO)? == 0 {
            bail!("the user map is full");
        }
        kernel.set_user(key, state, true)
    }

    /// A connection closed (the kernel unbound it).
    pub fn closed(&mut self, cookie: u64) {
        let Some(key) = self.by_cookie.remove(&cookie) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.connections.remove(&cookie);
            entry.last_active_ns = monotonic_ns();
        }
    }

    /// Whether to cut user `key` now: connected, and over budget for longer
    /// than its class allows (then banned for `ban_duration` with
    /// `ban.users`), or banned. On a cut its connections leave the registry
    /// and its spell over budget starts again; in dry run nothing changes
    /// and the kernel tells of the spell only once.
    pub fn judge(
        &mut self,
        kernel: &mut impl Maps,
        key: UserKey,
        policy: &UserPolicy,
        ban_duration: Duration,
        dry_run: bool,
    ) -> Option<Cut> {
        let now = monotonic_ns();
        let entry = self.entries.get_mut(&key)?;
        let state = kernel.user(key)?;
        let banned = state.is_banned(now);
        let (_, limits) = policy.limits(entry.class.as_deref());
        let over = Duration::from_nanos(state.over_budget_ns(&limits.bytes, now));
        if entry.connections.is_empty() || (!banned && over < limits.over_budget_timeout) {
            // Nothing to cut now (a longer timeout since a reload, say):
            // the sweep looks again.
            return None;
        }
        entry.last_active_ns = now;
        let ban = !banned && policy.ban_users;
        let connections: Vec<(u64, Peers)> = if dry_run {
            entry.connections.iter().map(|(c, p)| (*c, *p)).collect()
        } else {
            let _ = kernel.update_user(key, |s| {
                s.over_since_ns = 0;
                s.signalled = 0;
                if ban {
                    s.banned_until_ns = now + ban_duration.as_nanos() as u64;
                }
            });
            for cookie in entry.connections.keys() {
                self.by_cookie.remove(cookie);
            }
            entry.connections.drain().collect()
        };
        Some(Cut {
            user: entry.id.clone(),
            class: entry.class.clone(),
            connections,
            over_budget: if banned { Duration::ZERO } else { over },
            banned: banned || ban,
        })
    }

    /// Every connected user judged (for records the kernel could not hand
    /// over, and banned users whose connections stay silent).
    pub fn sweep(
        &mut self,
        kernel: &mut impl Maps,
        policy: &UserPolicy,
        ban_duration: Duration,
        dry_run: bool,
    ) -> Vec<Cut> {
        let connected: Vec<UserKey> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.connections.is_empty())
            .map(|(k, _)| *k)
            .collect();
        connected
            .into_iter()
            .filter_map(|key| {
                let state = kernel.user(key)?;
                // In dry run, a spell already reported stays reported.
                if dry_run && state.signalled != 0 {
                    return None;
                }
                self.judge(kernel, key, policy, ban_duration, dry_run)
            })
            .collect()
    }

    /// Forgets users idle for `linger` with nothing to remember (no
    /// connection, no ban, no charge or drop within `linger`), in the
    /// registry and the kernel; how many.
    pub fn forget_idle(&mut self, kernel: &mut impl Maps, linger: Duration) -> Result<usize> {
        let now = monotonic_ns();
        let linger = linger.as_nanos() as u64;
        let mut forgotten = 0;
        for (key, state) in kernel.users()? {
            let entry = self.entries.get(&key);
            if entry.is_some_and(|e| !e.connections.is_empty()) || state.is_banned(now) {
                continue;
            }
            let last_active = entry
                .map_or(0, |e| e.last_active_ns)
                .max(state.last_drop_ns)
                .max(state.bytes.last_ns);
            if now.saturating_sub(last_active) < linger {
                continue;
            }
            if kernel.remove_user(key)? {
                forgotten += 1;
            }
            self.entries.remove(&key);
        }
        Ok(forgotten)
    }

    /// Housekeeping: forget idle users.
    pub fn housekeeping(&mut self, kernel: &mut impl Maps) -> Result<usize> {
        self.forget_idle(kernel, IDLE_LINGER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_are_stable_and_distinct() {
        assert_eq!(user_key("alice"), user_key("alice"));
        assert_ne!(user_key("alice"), user_key("bob"));
        // Pinned: the key is part of the map layout an agent reads back.
        let digest = Sha256::digest(b"wsguard-user\0alice");
        assert_eq!(
            user_key("alice"),
            u64::from_le_bytes(digest[..8].try_into().unwrap())
        );
    }

    #[test]
    fn an_entry_holds_the_id_and_class_it_was_made_with() {
        let state = new_state("user-ü-1", 3, Some("pro"));
        assert_eq!(id_of(&state), "user-ü-1");
        assert_eq!(class_of(&state).as_deref(), Some("pro"));
        assert_eq!(state.class, 3);
        assert_eq!(class_of(&new_state("x", 0, None)), None);
    }
}
