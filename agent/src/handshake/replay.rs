//! Single-use tickets: the tags of tickets already presented, each kept
//! until its ticket expires, in a table of bounded size.

use std::collections::{BTreeSet, HashMap};

use super::{Rejection, ticket::TAG_BYTES};

type Tag = [u8; TAG_BYTES];

pub struct ReplayCache {
    capacity: usize,
    /// Tag → expiry (Unix seconds).
    seen: HashMap<Tag, u64>,
    /// The same entries ordered by expiry, to forget expired ones cheaply.
    by_expiry: BTreeSet<(u64, Tag)>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity,
            seen: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records the ticket's use. A tag seen before is a replay; when the
    /// table is full of live tickets, the ticket is refused rather than an
    /// older one forgotten (forgetting would let that one be replayed).
    pub fn use_once(&mut self, tag: Tag, expires_at: u64, now: u64) -> Result<(), Rejection> {
        self.forget_expired(now);
        if self.seen.contains_key(&tag) {
            return Err(Rejection::TicketReplayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(Rejection::TicketCacheFull);
        }
        self.seen.insert(tag, expires_at);
        self.by_expiry.insert((expires_at, tag));
        Ok(())
    }

    /// Drops tickets that expired: they are refused as expired anyway.
    pub fn forget_expired(&mut self, now: u64) {
        while let Some(&(expires_at, tag)) = self.by_expiry.first() {
            if expires_at > now {
                break;
            }
            self.by_expiry.pop_first();
            self.seen.remove(&tag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_accepted_once_until_it_expires_and_a_full_cache_refuses_new_ones() {
        let mut cache = ReplayCache::new(2);
        assert_eq!(cache.use_once([1; 32], 100, 10), Ok(()));
        assert_eq!(
            cache.use_once([1; 32], 100, 11),
            Err(Rejection::TicketReplayed)
        );
        assert_eq!(cache.use_once([2; 32], 50, 11), Ok(()));
        assert_eq!(
            cache.use_once([3; 32], 100, 12),
            Err(Rejection::TicketCacheFull)
        );
        // Once [2] expired, its place is free, and [1] is still remembered.
        assert_eq!(cache.use_once([3; 32], 100, 50), Ok(()));
        assert_eq!(
            cache.use_once([1; 32], 100, 50),
            Err(Rejection::TicketReplayed)
        );
        assert_eq!(cache.len(), 2);
    }
}
