//! Sticky routing: the same recipient mailbox goes to the same server of its tier while that
//! server is up (weighted rendezvous hashing). When a server goes down only its mailboxes
//! move; everyone else stays where they were. No settings.

use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server, mix64};
use serde::Deserialize;

/// The sticky policy has no settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {}

/// Tiers from the built-in router; order inside a tier by rendezvous score.
#[derive(Debug)]
pub struct Sticky {
    router: Router,
    /// A hash of each server's address, so scores need not hash strings per message.
    server_hash: Vec<u64>,
}

/// FNV-1a: small, stable across builds, and good enough before `mix64` finalises it.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl Sticky {
    /// Weighted rendezvous score of server `i` for `key`: larger wins.
    fn score(&self, key: u64, i: u32) -> f64 {
        let h = mix64(key ^ self.server_hash[i as usize]);
        // u in (0, 1]; -ln(u) is exponential, so w / -ln(u) picks server i with probability w_i / Σw.
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        f64::from(self.router.servers()[i as usize].weight) / -u.ln()
    }

    /// The mailbox a message sticks by: its first recipient, lower case.
    fn key(msg: &Message) -> u64 {
        fnv(msg.recipients.first().map(|r| r.to_ascii_lowercase()).unwrap_or_default().as_bytes())
    }
}

impl Policy for Sticky {
    type Settings = Settings;
    const WANTS_ENVELOPE: bool = true;

    fn new(servers: Vec<Server>, _settings: Settings) -> Result<Self, Vec<Problem>> {
        let server_hash = servers.iter().map(|s| fnv(s.address().as_bytes())).collect();
        Ok(Sticky { router: Router::new(servers), server_hash })
    }

    fn plan(&self, msg: &Message) -> Vec<u32> {
        let key = Self::key(msg);
        let mut up = Vec::with_capacity(self.server_hash.len());
        let mut down = Vec::new();
        let mut scored: Vec<(f64, u32)> = Vec::with_capacity(self.server_hash.len());
        for tier in self.router.tiers() {
            // One score per server (a logarithm each), then sort: not one per comparison.
            scored.clear();
            scored.extend(tier.members.iter().map(|&i| (self.score(key, i), i)));
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            for &(_, i) in &scored {
                if msg.down.contains(&i) { down.push(i) } else { up.push(i) }
            }
        }
        up.extend(down);
        up
    }
}

mxrelay_policy_sdk::export_policy!(Sticky);

#[cfg(test)]
mod tests {
    use super::*;

    fn sticky() -> Sticky {
        let servers = (1..=4)
            .map(|n| Server::new(format!("mx{n}.example.com"), 10))
            .chain([Server::new("backup.example.com", 20)])
            .collect();
        Sticky::new(servers, Settings {}).expect("valid")
    }

    fn first(p: &Sticky, rcpt: &str, seed: u64, down: &[u32]) -> u32 {
        p.plan(&Message { seed, recipients: vec![rcpt.into()], down: down.to_vec(), ..Message::default() })[0]
    }

    #[test]
    fn a_mailbox_always_goes_to_the_same_server() {
        let p = sticky();
        let home = first(&p, "alice@example.com", 0, &[]);
        assert!((0..1000).all(|seed| first(&p, "Alice@Example.com", seed, &[]) == home));
    }

    #[test]
    fn only_the_dead_servers_mailboxes_move() {
        let p = sticky();
        let before: Vec<u32> = (0..2000).map(|n| first(&p, &format!("user{n}@example.com"), 0, &[])).collect();
        // Mailboxes spread over the whole first tier.
        for s in 0..4 {
            let n = before.iter().filter(|&&b| b == s).count();
            assert!((400..=600).contains(&n), "server {s} has {n} of 2000");
        }
        let after: Vec<u32> = (0..2000).map(|n| first(&p, &format!("user{n}@example.com"), 0, &[1])).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b == 1 {
                assert!(*a != 1 && *a < 4, "moved within the tier");
            } else {
                assert_eq!(a, b, "a mailbox of a live server moved");
            }
        }
    }

    #[test]
    fn plans_hold_every_server_once() {
        let p = sticky();
        let mut plan = p.plan(&Message { recipients: vec!["x@example.com".into()], down: vec![0, 4], ..Message::default() });
        assert_eq!(&plan[3..], &[0, 4]);
        plan.sort_unstable();
        assert_eq!(plan, vec![0, 1, 2, 3, 4]);
    }
}
