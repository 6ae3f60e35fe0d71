//! Delivering one queued envelope: ask the domain's policy for a plan, walk it, and turn the
//! servers' verdicts into an outcome for every recipient.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mxrelay_policy_core::mix64;
use mxrelay_policy_host::{PlanRequest, PlanSource};
use tokio::sync::Semaphore;

use crate::dsn::{self, Action};
use crate::health::{self, Admission, Fault, Health};
use crate::outbound::{Outgoing, RcptVerdict, ServerVerdict, Transport};
use crate::policies::Policies;
use crate::queue::{Envelope, now_ms};

/// Why an envelope stays queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferReason {
    /// Every server of the domain is marked down; nothing was tried. Retried as soon as one
    /// comes back up.
    AllServersDown,
    /// Servers were tried and none took the remaining recipients.
    Failed(String),
    /// The server did not answer the final `.`: it may have the message.
    MaybeDelivered(String),
    /// The domain is no longer configured (kept until it is, or the lifetime ends).
    UnknownDomain,
}

impl std::fmt::Display for DeferReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeferReason::AllServersDown => f.write_str("every server of the domain is down"),
            DeferReason::Failed(why) => f.write_str(why),
            DeferReason::MaybeDelivered(why) => {
                write!(f, "{why} (the message may be delivered twice)")
            }
            DeferReason::UnknownDomain => f.write_str("the domain is not configured"),
        }
    }
}

/// What became of an envelope after one delivery run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient was delivered or failed permanently.
    Done {
        /// Recipients delivered, with the server that took them.
        delivered: Vec<(String, String)>,
        /// Recipients that failed permanently, with the reason.
        failed: Vec<(String, String)>,
        /// Delivered recipients whose sender asked to hear of success, taken by a server that
        /// does not offer DSN, with its reply: the relay reports them as relayed.
        relayed: Vec<(String, String)>,
    },
    /// Some recipients remain.
    Deferred {
        /// Recipients delivered in this run.
        delivered: Vec<(String, String)>,
        /// Recipients that failed permanently in this run.
        failed: Vec<(String, String)>,
        /// As in `Done`.
        relayed: Vec<(String, String)>,
        /// Recipients still to deliver.
        remaining: Vec<String>,
        /// Why.
        reason: DeferReason,
    },
}

/// Everything a delivery needs, shared by all deliveries.
pub struct Deliverer {
    policies: Arc<std::sync::RwLock<Arc<Policies>>>,
    transport: Arc<Transport>,
    health: Health,
    concurrency_per_server: u32,
    per_server: Mutex<HashMap<String, Arc<Semaphore>>>,
    seeds: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer").finish_non_exhaustive()
    }
}

impl Deliverer {
    /// A deliverer over the given policies, transport and health memory.
    pub fn new(
        policies: Arc<std::sync::RwLock<Arc<Policies>>>,
        transport: Arc<Transport>,
        health: Health,
        concurrency_per_server: u32,
    ) -> Deliverer {
        Deliverer { policies, transport, health, concurrency_per_server, per_server: Mutex::default(), seeds: Mutex::default() }
    }

    /// The health memory.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The current policies.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn limit(&self, server_key: &str) -> Arc<Semaphore> {
        let mut map = self.per_server.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked up before inserting: this runs per message, the key is new only once.
        if let Some(limit) = map.get(server_key) {
            return limit.clone();
        }
        let limit = Arc::new(Semaphore::new(self.concurrency_per_server as usize));
        map.insert(server_key.to_string(), limit.clone());
        limit
    }

    /// Consecutive seeds per domain: the core's Weyl sequence then gives each server of a tier
    /// its exact share per message, however deliveries interleave. The start is random so
    /// restarts do not always favour the same server.
    fn next_seed(&self, domain: &str) -> u64 {
        let mut map = self.seeds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(next) = map.get_mut(domain) {
            *next = next.wrapping_add(1);
            return *next;
        }
        let start = mix64(now_ms() ^ mix64(domain.len() as u64));
        map.insert(domain.to_string(), start);
        start
    }

    /// Runs one delivery of `env` with its `data`.
    pub async fn deliver(&self, env: &Envelope, data: &[u8]) -> Outcome {
        let policies = self.policies();
        // Notifications (null sender) to senders outside our domains go to the bounce relay.
        let route = policies.domain(&env.domain).or_else(|| env.sender.is_empty().then(|| policies.bounce_route()).flatten());
        let Some(policy) = route.cloned() else {
            return Outcome::Deferred {
                delivered: vec![],
                failed: vec![],
                relayed: vec![],
                remaining: env.recipients.clone(),
                reason: DeferReason::UnknownDomain,
            };
        };
        let tls = policies.tls(&env.domain);
        let servers = policy.servers();
        let down = self.health.down_indices(servers);
        if down.len() == servers.len() {
            return Outcome::Deferred {
                delivered: vec![],
                failed: vec![],
                relayed: vec![],
                remaining: env.recipients.clone(),
                reason: DeferReason::AllServersDown,
            };
        }
        let request = PlanRequest {
            seed: self.next_seed(&env.domain),
            attempt: env.attempts + 1,
            now_ms: now_ms(),
            down: &down,
            recipients: &env.recipients,
            sender: &env.sender,
            size: env.size,
        };
        let started = std::time::Instant::now();
        let plan = policy.plan(&request);
        metrics::histogram!("mxrelay_policy_call_seconds").record(started.elapsed().as_secs_f64());
        match &plan.source {
            PlanSource::Component => {}
            PlanSource::Fallback(e) => {
                metrics::counter!("mxrelay_policy_fallbacks_total", "domain" => env.domain.clone()).increment(1);
                tracing::warn!(queue_id = %env.queue_id(), error = %e, "planned by the built-in fail-safe");
            }
        }

        let mut pending = env.recipients.clone();
        let (mut delivered, mut failed, mut relayed) = (Vec::new(), Vec::new(), Vec::new());
        let mut last_reason = DeferReason::AllServersDown;
        for &index in &plan.order {
            if pending.is_empty() {
                break;
            }
            let server = &servers[index as usize];
            let server_key = health::key(server);
            if self.health.is_down(server) {
                continue;
            }
            let _permit = self.limit(&server_key).acquire_owned().await;
            // Asked again: while this delivery waited for a slot, one that held it may have
            // found the server dead. Without this, every waiter would try a dead server.
            // Held until the verdict's effect on health is recorded (dropped, it reopens).
            let mut trial = match self.health.admit(server) {
                Admission::Up => None,
                Admission::Trial(trial) => Some(trial),
                Admission::Down => continue,
            };
            // Recipients this server deferred: they go on to the next server.
            let mut elsewhere = Vec::new();
            // Until the server takes no more in a transaction: past its recipient limit, the
            // rest go in another transaction, at once (RFC 5321 §4.5.3.1.10).
            loop {
                let outgoing = Outgoing { sender: &env.sender, recipients: &pending, data, dsn: env.dsn.as_deref() };
                let verdict = self.transport.send(server, &outgoing, &tls).await;
                if verdict.answered()
                    && let Some(trial) = trial.take()
                {
                    trial.passed();
                }
                let stalled_after_dot = matches!(verdict, ServerVerdict::StalledAfterDot(_));
                match verdict {
                    ServerVerdict::Completed { rcpts, reply, dsn_offered } => {
                        let mut over_limit = Vec::new();
                        for (rcpt, v) in pending.drain(..).zip(rcpts) {
                            match v {
                                RcptVerdict::Delivered => {
                                    tracing::info!(queue_id = %env.queue_id(), server = %server_key, rcpt, outcome = "delivered", reply = %reply, "delivery attempt");
                                    metrics::counter!("mxrelay_delivered_total", "server" => server_key.clone()).increment(1);
                                    // From acceptance to delivery, retries included (Postfix's `delay=`).
                                    let delay_ms = now_ms().saturating_sub(env.received_ms);
                                    metrics::histogram!("mxrelay_delivery_delay_seconds").record(delay_ms as f64 / 1000.0);
                                    // Only recipients that asked for a success report: the
                                    // list stays empty for nearly every message.
                                    if !dsn_offered && dsn::wanted(env.dsn.as_deref(), &rcpt, Action::Relayed) {
                                        relayed.push((rcpt.clone(), reply.clone()));
                                    }
                                    delivered.push((rcpt, server_key.clone()));
                                }
                                RcptVerdict::PermRejected(why) => {
                                    tracing::info!(queue_id = %env.queue_id(), server = %server_key, rcpt, outcome = "rejected", reply = %why, "delivery attempt");
                                    failed.push((rcpt, why));
                                }
                                RcptVerdict::TempRejected(why) => {
                                    tracing::info!(queue_id = %env.queue_id(), server = %server_key, rcpt, outcome = "rcpt-deferred", reply = %why, "delivery attempt");
                                    last_reason = DeferReason::Failed(why);
                                    elsewhere.push(rcpt);
                                }
                                RcptVerdict::OverLimit(why) => {
                                    tracing::info!(queue_id = %env.queue_id(), server = %server_key, rcpt, outcome = "next-transaction", reply = %why, "delivery attempt");
                                    last_reason = DeferReason::Failed(why);
                                    over_limit.push(rcpt);
                                }
                            }
                        }
                        // A recipient is over the limit only after one was taken (see
                        // `RcptVerdict::OverLimit`), so each round delivers some: it ends.
                        pending = over_limit;
                        if !pending.is_empty() {
                            continue;
                        }
                    }
                    ServerVerdict::Unreachable(why) => {
                        tracing::info!(queue_id = %env.queue_id(), server = %server_key, outcome = "unreachable", reply = %why, "delivery attempt");
                        self.health.mark_down(server, Fault::Unreachable, &why, &self.transport);
                        last_reason = DeferReason::Failed(why);
                    }
                    ServerVerdict::Stalled(why) => {
                        tracing::info!(queue_id = %env.queue_id(), server = %server_key, outcome = "stalled", reply = %why, "delivery attempt");
                        self.health.mark_down(server, Fault::Stalled, &why, &self.transport);
                        last_reason = DeferReason::Failed(why);
                    }
                    ServerVerdict::SessionFailed(why) | ServerVerdict::TempFailed(why) => {
                        tracing::info!(queue_id = %env.queue_id(), server = %server_key, outcome = "next-server", reply = %why, "delivery attempt");
                        last_reason = DeferReason::Failed(why);
                    }
                    ServerVerdict::PermFailed(why) => {
                        tracing::info!(queue_id = %env.queue_id(), server = %server_key, outcome = "failed", reply = %why, "delivery attempt");
                        failed.extend(pending.drain(..).map(|r| (r, why.clone())));
                    }
                    ServerVerdict::StalledAfterDot(why) | ServerVerdict::Unknown(why) => {
                        tracing::warn!(queue_id = %env.queue_id(), server = %server_key, outcome = "unknown", reply = %why, "no usable reply to the final dot; deferring, the message may be delivered twice");
                        if stalled_after_dot {
                            self.health.mark_down(server, Fault::Stalled, &why, &self.transport);
                        }
                        pending.extend(elsewhere);
                        return Outcome::Deferred {
                            delivered,
                            failed,
                            relayed,
                            remaining: pending,
                            reason: DeferReason::MaybeDelivered(why),
                        };
                    }
                }
                break;
            }
            pending.extend(elsewhere);
        }
        if pending.is_empty() {
            Outcome::Done { delivered, failed, relayed }
        } else {
            Outcome::Deferred { delivered, failed, relayed, remaining: pending, reason: last_reason }
        }
    }
}
