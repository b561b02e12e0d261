//! Rebuilds each connection's request head from its segments (split,
//! retransmitted or out of order) and judges it, within hard bounds: bytes
//! per head (`max_request_bytes`), heads pending at once (`max_pending`),
//! and age (`deadline`, from the SYN). Exceeding a bound is a verdict.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::{Policy, Rejection, Verdict, capture::Segment, judge};

/// A connection, from the client's side.
pub type Connection = (SocketAddr, SocketAddr);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accept,
    Reject(Rejection),
}

struct Pending {
    started: Instant,
    /// Sequence number of the first byte of the head.
    first_seq: u32,
    /// Bytes received in order from `first_seq`.
    head: Vec<u8>,
    /// Bytes that arrived ahead of a gap, by offset from `first_seq`.
    ahead: BTreeMap<usize, Vec<u8>>,
    /// All bytes held for this connection (head and ahead).
    held: usize,
}

pub struct Inspector {
    policy: Policy,
    deadline: Duration,
    max_pending: usize,
    pending: HashMap<Connection, Pending>,
    /// Connections judged lately: a retransmission captured before the
    /// kernel learnt the verdict must not start a second judgement.
    judged: HashMap<Connection, Instant>,
}

impl Inspector {
    pub fn new(policy: Policy, deadline: Duration, max_pending: u32) -> Inspector {
        Inspector {
            policy,
            deadline,
            max_pending: max_pending as usize,
            pending: HashMap::new(),
            judged: HashMap::new(),
        }
    }

    pub fn set_policy(&mut self, policy: Policy, deadline: Duration, max_pending: u32) {
        self.policy = policy;
        self.deadline = deadline;
        self.max_pending = max_pending as usize;
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one captured segment; returns the verdicts it led to (its own
    /// connection's, and an older connection's if the table was full).
    pub fn on_segment(
        &mut self,
        segment: Segment,
        now: Instant,
        unix_now: u64,
    ) -> Vec<(Connection, Outcome)> {
        let connection = (segment.client, segment.server);
        let verdicts = self.take_segment(connection, segment, now, unix_now);
        for (c, _) in &verdicts {
            self.judged.insert(*c, now);
        }
        if self.judged.len() > 4 * self.max_pending {
            self.judged.clear(); // at worst, a verdict given twice
        }
        verdicts
    }

    fn take_segment(
        &mut self,
        connection: Connection,
        segment: Segment,
        now: Instant,
        unix_now: u64,
    ) -> Vec<(Connection, Outcome)> {
        let mut verdicts = Vec::new();
        if segment.fin_or_rst {
            self.pending.remove(&connection);
            return verdicts;
        }
        if segment.syn {
            self.judged.remove(&connection); // a new connection on the same 4-tuple
        } else if self.judged.contains_key(&connection) {
            return verdicts;
        }
        if !self.pending.contains_key(&connection) {
            if !segment.syn && segment.payload.is_empty() {
                return verdicts;
            }
            if self.pending.len() >= self.max_pending {
                // The bound on pending heads: the oldest is out of time first.
                if let Some(oldest) = self
                    .pending
                    .iter()
                    .min_by_key(|(_, p)| p.started)
                    .map(|(c, _)| *c)
                {
                    self.pending.remove(&oldest);
                    verdicts.push((oldest, Outcome::Reject(Rejection::Deadline)));
                }
            }
            // With the SYN, data starts at seq + 1; without (the agent came up
            // mid-handshake), at this segment.
            let first_seq = if segment.syn {
                segment.seq.wrapping_add(1)
            } else {
                segment.seq
            };
            self.pending.insert(
                connection,
                Pending {
                    started: now,
                    first_seq,
                    head: Vec::new(),
                    ahead: BTreeMap::new(),
                    held: 0,
                },
            );
        }
        if segment.payload.is_empty() {
            return verdicts;
        }
        let limit = self.policy.max_request_bytes;
        let pending = self.pending.get_mut(&connection).expect("inserted above");
        let offset = segment.seq.wrapping_sub(pending.first_seq) as usize;
        if offset > limit {
            // Beyond the bound (or a sequence number from before the head,
            // which wraps to a huge offset): never legitimate for a head.
            self.pending.remove(&connection);
            verdicts.push((connection, Outcome::Reject(Rejection::TooLarge)));
            return verdicts;
        }
        let end = offset + segment.payload.len();
        if end > pending.head.len() {
            if offset <= pending.head.len() {
                // Extends the head (a retransmission may overlap it).
                pending.held += end - pending.head.len();
                pending
                    .head
                    .extend_from_slice(&segment.payload[pending.head.len() - offset..]);
                // Fill from segments that were waiting for this one.
                while let Some((&at, _)) = pending.ahead.first_key_value() {
                    if at > pending.head.len() {
                        break;
                    }
                    let (at, bytes) = pending.ahead.pop_first().unwrap();
                    pending.held -= bytes.len();
                    if at + bytes.len() > pending.head.len() {
                        pending.held += at + bytes.len() - pending.head.len();
                        pending
                            .head
                            .extend_from_slice(&bytes[pending.head.len() - at..]);
                    }
                }
            } else if !pending.ahead.contains_key(&offset) {
                pending.held += segment.payload.len();
                pending.ahead.insert(offset, segment.payload);
            }
        }
        if pending.held > limit + 1500 {
            self.pending.remove(&connection);
            verdicts.push((connection, Outcome::Reject(Rejection::TooLarge)));
            return verdicts;
        }
        match judge(&self.policy, &pending.head, connection.0.ip(), unix_now) {
            Verdict::Incomplete => {}
            Verdict::Accept | Verdict::AcceptPlainHttp => {
                self.pending.remove(&connection);
                verdicts.push((connection, Outcome::Accept));
            }
            Verdict::Reject(reason) => {
                self.pending.remove(&connection);
                verdicts.push((connection, Outcome::Reject(reason)));
            }
        }
        verdicts
    }

    /// Connections whose head did not complete within the deadline.
    pub fn expire(&mut self, now: Instant) -> Vec<(Connection, Outcome)> {
        let deadline = self.deadline;
        self.judged
            .retain(|_, at| now.duration_since(*at) < deadline);
        let late: Vec<Connection> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.started) >= deadline)
            .map(|(c, _)| *c)
            .collect();
        late.into_iter()
            .map(|c| {
                self.pending.remove(&c);
                self.judged.insert(c, now);
                (c, Outcome::Reject(Rejection::Deadline))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{MissingOrigin, NonUpgrade};

    fn inspector() -> Inspector {
        let policy = Policy {
            allowed_origins: vec![
                crate::handshake::OriginPattern::parse("https://app.example.com").unwrap(),
            ],
            missing_origin: MissingOrigin::Reject,
            allowed_hosts: vec![],
            allowed_paths: vec![],
            max_request_bytes: 1024,
            non_upgrade_requests: NonUpgrade::Allow,
            ticket: None,
        };
        Inspector::new(policy, Duration::from_secs(5), 3)
    }

    const HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://app.example.com\r\n\r\n";

    fn conn(port: u16) -> Connection {
        (
            SocketAddr::from(([198, 18, 0, 7], port)),
            SocketAddr::from(([198, 18, 0, 1], 8080)),
        )
    }

    fn seg(c: Connection, seq: u32, syn: bool, payload: &[u8]) -> Segment {
        Segment {
            client: c.0,
            server: c.1,
            seq,
            syn,
            fin_or_rst: false,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn any_segmentation_order_or_retransmission_gives_the_same_verdict() {
        let now = Instant::now();
        let splits: &[&[usize]] = &[&[], &[5], &[1, 2, 3, 60, 100], &[HEAD.len() - 1]];
        for cuts in splits {
            let mut bounds = vec![0];
            bounds.extend_from_slice(cuts);
            bounds.push(HEAD.len());
            let pieces: Vec<(u32, &[u8])> = bounds
                .windows(2)
                .map(|w| (1001 + w[0] as u32, &HEAD[w[0]..w[1]]))
                .collect();
            for order in [false, true] {
                let mut i = inspector();
                assert!(
                    i.on_segment(seg(conn(1), 1000, true, b""), now, 0)
                        .is_empty()
                );
                let mut ordered = pieces.clone();
                if order {
                    ordered.reverse();
                }
                let mut verdicts = Vec::new();
                for (seq, bytes) in &ordered {
                    verdicts.extend(i.on_segment(seg(conn(1), *seq, false, bytes), now, 0));
                    // A retransmission of what came before changes nothing.
                    verdicts.extend(i.on_segment(seg(conn(1), *seq, false, bytes), now, 0));
                }
                assert_eq!(
                    verdicts,
                    vec![(conn(1), Outcome::Accept)],
                    "cuts {cuts:?}, reversed {order}"
                );
                assert_eq!(i.pending(), 0);
            }
        }
    }

    #[test]
    fn bounds_are_verdicts() {
        let now = Instant::now();
        let mut i = inspector();
        i.on_segment(seg(conn(1), 0, true, b""), now, 0);
        let big = vec![b'a'; 1100];
        assert_eq!(
            i.on_segment(seg(conn(1), 1, false, &big), now, 0),
            vec![(conn(1), Outcome::Reject(Rejection::TooLarge))]
        );
        // Far ahead of the head: too large as well, and nothing is stored.
        i.on_segment(seg(conn(2), 0, true, b""), now, 0);
        assert_eq!(
            i.on_segment(seg(conn(2), 5000, false, b"x"), now, 0),
            vec![(conn(2), Outcome::Reject(Rejection::TooLarge))]
        );
        // The table holds 3: a fourth evicts the oldest.
        for port in 10..13 {
            i.on_segment(
                seg(conn(port), 0, true, b""),
                now + Duration::from_millis(port as u64),
                0,
            );
        }
        let v = i.on_segment(seg(conn(20), 0, true, b""), now + Duration::from_secs(1), 0);
        assert_eq!(v, vec![(conn(10), Outcome::Reject(Rejection::Deadline))]);
        // Slowloris: a head that never completes.
        i.on_segment(seg(conn(20), 1, false, b"GET /ws HTTP/1.1\r\n"), now, 0);
        let expired = i.expire(now + Duration::from_secs(7));
        assert!(expired.contains(&(conn(20), Outcome::Reject(Rejection::Deadline))));
        assert_eq!(i.pending(), 0);
    }
}
