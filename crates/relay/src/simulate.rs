//! `mxrelay plan`: run a domain's policy for simulated messages and show where mail goes.

use std::fmt::Write as _;

use mxrelay_policy_core::{Router, Server, parse_host};
use mxrelay_policy_host::{DomainPolicy, PlanRequest};
use serde::Serialize;
use serde::ser::SerializeMap;

/// Where `messages` simulated messages (seeds 0..messages) were delivered.
#[derive(Debug, Serialize)]
pub struct Simulation {
    /// The domain.
    pub domain: String,
    /// `builtin` or the module's path.
    pub policy: String,
    /// Tiers, most preferred first.
    pub tiers: Vec<TierView>,
    /// How many messages were simulated.
    pub messages: u64,
    /// Deliveries per server (`HOST:PORT`), in configuration order; 0 for unused servers.
    pub delivered: Counts,
    /// Messages for which every server was down.
    pub undeliverable: u64,
    /// Plans the built-in core made because the policy component failed.
    #[serde(skip)]
    pub fallbacks: u64,
}

/// One tier in the output.
#[derive(Debug, Serialize)]
pub struct TierView {
    /// Its preference.
    pub preference: u16,
    /// Its servers as `HOST:PORT`.
    pub servers: Vec<String>,
}

/// Server → count, serialised as a JSON object in configuration order.
#[derive(Debug)]
pub struct Counts(pub Vec<(String, u64)>);

impl Serialize for Counts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Resolves `--down` arguments (`HOST:PORT`, or `HOST` for port 25) to server indices.
pub fn down_indices(servers: &[Server], domain: &str, args: &[String]) -> Result<Vec<u32>, String> {
    args.iter()
        .map(|arg| {
            let (host, port) = split_host_port(arg)
                .ok_or_else(|| format!("--down {arg:?}: write it as HOST:PORT, like mail.example.com:25 or [2001:db8::1]:25"))?;
            let (_, host) = parse_host(host).map_err(|e| format!("--down {arg:?}: {e}"))?;
            servers.iter().position(|s| s.host == host && s.port == port).map(|i| i as u32).ok_or_else(|| {
                let known: Vec<String> = servers.iter().map(Server::address).collect();
                format!("--down {arg:?} is not a server of {domain}; its servers are {}", known.join(", "))
            })
        })
        .collect()
}

fn split_host_port(arg: &str) -> Option<(&str, u16)> {
    let arg = arg.trim();
    if let Some(rest) = arg.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, port.parse().ok()?)),
            None if after.is_empty() => Some((host, 25)),
            None => None,
        };
    }
    match arg.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, port.parse().ok()?)),
        Some(_) => Some((arg, 25)), // a bare IPv6 literal
        None => Some((arg, 25)),
    }
}

/// What to simulate.
#[derive(Debug, Clone, Copy)]
pub struct Scenario<'a> {
    /// How many messages (seeds 0..messages).
    pub messages: u64,
    /// Servers treated as down (indices).
    pub down: &'a [u32],
    /// The clock handed to the policy.
    pub now_ms: u64,
    /// The recipient of every message.
    pub rcpt: &'a str,
}

/// Plans the scenario's messages through `policy` and delivers each to the first server of
/// its plan that is not down.
pub fn simulate(domain: &str, policy: &DomainPolicy, scenario: &Scenario<'_>) -> Simulation {
    let Scenario { messages, down, now_ms, rcpt } = *scenario;
    let servers = policy.servers();
    let mut counts = vec![0u64; servers.len()];
    let mut undeliverable = 0;
    let mut fallbacks = 0;
    let recipients = [rcpt.to_string()];
    for seed in 0..messages {
        let plan = policy.plan(&PlanRequest { seed, attempt: 1, now_ms, down, recipients: &recipients, sender: "", size: 0 });
        match plan.source {
            mxrelay_policy_host::PlanSource::Component => {}
            mxrelay_policy_host::PlanSource::Fallback(_) => fallbacks += 1,
        }
        match plan.order.iter().find(|i| !down.contains(i)) {
            Some(&i) => counts[i as usize] += 1,
            None => undeliverable += 1,
        }
    }
    Simulation {
        domain: domain.to_string(),
        policy: policy.policy_name().to_string(),
        tiers: tiers(policy.router()),
        messages,
        delivered: Counts(servers.iter().map(Server::address).zip(counts).collect()),
        undeliverable,
        fallbacks,
    }
}

fn tiers(router: &Router) -> Vec<TierView> {
    router
        .tiers()
        .iter()
        .map(|t| TierView {
            preference: t.preference,
            servers: t.members.iter().map(|&i| router.servers()[i as usize].address()).collect(),
        })
        .collect()
}

/// The human-readable table: tiers, shares, failover order and where the messages went.
pub fn render_table(sim: &Simulation, router: &Router, down: &[u32]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} (policy {}), {} simulated messages", sim.domain, sim.policy, sim.messages);
    let width = router.servers().iter().map(|s| s.address().len()).max().unwrap_or(10).max(10);
    for (n, tier) in router.tiers().iter().enumerate() {
        let when = if n == 0 { "tried first".to_string() } else { "used when every server above is down".to_string() };
        let _ = writeln!(out, "\ntier {} - preference {} - {when}", n + 1, tier.preference);
        for &i in &tier.members {
            let server = &router.servers()[i as usize];
            let delivered = sim.delivered.0[i as usize].1;
            let pct = if sim.messages == 0 { 0.0 } else { 100.0 * delivered as f64 / sim.messages as f64 };
            let state = if down.contains(&i) { "  DOWN" } else { "" };
            let _ = writeln!(
                out,
                "  {:<width$}  share {:>5.1}%  delivered {:>7} ({:>5.1}%){state}",
                server.address(),
                100.0 * router.share(i),
                delivered,
                pct
            );
        }
    }
    let _ = writeln!(out, "\nundeliverable now (queued and retried until a server answers): {}", sim.undeliverable);
    if sim.fallbacks > 0 {
        let _ = writeln!(out, "warning: {} plans came from the built-in fail-safe because the policy failed", sim.fallbacks);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_arguments() {
        let servers = vec![Server::new("mail.example.com", 10), Server { port: 2526, ..Server::new("2001:db8::1", 20) }];
        assert_eq!(down_indices(&servers, "example.com", &["MAIL.example.com:25".into()]), Ok(vec![0]));
        assert_eq!(down_indices(&servers, "example.com", &["mail.example.com".into()]), Ok(vec![0]));
        assert_eq!(down_indices(&servers, "example.com", &["[2001:db8::1]:2526".into()]), Ok(vec![1]));
        let err = down_indices(&servers, "example.com", &["mail.example.com:26".into()]).expect_err("unknown");
        assert!(err.contains("not a server of example.com") && err.contains("[2001:db8::1]:2526"), "{err}");
        assert!(down_indices(&servers, "example.com", &["mail.example.com:x".into()]).is_err());
    }
}
