//! The memory that messages hold while they arrive, bounded across all sessions
//! (`relay.max_data_in_memory`).
//!
//! A message is received whole into memory before it is journaled, so without a bound the
//! worst case would be `max_connections` × `max_message_size` (25 GB at the defaults). Each
//! message asks for its buffer's capacity before it grows; past the bound its sender gets
//! `452 4.3.1` and tries again later, as RFC 1870 has a server do for a message it has no
//! room for at the moment. A message that is the only one arriving is always given room, so
//! mail still flows, one message at a time, at any bound.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes held by the messages arriving now.
#[derive(Debug, Default)]
pub struct DataMemory {
    held: AtomicU64,
}

impl DataMemory {
    /// A share of nothing yet, for one message, under `limit` bytes in all.
    pub fn share(&self, limit: u64) -> DataShare<'_> {
        DataShare { memory: self, bytes: 0, limit }
    }

    /// Whether a message of `size` bytes (its SIZE parameter) would be refused now. Without
    /// SIZE (`0`) it is not known: the message is refused only if it outgrows the room left.
    pub fn would_refuse(&self, size: u64, limit: u64) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        size > 0 && held > 0 && held.saturating_add(size) > limit
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// One message's share of [`DataMemory`], given back when dropped.
#[derive(Debug)]
pub struct DataShare<'a> {
    memory: &'a DataMemory,
    bytes: u64,
    limit: u64,
}

impl DataShare<'_> {
    /// Makes the share `bytes`. Growing is refused when the total would pass the limit,
    /// unless no other message holds any; shrinking always succeeds.
    pub fn resize(&mut self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        let mine = self.bytes;
        let limit = self.limit;
        let updated = self.memory.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            let others = held - mine;
            (bytes <= mine || others == 0 || others + bytes <= limit).then_some(others + bytes)
        });
        match updated {
            Ok(before) => {
                self.bytes = bytes;
                metrics::gauge!("mxrelay_inbound_data_bytes").set((before - mine + bytes) as f64);
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for DataShare<'_> {
    fn drop(&mut self) {
        self.resize(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_stay_within_the_limit_and_are_given_back() {
        let memory = DataMemory::default();
        let mut a = memory.share(1000);
        assert!(a.resize(600));
        let mut b = memory.share(1000);
        assert!(b.resize(400));
        assert!(!b.resize(401), "past the limit");
        assert_eq!(memory.held(), 1000, "a refusal keeps what was held");
        assert!(memory.would_refuse(1, 1000));
        assert!(!memory.would_refuse(0, 1000), "no SIZE: tried");
        assert!(a.resize(100), "shrinking always succeeds");
        assert!(b.resize(900));
        drop(a);
        drop(b);
        assert_eq!(memory.held(), 0);
        assert!(!memory.would_refuse(5000, 1000), "nothing arriving: any size may come");
    }

    /// A message alone is never refused, so a limit below a large message does not stop it.
    #[test]
    fn a_message_arriving_alone_always_has_room() {
        let memory = DataMemory::default();
        let mut alone = memory.share(1000);
        assert!(alone.resize(50_000));
        let mut second = memory.share(1000);
        assert!(!second.resize(1));
        drop(alone);
        assert!(second.resize(50_000), "alone now");
    }
}
