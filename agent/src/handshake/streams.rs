//! The connections under inspection, as the agent holds them: the stream
//! bytes the kernel handed over (in order, by offset), judged request by
//! request until the connection upgrades. No I/O here: bytes and clock in,
//! actions out (`crate::inspection` carries them out).
//!
//! Guarantees:
//! - A byte is given back to the application (an [`Action::Inject`]) only
//!   once every request it belongs to, and every request before it, was
//!   judged and accepted; bytes after an accepted upgrade request belong to
//!   the WebSocket and go with it.
//! - A hole in the stream (a record lost) rejects the connection.
//! - Bounded: at most `max_pending` connections awaiting a verdict (a new
//!   one beyond it is rejected, never an older one forgotten), and at most
//!   `max_request_bytes` unjudged bytes each.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use wsguard_common::{SourceKey, StreamPeers};

use super::{Judgement, Policy, Rejection, judge_request, replay::ReplayCache, ticket::User};

/// An inspected connection's ends: the client, then the server.
pub type Peers = (SocketAddr, SocketAddr);

/// The ends as the kernel names them (addresses in the 16-byte key space).
pub fn peers_of(p: &StreamPeers) -> Peers {
    let addr = |a: [u8; 16], port| SocketAddr::new(IpAddr::from(a).to_canonical(), port);
    (addr(p.client, p.client_port), addr(p.server, p.server_port))
}

/// The kernel's name for the ends (the key of `WSG_USER_FLOWS`).
pub fn stream_peers((client, server): Peers) -> StreamPeers {
    StreamPeers {
        client: SourceKey::from(client.ip()).addr,
        server: SourceKey::from(server.ip()).addr,
        client_port: client.port(),
        server_port: server.port(),
        _pad: 0,
    }
}

/// What the verdicts ask of the world outside the streams.
pub trait Outside {
    /// Whether a client is exempt from inspection now (allow-listed after
    /// its connection began): it is then never cut, whatever its request.
    fn exempt(&self, client: IpAddr) -> bool;

    /// An upgrade whose ticket names `user` is about to be accepted: bind
    /// the connection to the user, or say why the user may not have it.
    fn admit_user(&mut self, _user: &User, _cookie: u64, _peers: Peers) -> Result<(), Rejection> {
        Ok(())
    }
}

/// A plain function answers the exemption question and admits every user.
impl<F: Fn(IpAddr) -> bool> Outside for F {
    fn exempt(&self, client: IpAddr) -> bool {
        self(client)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put these bytes into the connection's socket, after those put before.
    Inject { cookie: u64, bytes: Vec<u8> },
    /// Everything handed over up to `upto` has been put back: new bytes may
    /// go straight to the application.
    Release { cookie: u64, upto: u64 },
    /// A request was judged and accepted (an upgrade, or plain HTTP).
    Accepted { cookie: u64, upgrade: bool },
    /// The connection is rejected (in dry run: only reported, and released).
    Reject {
        cookie: u64,
        peers: Peers,
        reason: Rejection,
        dry_run: bool,
        /// The user its ticket named, once the ticket checked out.
        user: Option<String>,
    },
}

struct Connection {
    peers: Peers,
    /// Start of the current request (or body progress): the deadline runs from here.
    since: Instant,
    /// Stream offset of the next byte expected from the kernel.
    received: u64,
    /// Bytes received and not yet judged.
    held: Vec<u8>,
    /// Body bytes of an accepted plain request still to come.
    body_left: u64,
    /// The connection upgraded: whatever still arrives is the WebSocket's.
    upgraded: bool,
    /// The user its ticket named, once the ticket checked out.
    user: Option<String>,
}

pub struct Streams {
    policy: Policy,
    deadline: Duration,
    max_pending: usize,
    dry_run: bool,
    /// `None` when tickets are not single-use.
    replay: Option<ReplayCache>,
    connections: HashMap<u64, Connection>,
    /// Connections awaiting a verdict (not upgraded).
    pending: usize,
}

/// How long an upgraded connection is remembered for bytes the kernel
/// handed over before it saw the release.
const UPGRADED_LINGER: Duration = Duration::from_secs(2);

pub struct Settings {
    pub policy: Policy,
    pub deadline: Duration,
    pub max_pending: u32,
    pub dry_run: bool,
    /// Capacity of the single-use ticket cache; `None`: tickets may be reused.
    pub replay_capacity: Option<usize>,
}

impl Streams {
    pub fn new(settings: Settings) -> Streams {
        let mut streams = Streams {
            policy: settings.policy.clone(),
            deadline: settings.deadline,
            max_pending: 0,
            dry_run: false,
            replay: None,
            connections: HashMap::new(),
            pending: 0,
        };
        streams.configure(settings);
        streams
    }

    /// A reload: new policy and bounds for the next verdicts. The replay
    /// cache keeps what it remembers.
    pub fn configure(&mut self, settings: Settings) {
        self.policy = settings.policy;
        self.deadline = settings.deadline;
        self.max_pending = settings.max_pending as usize;
        self.dry_run = settings.dry_run;
        match (settings.replay_capacity, self.replay.as_mut()) {
            (None, _) => self.replay = None,
            (Some(c), Some(cache)) => cache.set_capacity(c),
            (Some(c), None) => self.replay = Some(ReplayCache::new(c)),
        }
    }

    /// Connections awaiting a verdict.
    pub fn pending(&self) -> usize {
        self.pending
    }

    pub fn is_full(&self) -> bool {
        self.pending >= self.max_pending
    }

    /// Entries and capacity of the single-use ticket cache.
    pub fn replay_fill(&self) -> Option<(usize, usize)> {
        self.replay.as_ref().map(|r| (r.len(), r.capacity()))
    }

    pub fn knows(&self, cookie: u64) -> bool {
        self.connections.contains_key(&cookie)
    }

    /// A connection entered inspection.
    pub fn opened(&mut self, cookie: u64, peers: Peers, now: Instant) -> Vec<Action> {
        if self.connections.contains_key(&cookie) {
            return Vec::new();
        }
        if self.is_full() {
            return vec![self.reject_unknown(cookie, peers, Rejection::TooManyPending)];
        }
        self.pending += 1;
        self.connections.insert(
            cookie,
            Connection {
                peers,
                since: now,
                received: 0,
                held: Vec::new(),
                body_left: 0,
                upgraded: false,
                user: None,
            },
        );
        Vec::new()
    }

    /// A connection that cannot be inspected (or held): reject it as it is.
    pub fn reject_unknown(&self, cookie: u64, peers: Peers, reason: Rejection) -> Action {
        Action::Reject {
            cookie,
            peers,
            reason,
            dry_run: false,
            user: None,
        }
    }

    pub fn closed(&mut self, cookie: u64) {
        if let Some(c) = self.connections.remove(&cookie) {
            if !c.upgraded {
                self.pending -= 1;
            }
        }
    }

    /// Stream bytes at `offset` of a known connection; `None` if unknown.
    pub fn data(
        &mut self,
        cookie: u64,
        offset: u64,
        bytes: &[u8],
        now: Instant,
        unix_now: u64,
        outside: &mut dyn Outside,
    ) -> Option<Vec<Action>> {
        let c = self.connections.get_mut(&cookie)?;
        if offset != c.received {
            return Some(self.reject(cookie, Rejection::InspectionLost, outside));
        }
        c.received += bytes.len() as u64;
        c.held.extend_from_slice(bytes);
        if c.upgraded {
            c.since = now;
            let bytes = std::mem::take(&mut c.held);
            let upto = c.received;
            return Some(vec![
                Action::Inject { cookie, bytes },
                Action::Release { cookie, upto },
            ]);
        }
        Some(self.judge_held(cookie, now, unix_now, outside))
    }

    /// Judges the held bytes request by request.
    fn judge_held(
        &mut self,
        cookie: u64,
        now: Instant,
        unix_now: u64,
        outside: &mut dyn Outside,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let c = self.connections.get_mut(&cookie).expect("known");
        let mut cursor = 0usize;
        loop {
            if c.body_left > 0 {
                let n = c.body_left.min((c.held.len() - cursor) as u64);
                cursor += n as usize;
                c.body_left -= n;
                c.since = now;
                if c.body_left > 0 {
                    break;
                }
            }
            if cursor == c.held.len() {
                break;
            }
            let ip = c.peers.0.ip();
            match judge_request(&self.policy, &c.held[cursor..], ip, unix_now) {
                Judgement::Incomplete => break,
                Judgement::Reject(reason) => {
                    return self.reject(cookie, reason, outside);
                }
                Judgement::PlainHttp { head_len, body_len } => {
                    cursor += head_len;
                    c.body_left = body_len;
                    c.since = now;
                    actions.push(Action::Accepted {
                        cookie,
                        upgrade: false,
                    });
                }
                Judgement::Upgrade { ticket, .. } => {
                    c.user = ticket
                        .as_ref()
                        .and_then(|t| t.user.as_ref())
                        .map(|u| u.id.clone());
                    let peers = c.peers;
                    if let Some(t) = &ticket
                        && let Some(cache) = self.replay.as_mut()
                        && let Err(reason) = cache.use_once(t.tag, t.expires_at, unix_now)
                    {
                        return self.reject(cookie, reason, outside);
                    }
                    // A dry run binds no one: a user's limits only report.
                    if let Some(user) = ticket.as_ref().and_then(|t| t.user.as_ref())
                        && !self.dry_run
                        && let Err(reason) = outside.admit_user(user, cookie, peers)
                    {
                        return self.reject(cookie, reason, outside);
                    }
                    let c = self.connections.get_mut(&cookie).expect("known");
                    // The rest of the stream is the WebSocket's.
                    cursor = c.held.len();
                    c.upgraded = true;
                    c.since = now;
                    self.pending -= 1;
                    actions.push(Action::Accepted {
                        cookie,
                        upgrade: true,
                    });
                    break;
                }
            }
        }
        let c = self.connections.get_mut(&cookie).expect("known");
        if cursor > 0 {
            let bytes: Vec<u8> = c.held.drain(..cursor).collect();
            actions.push(Action::Inject { cookie, bytes });
        }
        if c.upgraded {
            actions.push(Action::Release {
                cookie,
                upto: c.received,
            });
        }
        actions
    }

    /// Rejects a known connection. In dry run the rejection is reported and
    /// the connection goes on as if accepted; an exempt client goes on
    /// without a report.
    fn reject(&mut self, cookie: u64, reason: Rejection, outside: &mut dyn Outside) -> Vec<Action> {
        let c = self.connections.get_mut(&cookie).expect("known");
        let peers = c.peers;
        let exempt = outside.exempt(peers.0.ip());
        let mut actions = Vec::new();
        if !exempt {
            actions.push(Action::Reject {
                cookie,
                peers,
                reason,
                dry_run: self.dry_run,
                user: c.user.clone(),
            });
        }
        if (self.dry_run || exempt) && reason != Rejection::InspectionLost {
            if !c.upgraded {
                c.upgraded = true;
                self.pending -= 1;
            }
            let bytes = std::mem::take(&mut c.held);
            actions.push(Action::Inject { cookie, bytes });
            actions.push(Action::Release {
                cookie,
                upto: c.received,
            });
            return actions;
        }
        self.closed(cookie);
        actions
    }

    /// Connections whose request did not complete within the deadline are
    /// rejected; upgraded ones the kernel no longer hands over are forgotten.
    pub fn expire(&mut self, now: Instant, outside: &mut dyn Outside) -> Vec<Action> {
        let late: Vec<(u64, bool)> = self
            .connections
            .iter()
            .filter_map(|(&cookie, c)| {
                let age = now.duration_since(c.since);
                if c.upgraded {
                    (age >= UPGRADED_LINGER).then_some((cookie, true))
                } else {
                    (age >= self.deadline).then_some((cookie, false))
                }
            })
            .collect();
        let mut actions = Vec::new();
        for (cookie, upgraded) in late {
            if upgraded {
                self.connections.remove(&cookie);
            } else {
                actions.extend(self.reject(cookie, Rejection::Deadline, outside));
            }
        }
        actions
    }

    /// Every connection still awaiting a verdict (at shutdown: they are cut).
    pub fn drain_pending(&mut self) -> Vec<(u64, Peers)> {
        let out = self
            .connections
            .iter()
            .filter(|(_, c)| !c.upgraded)
            .map(|(&cookie, c)| (cookie, c.peers))
            .collect();
        self.connections.clear();
        self.pending = 0;
        out
    }
}

#[cfg(test)]
mod tests;
