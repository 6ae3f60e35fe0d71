//! Delivery plans: the order in which to try a domain's servers for one message.

use crate::entry::{RawServer, Server};
use crate::validate::{Problem, validate_servers};

/// 2^64 / φ: consecutive seeds times this constant form a Weyl sequence, the most evenly
/// spread sequence of points there is, so shares over seeds 0..N are exact to within ~1/N.
const WEYL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a fast, well-mixed 64-bit hash. Public so hosts derive seeds the
/// same way everywhere.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic generator seeded per message and tier (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(WEYL);
        mix64(self.0)
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; bias ≤ bound/2^64, far below anything measurable).
    fn below(&mut self, bound: u64) -> u64 {
        scale(self.next(), bound)
    }
}

/// Maps a 64-bit fraction onto `0..bound`.
fn scale(fraction: u64, bound: u64) -> u64 {
    ((u128::from(fraction) * u128::from(bound)) >> 64) as u64
}

/// The inputs for one message's plan. The built-in policy uses `seed` and `down`; `attempt`
/// and `now_ms` are passed through for custom policies (e.g. maintenance windows).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanInput<'a> {
    /// Randomness for the order inside each tier; the relay gives each message its own.
    pub seed: u64,
    /// 1 for the first delivery attempt, then 2, 3, ...
    pub attempt: u32,
    /// Milliseconds since the Unix epoch, as the host's clock reads it.
    pub now_ms: u64,
    /// Indices of servers the caller currently knows to be down.
    pub down: &'a [u32],
}

/// Servers of one preference, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// The shared preference.
    pub preference: u16,
    /// Indices into [`Router::servers`].
    pub members: Vec<u32>,
    /// Sum of the members' weights.
    pub total_weight: u64,
    /// Whether every member has the same weight: then an order needs no weights at all.
    pub equal_weights: bool,
}

/// A domain's server list, arranged once into tiers and then asked for a plan per message.
#[derive(Debug, Clone)]
pub struct Router {
    servers: Vec<Server>,
    tiers: Vec<Tier>,
}

impl Router {
    /// Arranges validated servers into tiers of ascending preference.
    pub fn new(servers: Vec<Server>) -> Router {
        let mut prefs: Vec<u16> = servers.iter().map(|s| s.preference).collect();
        prefs.sort_unstable();
        prefs.dedup();
        let tiers = prefs
            .into_iter()
            .map(|preference| {
                let members: Vec<u32> =
                    (0..servers.len() as u32).filter(|&i| servers[i as usize].preference == preference).collect();
                let weight = |i: &u32| servers[*i as usize].weight;
                let total_weight = members.iter().map(|i| u64::from(weight(i))).sum();
                let equal_weights = members.windows(2).all(|w| weight(&w[0]) == weight(&w[1]));
                Tier { preference, members, total_weight, equal_weights }
            })
            .collect();
        Router { servers, tiers }
    }

    /// Validates `raw` and builds a router; returns the router and any warnings, or every problem.
    pub fn from_raw(raw: &[RawServer]) -> Result<(Router, Vec<Problem>), Vec<Problem>> {
        validate_servers(raw).map(|(servers, warnings)| (Router::new(servers), warnings))
    }

    /// The servers, in configuration order; plans index into this.
    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// The tiers, most preferred first.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The fraction of its tier's traffic that server `index` receives while its whole tier is up.
    pub fn share(&self, index: u32) -> f64 {
        let Some(server) = self.servers.get(index as usize) else {
            return 0.0;
        };
        let tier = self.tiers.iter().find(|t| t.preference == server.preference);
        tier.map_or(0.0, |t| f64::from(server.weight) / t.total_weight as f64)
    }

    /// Where mail goes with the servers in `down` down, as fractions of all mail: one per
    /// server, plus the fraction that finds every server down (queued). The first tier with a
    /// live server takes everything, shared by weight among its live servers, which is what
    /// [`Router::plan_into`] gives on average over messages.
    pub fn expected_shares(&self, down: &[u32]) -> (Vec<f64>, f64) {
        let mut shares = vec![0.0; self.servers.len()];
        for tier in &self.tiers {
            let live: Vec<u32> = tier.members.iter().copied().filter(|i| !down.contains(i)).collect();
            let total: u64 = live.iter().map(|&i| u64::from(self.servers[i as usize].weight)).sum();
            if total > 0 {
                for i in live {
                    shares[i as usize] = f64::from(self.servers[i as usize].weight) / total as f64;
                }
                return (shares, 0.0);
            }
        }
        (shares, if self.servers.is_empty() { 0.0 } else { 1.0 })
    }

    /// The plan for one message, as a new vector. See [`Router::plan_into`].
    pub fn plan(&self, input: &PlanInput<'_>) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.servers.len());
        self.plan_into(input, &mut out);
        out
    }

    /// Writes into `out` the order in which to try every server for one message.
    ///
    /// * Tiers come in ascending preference; inside a tier the first server is picked with
    ///   probability proportional to its weight (a Weyl sequence over the seed, so shares are
    ///   exact over consecutive seeds), the rest follow in weighted-random order.
    /// * Servers listed in `input.down` move behind all others, keeping their relative order:
    ///   they are never dropped, so a plan always holds every server exactly once.
    pub fn plan_into(&self, input: &PlanInput<'_>, out: &mut Vec<u32>) {
        out.clear();
        for (t, tier) in self.tiers.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(&tier.members);
            let salt = (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let first = input.seed.wrapping_mul(WEYL);
            let mut rng = SplitMix(mix64(input.seed ^ salt));
            self.order_tier(&mut out[start..], tier, first, &mut rng);
        }
        move_down_last(input.down, out);
    }

    /// Weighted order of `tier`'s members without replacement, in `slots`; `first` picks
    /// position 0, `rng` the rest.
    fn order_tier(&self, slots: &mut [u32], tier: &Tier, first: u64, rng: &mut SplitMix) {
        let weight = |i: u32| u64::from(self.servers[i as usize].weight);
        let mut remaining = tier.total_weight;
        for pos in 0..slots.len().saturating_sub(1) {
            let rest = &mut slots[pos..];
            let pick = if tier.equal_weights {
                let n = rest.len() as u64;
                if pos == 0 { scale(first, n) } else { rng.below(n) }
            } else {
                let mut point = if pos == 0 { scale(first, remaining) } else { rng.below(remaining) };
                let mut chosen = rest.len() - 1;
                for (k, &i) in rest.iter().enumerate() {
                    if point < weight(i) {
                        chosen = k;
                        break;
                    }
                    point -= weight(i);
                }
                chosen as u64
            };
            rest.swap(0, pick as usize);
            remaining -= weight(rest[0]);
        }
    }
}

/// Moves the servers of `plan` that are in `down` behind all the others, each group keeping
/// its order (a stable partition), so a plan still holds every server. Every policy that
/// knows which servers are down finishes its plan with this.
pub fn move_down_last(down: &[u32], plan: &mut Vec<u32>) {
    if down.is_empty() {
        return;
    }
    let mut tail = Vec::new();
    plan.retain(|i| {
        let is_down = down.contains(i);
        if is_down {
            tail.push(*i);
        }
        !is_down
    });
    plan.extend_from_slice(&tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn router(list: &[(&str, u16)]) -> Router {
        Router::new(list.iter().map(|(h, p)| Server::new(*h, *p)).collect())
    }

    /// Where `n` messages (seeds 0..n) are delivered when the servers in `down` refuse.
    fn deliveries(r: &Router, n: u64, down: &[u32]) -> (BTreeMap<u32, u64>, u64) {
        let mut counts = BTreeMap::new();
        let mut undeliverable = 0;
        for seed in 0..n {
            let plan = r.plan(&PlanInput { seed, down, ..PlanInput::default() });
            assert_is_permutation(&plan, r.servers().len());
            match plan.iter().find(|i| !down.contains(i)) {
                Some(&i) => *counts.entry(i).or_insert(0) += 1,
                None => undeliverable += 1,
            }
        }
        (counts, undeliverable)
    }

    fn assert_is_permutation(plan: &[u32], n: usize) {
        let mut sorted = plan.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>(), "plan {plan:?} is not a permutation of 0..{n}");
    }

    fn seed_eight() -> Router {
        Router::new(crate::seed_page_example())
    }

    #[test]
    fn seed_one_server_gets_everything() {
        let r = router(&[("mail.example.com", 10)]);
        assert_eq!(deliveries(&r, 1000, &[]), (BTreeMap::from([(0, 1000)]), 0));
        assert_eq!(deliveries(&r, 1000, &[0]), (BTreeMap::new(), 1000));
    }

    #[test]
    fn seed_primary_and_backup() {
        let r = router(&[("backup.example.com", 20), ("primary.example.com", 10)]);
        assert_eq!(deliveries(&r, 1000, &[]).0, BTreeMap::from([(1, 1000)]));
        // Primary down: the backup takes over at once, for every message.
        assert_eq!(deliveries(&r, 1000, &[1]).0, BTreeMap::from([(0, 1000)]));
        assert_eq!(r.plan(&PlanInput::default()), vec![1, 0]);
    }

    #[test]
    fn seed_two_balanced_share_equally() {
        let r = router(&[("a.example.com", 10), ("b.example.com", 10)]);
        let (counts, _) = deliveries(&r, 10_000, &[]);
        assert_eq!(counts.values().sum::<u64>(), 10_000);
        for c in counts.values() {
            assert!((4_990..=5_010).contains(c), "{counts:?}");
        }
        // One down: the other takes all of it.
        assert_eq!(deliveries(&r, 1000, &[0]).0, BTreeMap::from([(1, 1000)]));
    }

    #[test]
    fn seed_two_balanced_plus_failover() {
        let r = router(&[("a.example.com", 10), ("b.example.com", 10), ("c.example.com", 20)]);
        let (counts, _) = deliveries(&r, 10_000, &[]);
        assert_eq!(counts.get(&2), None);
        assert!(counts.values().all(|c| (4_990..=5_010).contains(c)), "{counts:?}");
        assert_eq!(deliveries(&r, 1000, &[0, 1]).0, BTreeMap::from([(2, 1000)]));
        let (one_down, _) = deliveries(&r, 1000, &[0]);
        assert_eq!(one_down, BTreeMap::from([(1, 1000)]));
    }

    #[test]
    fn seed_eight_servers_three_tiers() {
        let r = seed_eight();
        assert_eq!(
            r.tiers().iter().map(|t| (t.preference, t.members.clone())).collect::<Vec<_>>(),
            vec![(10, vec![0, 1, 2]), (20, vec![3, 4]), (30, vec![5, 6, 7])]
        );
        let (counts, _) = deliveries(&r, 9_000, &[]);
        assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(counts.values().all(|c| (2_990..=3_010).contains(c)), "{counts:?}");
        let (counts, _) = deliveries(&r, 9_000, &[0, 1, 2]);
        assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        assert!(counts.values().all(|c| (4_490..=4_510).contains(c)), "{counts:?}");
        let (counts, _) = deliveries(&r, 9_000, &[0, 1, 2, 3, 4]);
        assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec![5, 6, 7]);
        assert!(counts.values().all(|c| (2_990..=3_010).contains(c)), "{counts:?}");
        assert_eq!(deliveries(&r, 100, &[0, 1, 2, 3, 4, 5, 6, 7]), (BTreeMap::new(), 100));
    }

    #[test]
    fn a_down_server_share_spreads_over_its_tier() {
        let r = seed_eight();
        let (counts, _) = deliveries(&r, 10_000, &[0]);
        assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert!(counts.values().all(|c| (4_800..=5_200).contains(c)), "{counts:?}");
    }

    #[test]
    fn every_server_is_second_equally_often() {
        // The whole order is uniform, not just the first pick (unlike an adjacent-swap shuffle).
        let r = seed_eight();
        let mut second = BTreeMap::new();
        for seed in 0..30_000 {
            *second.entry(r.plan(&PlanInput { seed, ..PlanInput::default() })[1]).or_insert(0u32) += 1;
        }
        assert!(second.values().all(|c| (9_500..=10_500).contains(c)), "{second:?}");
    }

    #[test]
    fn weights_set_the_share() {
        let mut servers = vec![Server::new("a.example.com", 10), Server::new("b.example.com", 10)];
        servers[0].weight = 3;
        let r = Router::new(servers);
        assert!((r.share(0) - 0.75).abs() < 1e-9);
        let (counts, _) = deliveries(&r, 10_000, &[]);
        assert!((7_490..=7_510).contains(&counts[&0]), "{counts:?}");
    }

    #[test]
    fn down_servers_go_last_in_tier_order_never_dropped() {
        let r = seed_eight();
        for seed in 0..500 {
            let plan = r.plan(&PlanInput { seed, down: &[1, 3, 6], ..PlanInput::default() });
            assert_is_permutation(&plan, 8);
            let tail: Vec<u32> = plan[5..].to_vec();
            assert_eq!(tail, vec![1, 3, 6], "seed {seed}: {plan:?}");
            let prefs: Vec<u16> = plan[..5].iter().map(|&i| r.servers()[i as usize].preference).collect();
            assert!(prefs.is_sorted(), "{prefs:?}");
        }
    }

    #[test]
    fn same_inputs_same_plan() {
        let r = seed_eight();
        let input = PlanInput { seed: 42, attempt: 3, now_ms: 1_700_000_000_000, down: &[2] };
        assert_eq!(r.plan(&input), r.plan(&input));
        assert_ne!(r.plan(&PlanInput { seed: 1, ..input }), r.plan(&PlanInput { seed: 2, ..input }));
    }

    #[test]
    fn expected_shares_match_simulated_delivery() {
        let mut servers: Vec<Server> =
            (0..6).map(|i| Server::new(format!("mx{i}.example.com"), if i < 3 { 10 } else { 20 })).collect();
        servers[1].weight = 3;
        let r = Router::new(servers);
        for down in [vec![], vec![0], vec![1, 2], vec![0, 1, 2], vec![0, 1, 2, 3], vec![0, 1, 2, 3, 4, 5]] {
            let (shares, queued) = r.expected_shares(&down);
            let n = 20_000;
            let (counts, undeliverable) = deliveries(&r, n, &down);
            assert!((queued - undeliverable as f64 / n as f64).abs() < 1e-9, "{down:?}");
            for (i, share) in shares.iter().enumerate() {
                let got = *counts.get(&(i as u32)).unwrap_or(&0) as f64 / n as f64;
                assert!((share - got).abs() < 0.01, "down {down:?} server {i}: expected {share}, simulated {got}");
            }
        }
    }

    #[test]
    fn empty_router_plans_nothing() {
        assert!(Router::new(Vec::new()).plan(&PlanInput::default()).is_empty());
    }
}
