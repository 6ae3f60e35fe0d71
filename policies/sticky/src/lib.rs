//! Sticky routing: the same recipient mailbox goes to the same server of its tier while that
//! server is up (weighted rendezvous hashing). When a server goes down only its mailboxes
//! move; everyone else stays where they were. No settings.

use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server, mix64, move_down_last};
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
fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Sticky {
    /// Server `i`'s draw for `key`: 53 uniform bits.
    fn draw(&self, key: u64, i: u32) -> u64 {
        mix64(key ^ self.server_hash[i as usize]) >> 11
    }

    /// Weighted rendezvous score of server `i` for `key`: larger wins.
    fn score(&self, key: u64, i: u32) -> f64 {
        // u in (0, 1]; -ln(u) is exponential, so w / -ln(u) picks server i with probability w_i / Σw.
        let u = (self.draw(key, i) as f64 + 1.0) / (1u64 << 53) as f64;
        f64::from(self.router.servers()[i as usize].weight) / -u.ln()
    }

    /// The mailbox a message sticks by: its first recipient, lower case.
    fn key(msg: &Message) -> u64 {
        fnv(msg.recipients.first().map_or(&[][..], |r| r.as_bytes()).iter().map(u8::to_ascii_lowercase))
    }
}

impl Policy for Sticky {
    type Settings = Settings;
    const WANTS_ENVELOPE: bool = true;

    fn new(servers: Vec<Server>, _settings: Settings) -> Result<Self, Vec<Problem>> {
        let server_hash = servers.iter().map(|s| fnv(s.address().bytes())).collect();
        Ok(Sticky { router: Router::new(servers), server_hash })
    }

    fn plan(&self, msg: &Message) -> Vec<u32> {
        let key = Self::key(msg);
        let mut plan = Vec::with_capacity(self.server_hash.len());
        let mut drawn: Vec<(u64, u32)> = Vec::with_capacity(self.server_hash.len());
        let mut scored: Vec<(f64, u32)> = Vec::new();
        for tier in self.router.tiers() {
            if tier.equal_weights {
                // Equal weights: the score grows with the draw, so the draws order the tier
                // as the scores would, without a logarithm each.
                drawn.clear();
                drawn.extend(tier.members.iter().map(|&i| (self.draw(key, i), i)));
                drawn.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                plan.extend(drawn.iter().map(|&(_, i)| i));
            } else {
                // One score per server (a logarithm each), then sort: not one per comparison.
                scored.clear();
                scored.extend(tier.members.iter().map(|&i| (self.score(key, i), i)));
                scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                plan.extend(scored.iter().map(|&(_, i)| i));
            }
        }
        move_down_last(&msg.down, &mut plan);
        plan
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
    fn draws_order_an_equal_weight_tier_as_the_scores_do() {
        let p = sticky();
        let tier = &p.router.tiers()[0].members;
        for n in 0..2000 {
            let key = fnv(format!("user{n}@example.com").bytes());
            let mut by_draw = tier.clone();
            by_draw.sort_by_key(|&i| std::cmp::Reverse(p.draw(key, i)));
            let mut by_score = tier.clone();
            by_score.sort_by(|&a, &b| p.score(key, b).total_cmp(&p.score(key, a)));
            assert_eq!(by_draw, by_score, "user{n}");
        }
    }

    #[test]
    fn unequal_weights_share_mailboxes_by_weight() {
        let heavy = Server { weight: 3, ..Server::new("big.example.com", 10) };
        let p = Sticky::new(vec![Server::new("small.example.com", 10), heavy], Settings {}).expect("valid");
        assert!(!p.router.tiers()[0].equal_weights);
        let to_heavy = (0..4000).filter(|n| first(&p, &format!("user{n}@example.com"), 0, &[]) == 1).count();
        assert!((2850..=3150).contains(&to_heavy), "{to_heavy} of 4000 went to the server of weight 3");
        // Sticky there too, whatever the seed.
        let home = first(&p, "bob@example.com", 0, &[]);
        assert!((0..100).all(|seed| first(&p, "BOB@example.com", seed, &[]) == home));
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
