//! The in-memory view of the queue: which envelope to deliver when.
//!
//! One task owns the schedule. Accepted mail is ready at once; a deferred envelope waits for
//! its retry delay, unless one of its domain's servers comes back up, which makes every
//! waiting envelope of that domain ready at once. Ready mail is taken in turn by domain.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::delivery::{DeferReason, Deliverer, Outcome};
use crate::dsn::{self, Action, RecipientStatus, Report};
use crate::health;
use crate::queue::{Envelope, Queue, now_ms};

/// Events the scheduler reacts to.
#[derive(Debug)]
pub enum Event {
    /// Newly accepted envelopes (already durable) with their data, so the first delivery
    /// need not read it back from disk.
    Accepted(Vec<Envelope>, Arc<Vec<u8>>),
    /// A delivery run ended.
    Finished(Box<Envelope>, Outcome),
    /// A server (by health key) answers again.
    Recovered(String),
    /// Retry now: one envelope, or every envelope of a domain, or everything; answers how many
    /// are retried, and how many in scope stay held.
    RetryNow(Scope, oneshot::Sender<Retried>),
    /// Report the queued envelopes in scope (for status and tests).
    Snapshot(Scope, oneshot::Sender<Vec<Envelope>>),
    /// Report how many envelopes are queued, and when the oldest arrived, per domain.
    Stats(oneshot::Sender<HashMap<String, QueueStats>>),
    /// Start no more deliveries; answer once those in flight have finished.
    Drain(oneshot::Sender<()>),
    /// Forget an envelope (operator's `queue remove`); answers whether it was queued.
    Remove(u64, oneshot::Sender<bool>),
    /// Hold (`true`) or release (`false`) the envelopes in scope (operator's `queue hold` and
    /// `queue release`); answers how many changed once the change is durable.
    Hold(Scope, bool, oneshot::Sender<Result<usize, String>>),
    /// Answered at once: the scheduler's loop is alive (the watchdog, `/healthz`).
    Ping(oneshot::Sender<()>),
}

/// Envelopes queued for one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// How many.
    pub size: usize,
    /// When the oldest arrived, ms since the epoch.
    pub oldest_ms: u64,
    /// How many of them an operator holds.
    pub held: usize,
}

/// What an operator's retry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Retried {
    /// Envelopes to be tried at once.
    pub retrying: usize,
    /// Envelopes in scope that an operator holds: a retry leaves them be.
    pub held: usize,
}

/// Which envelopes an operator's command applies to.
#[derive(Debug, Clone)]
pub enum Scope {
    /// One envelope by ID.
    Id(u64),
    /// Every envelope of a domain.
    Domain(String),
    /// Everything.
    All,
}

impl Scope {
    /// The one envelope's ID, for a scope of one.
    pub fn id(&self) -> Option<u64> {
        match self {
            Scope::Id(id) => Some(*id),
            Scope::Domain(_) | Scope::All => None,
        }
    }

    /// Whether `env` is in the scope.
    fn covers(&self, env: &Envelope) -> bool {
        match self {
            Scope::Id(id) => env.id == *id,
            Scope::Domain(d) => &env.domain == d,
            Scope::All => true,
        }
    }
}

/// Retry and notification policy from the config.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delays after the 1st, 2nd, ... failed attempt; the last repeats.
    pub schedule: Vec<Duration>,
    /// Give up (and tell the sender) after this long in the queue, unless the domain says
    /// otherwise ([`crate::policies::Policies::max_queue_lifetime`]).
    pub max_lifetime: Duration,
    /// Tell the sender once when a message is still queued after this long.
    pub delay_warning: Option<Duration>,
    /// The relay's name, as the notifications' reporting MTA.
    pub hostname: String,
}

impl RetryPolicy {
    fn delay(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.schedule.len().saturating_sub(1));
        self.schedule.get(i).copied().unwrap_or(Duration::from_secs(300))
    }
}

/// Envelopes due now, taken in turn by domain. In one queue in arrival order, a domain with a
/// large backlog (its server back after hours, or everything after a restart) would hold up
/// the mail of every other domain until the backlog was through, since its deliveries also
/// wait for the server's connection slots while they hold workers. Postfix's queue manager
/// takes destinations in turn for the same reason. Within a domain the order is arrival.
#[derive(Debug, Default)]
struct Ready {
    by_domain: HashMap<Arc<str>, VecDeque<u64>>,
    /// The domains with envelopes due, in turn order; each appears once. The names are
    /// shared with `by_domain`: one allocation when a domain comes due.
    turns: VecDeque<Arc<str>>,
}

impl Ready {
    fn push(&mut self, domain: &str, id: u64) {
        match self.by_domain.get_mut(domain) {
            Some(due) => due.push_back(id),
            None => {
                let name: Arc<str> = domain.into();
                self.by_domain.insert(name.clone(), VecDeque::from([id]));
                self.turns.push_back(name);
            }
        }
    }

    /// The envelope whose turn it is, left in place.
    fn next(&self) -> Option<u64> {
        self.by_domain.get(self.turns.front()?)?.front().copied()
    }

    /// Takes the envelope [`Ready::next`] names, and gives the turn to the next domain.
    fn take(&mut self) {
        let Some(domain) = self.turns.pop_front() else { return };
        let Some(due) = self.by_domain.get_mut(&domain) else { return };
        due.pop_front();
        if due.is_empty() {
            self.by_domain.remove(&domain);
        } else {
            self.turns.push_back(domain);
        }
    }
}

/// How much accepted data the scheduler keeps in memory for first deliveries (32 MiB). Past
/// it, as when intake outruns a slow server, a delivery reads its data back from the queue:
/// memory stays bounded however much mail waits.
const FRESH_DATA_BUDGET: usize = 32 << 20;

/// The data of accepted envelopes not yet tried, up to a budget in bytes, so that a first
/// delivery need not read it back from the queue.
#[derive(Debug)]
struct FreshData {
    by_id: HashMap<u64, Arc<Vec<u8>>>,
    /// Bytes kept, counted per envelope: a message split between domains is counted once per
    /// envelope, so the budget is never exceeded.
    bytes: usize,
    budget: usize,
}

impl FreshData {
    fn new(budget: usize) -> FreshData {
        FreshData { by_id: HashMap::new(), bytes: 0, budget }
    }

    /// Keeps the data of newly accepted `envelopes` (one message's), except those held on
    /// arrival: held mail waits for an operator, maybe for days, and its data on disk.
    fn keep_accepted(&mut self, envelopes: &[Envelope], data: &Arc<Vec<u8>>) {
        for env in envelopes.iter().filter(|e| !e.held) {
            self.keep(env.id, data);
        }
    }

    /// Keeps `data` for envelope `id` if it fits the budget; otherwise delivery reads it back.
    fn keep(&mut self, id: u64, data: &Arc<Vec<u8>>) {
        self.take(id);
        if self.bytes + data.len() <= self.budget {
            self.by_id.insert(id, data.clone());
            self.bytes += data.len();
        }
    }

    /// Hands over (or forgets) envelope `id`'s data, if kept.
    fn take(&mut self, id: u64) -> Option<Arc<Vec<u8>>> {
        let data = self.by_id.remove(&id)?;
        self.bytes -= data.len();
        Some(data)
    }
}

/// An operator's hold or release of the envelopes in `scope`; returns those it changed, as
/// they are now (to be written to the queue). Data kept for the first delivery of mail now
/// held is dropped: it may wait for days.
fn set_held(entries: &mut HashMap<u64, Envelope>, fresh: &mut FreshData, scope: &Scope, hold: bool) -> Vec<Envelope> {
    let mut changed = Vec::new();
    for e in entries.values_mut().filter(|e| scope.covers(e) && e.held != hold) {
        e.held = hold;
        if hold {
            fresh.take(e.id);
        }
        changed.push(e.clone());
    }
    changed
}

/// The scheduler's state and loop.
pub struct Scheduler {
    entries: HashMap<u64, Envelope>,
    /// Data of envelopes not yet tried, kept from intake for their first delivery.
    fresh: FreshData,
    in_flight: HashSet<u64>,
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    ready: Ready,
    workers: Arc<Semaphore>,
    deliverer: Arc<Deliverer>,
    queue: Queue,
    retry: RetryPolicy,
    events: mpsc::UnboundedSender<Event>,
    /// Set when shutting down: no new deliveries; told when the last one in flight ends.
    draining: Option<Vec<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("entries", &self.entries.len()).finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler holding `existing` (all ready now) that sends its own events to `events`.
    pub fn new(
        existing: Vec<Envelope>,
        workers: u32,
        deliverer: Arc<Deliverer>,
        queue: Queue,
        retry: RetryPolicy,
        events: mpsc::UnboundedSender<Event>,
    ) -> Scheduler {
        let mut s = Scheduler {
            entries: HashMap::new(),
            fresh: FreshData::new(FRESH_DATA_BUDGET),
            in_flight: HashSet::new(),
            timers: BinaryHeap::new(),
            ready: Ready::default(),
            workers: Arc::new(Semaphore::new(workers as usize)),
            deliverer,
            queue,
            retry,
            events,
            draining: None,
        };
        // After a restart everything queued is retried at once.
        s.accept(existing);
        s
    }

    fn accept(&mut self, envelopes: Vec<Envelope>) {
        for env in envelopes {
            self.ready.push(&env.domain, env.id);
            self.entries.insert(env.id, env);
        }
    }

    /// Runs until `rx` closes.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        loop {
            self.dispatch();
            let next = self.timers.peek().map(|Reverse((at, _))| *at);
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => return,
                },
                () = sleep => self.fire_timers(),
            }
        }
    }

    fn dispatch(&mut self) {
        if self.draining.is_some() {
            return;
        }
        while let Some(id) = self.ready.next() {
            if self.in_flight.contains(&id) || self.entries.get(&id).is_none_or(|e| e.held) {
                self.ready.take();
                continue;
            }
            let Ok(permit) = self.workers.clone().try_acquire_owned() else {
                return;
            };
            self.ready.take();
            let Some(env) = self.entries.get(&id).cloned() else {
                continue;
            };
            self.in_flight.insert(id);
            let (deliverer, queue, events) = (self.deliverer.clone(), self.queue.clone(), self.events.clone());
            let fresh = self.fresh.take(id);
            tokio::spawn(async move {
                let data = match fresh {
                    Some(data) => Ok(data),
                    None => queue.load_data(env.id).await.map(Arc::new),
                };
                let outcome = match data {
                    Ok(data) => deliverer.deliver(&env, &data).await,
                    Err(e) => Outcome::Deferred {
                        delivered: vec![],
                        failed: vec![],
                        relayed: vec![],
                        remaining: env.recipients.clone(),
                        reason: DeferReason::Failed(e.to_string()),
                    },
                };
                drop(permit);
                let _ = events.send(Event::Finished(Box::new(env), outcome));
            });
        }
    }

    fn fire_timers(&mut self) {
        let now = now_ms();
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(e) = self.entries.get(&id)
                && e.next_attempt_ms <= now
            {
                self.ready.push(&e.domain, id);
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Accepted(envs, data) => {
                self.fresh.keep_accepted(&envs, &data);
                self.accept(envs);
            }
            Event::Finished(env, outcome) => {
                self.finished(*env, outcome);
                // After the outcome's queue update is issued, so a drain's flush covers it.
                self.check_drained();
            }
            Event::Recovered(server_key) => {
                // Which domains list the server, decided once per domain, not per envelope.
                let policies = self.deliverer.policies();
                let mut lists_server: HashMap<&str, bool> = HashMap::new();
                let ids: Vec<u64> = self
                    .entries
                    .values()
                    .filter(|e| {
                        *lists_server.entry(e.domain.as_str()).or_insert_with(|| {
                            policies.domain(&e.domain).is_some_and(|p| p.servers().iter().any(|s| health::key(s) == server_key))
                        })
                    })
                    .map(|e| e.id)
                    .collect();
                tracing::info!(server = %server_key, queued = ids.len(), "server recovered; retrying its domains' queued mail now");
                self.retry_now(ids);
            }
            Event::RetryNow(scope, reply) => {
                let ids: Vec<u64> = self.entries.values().filter(|e| scope.covers(e)).map(|e| e.id).collect();
                // Every ID in scope is queued: those not retried are held.
                let in_scope = ids.len();
                let retrying = self.operator_retry(ids);
                let _ = reply.send(Retried { retrying, held: in_scope - retrying });
            }
            Event::Drain(done) => {
                self.draining.get_or_insert_with(Vec::new).push(done);
                self.check_drained();
            }
            Event::Remove(id, reply) => {
                // One in flight finishes its run; its outcome then finds no entry to keep.
                let known = self.entries.remove(&id).is_some();
                if known {
                    self.fresh.take(id);
                    self.queue.remove(id);
                    tracing::info!(queue_id = %crate::queue::format_id(id), "removed by the operator");
                }
                let _ = reply.send(known);
            }
            Event::Hold(scope, hold, reply) => {
                let changed = set_held(&mut self.entries, &mut self.fresh, &scope, hold);
                let ids: Vec<u64> = changed.iter().map(|e| e.id).collect();
                for e in changed {
                    tracing::info!(queue_id = %e.queue_id(), "{} by the operator", if hold { "held" } else { "released" });
                    self.queue.update(e);
                }
                let (queue, n) = (self.queue.clone(), ids.len());
                tokio::spawn(async move {
                    let _ = reply.send(queue.flush().await.map(|()| n).map_err(|e| e.to_string()));
                });
                if !hold {
                    self.operator_retry(ids);
                }
            }
            Event::Ping(reply) => {
                let _ = reply.send(());
            }
            Event::Stats(reply) => {
                let mut stats: HashMap<String, QueueStats> = HashMap::new();
                for e in self.entries.values() {
                    match stats.get_mut(&e.domain) {
                        Some(s) => {
                            s.size += 1;
                            s.oldest_ms = s.oldest_ms.min(e.received_ms);
                            s.held += usize::from(e.held);
                        }
                        None => {
                            let first = QueueStats { size: 1, oldest_ms: e.received_ms, held: usize::from(e.held) };
                            stats.insert(e.domain.clone(), first);
                        }
                    }
                }
                let _ = reply.send(stats);
            }
            Event::Snapshot(Scope::Id(id), reply) => {
                let _ = reply.send(self.entries.get(&id).cloned().into_iter().collect());
            }
            Event::Snapshot(scope, reply) => {
                let _ = reply.send(self.entries.values().filter(|e| scope.covers(e)).cloned().collect());
            }
        }
    }

    /// An operator's retry or release: real attempts now. The down marks of the servers
    /// involved are forgotten, so an attempt is not a deferral for "every server down" (a
    /// failing server is marked down again at once).
    /// Retries `ids` now, with their domains' servers' down marks forgotten; returns how many
    /// are retried (held ones are not).
    fn operator_retry(&mut self, ids: Vec<u64>) -> usize {
        let policies = self.deliverer.policies();
        let domains: HashSet<&str> = ids.iter().filter_map(|id| self.entries.get(id)).map(|e| e.domain.as_str()).collect();
        for domain in domains {
            for server in policies.domain(domain).map(|p| p.servers()).unwrap_or_default() {
                self.deliverer.health().clear(server);
            }
        }
        self.retry_now(ids)
    }

    /// Makes `ids` due now, except held ones; returns how many.
    fn retry_now(&mut self, ids: Vec<u64>) -> usize {
        let now = now_ms();
        let mut retried = 0;
        for id in ids {
            if let Some(e) = self.entries.get_mut(&id)
                && !e.held
            {
                e.next_attempt_ms = now;
                self.ready.push(&e.domain, id);
                retried += 1;
            }
        }
        retried
    }

    /// How long mail for `domain` is retried: its own setting, read from the policies in
    /// force so that a reload applies to mail already queued, or the default.
    fn max_lifetime(&self, domain: &str) -> Duration {
        self.deliverer.policies().max_queue_lifetime(domain).unwrap_or(self.retry.max_lifetime)
    }

    fn check_drained(&mut self) {
        if self.in_flight.is_empty()
            && let Some(waiting) = self.draining.as_mut()
        {
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }

    fn finished(&mut self, mut env: Envelope, outcome: Outcome) {
        self.in_flight.remove(&env.id);
        let Some(current) = self.entries.get(&env.id) else {
            return; // removed by the operator while in flight
        };
        // Held while in flight: what is left stays held.
        env.held = current.held;
        let (failed, relayed, rest) = match outcome {
            Outcome::Done { delivered, failed, relayed } => {
                tracing::debug!(queue_id = %env.queue_id(), delivered = delivered.len(), failed = failed.len(), "done");
                (failed, relayed, None)
            }
            Outcome::Deferred { failed, relayed, remaining, reason, .. } => (failed, relayed, Some((remaining, reason))),
        };
        for (rcpt, why) in &failed {
            tracing::warn!(queue_id = %env.queue_id(), rcpt, reason = %why, "permanent failure");
            metrics::counter!("mxrelay_failed_total").increment(1);
        }
        let statuses = |list: Vec<(String, String)>| -> Vec<RecipientStatus> {
            list.into_iter().map(|(recipient, diagnostic)| RecipientStatus { recipient, diagnostic, status: None }).collect()
        };
        let (mut failed, relayed) = (statuses(failed), statuses(relayed));
        let Some((remaining, reason)) = rest else {
            // Done: the original goes once its failures (if any) are reported.
            self.entries.remove(&env.id);
            self.fresh.take(env.id);
            self.notify(&env, vec![(Action::Relayed, relayed), (Action::Failed, failed)], true);
            return;
        };
        env.recipients = remaining;
        env.attempts += 1;
        env.last_error = Some(reason.to_string());
        let now = now_ms();
        let age = Duration::from_millis(now.saturating_sub(env.received_ms));
        if age >= self.max_lifetime(&env.domain) {
            tracing::warn!(queue_id = %env.queue_id(), rcpts = ?env.recipients, reason = %reason, "expired after max_queue_lifetime; giving up");
            metrics::counter!("mxrelay_expired_total").increment(1);
            self.entries.remove(&env.id);
            failed.extend(env.recipients.iter().map(|r| RecipientStatus {
                recipient: r.clone(),
                diagnostic: format!("delivery time expired: {reason}"),
                status: Some("4.4.7"),
            }));
            self.notify(&env, vec![(Action::Relayed, relayed), (Action::Failed, failed)], true);
        } else {
            let mut reports = vec![(Action::Relayed, relayed), (Action::Failed, failed)];
            if self.retry.delay_warning.is_some_and(|w| age >= w) && !env.warned {
                env.warned = true;
                let delayed = env
                    .recipients
                    .iter()
                    .map(|r| RecipientStatus { recipient: r.clone(), diagnostic: reason.to_string(), status: None })
                    .collect();
                reports.push((Action::Delayed, delayed));
            }
            self.notify(&env, reports, false);
            // A server may have come back while this run found them all down.
            let recovered = reason == DeferReason::AllServersDown && self.any_server_up(&env.domain);
            let delay = if recovered { Duration::ZERO } else { self.retry.delay(env.attempts) };
            env.next_attempt_ms = now + delay.as_millis() as u64;
            tracing::info!(queue_id = %env.queue_id(), attempts = env.attempts, retry_in = ?delay, reason = %reason, "deferred");
            metrics::counter!("mxrelay_deferred_total").increment(1);
            self.queue.update(env.clone());
            self.timers.push(Reverse((env.next_attempt_ms, env.id)));
            if recovered {
                self.ready.push(&env.domain, env.id);
            }
            self.entries.insert(env.id, env);
        }
    }

    /// Queues notifications to the sender of `env`, one per action with recipients that
    /// asked for it (their `NOTIFY`, or failures and delays by default), then removes the
    /// original from disk if `remove_original`. One task reads the original once for all of
    /// them, before removing it. Never a notification about a notification: those have the
    /// null sender.
    fn notify(&self, env: &Envelope, reports: Vec<(Action, Vec<RecipientStatus>)>, remove_original: bool) {
        let queue = self.queue.clone();
        let reports: Vec<(Action, Vec<RecipientStatus>)> = reports
            .into_iter()
            .map(|(action, recipients)| {
                let (wanted, unwanted): (Vec<_>, Vec<_>) =
                    recipients.into_iter().partition(|r| dsn::wanted(env.dsn.as_deref(), &r.recipient, action));
                if !unwanted.is_empty() {
                    let rcpts: Vec<&str> = unwanted.iter().map(|r| r.recipient.as_str()).collect();
                    tracing::info!(queue_id = %env.queue_id(), ?action, ?rcpts, "no notification: the sender's NOTIFY does not ask for it");
                }
                (action, wanted)
            })
            .filter(|(_, recipients)| !recipients.is_empty())
            .collect();
        if reports.is_empty() || env.sender.is_empty() {
            if !reports.is_empty() {
                tracing::info!(queue_id = %env.queue_id(), "no notification for a message with the null sender");
            }
            if remove_original {
                queue.remove(env.id);
            }
            return;
        }
        let Some((_, sender_domain)) = env.sender.rsplit_once('@') else {
            tracing::warn!(queue_id = %env.queue_id(), sender = %env.sender, "sender has no domain; no notification");
            if remove_original {
                queue.remove(env.id);
            }
            return;
        };
        let sender_domain = sender_domain.trim_end_matches('.').to_ascii_lowercase();
        let (events, hostname, env) = (self.events.clone(), self.retry.hostname.clone(), env.clone());
        let retry_until_secs = (env.received_ms + self.max_lifetime(&env.domain).as_millis() as u64) / 1000;
        tokio::spawn(async move {
            // Reading the original before it is removed: its headers go into the reports.
            let original = queue.load_data(env.id).await.unwrap_or_default();
            let queue_id = env.queue_id();
            for (action, recipients) in reports {
                let now = now_ms();
                let report = Report {
                    action,
                    reporting_mta: &hostname,
                    queue_id: &queue_id,
                    arrival_secs: env.received_ms / 1000,
                    now_secs: now / 1000,
                    retry_until_secs: (action == Action::Delayed).then_some(retry_until_secs),
                    sender: &env.sender,
                    recipients: &recipients,
                    request: env.dsn.as_deref(),
                };
                let body = Arc::new(dsn::build(&report, &original));
                let notice = Envelope {
                    id: queue.next_id(),
                    sender: String::new(),
                    domain: sender_domain.clone(),
                    recipients: vec![env.sender.clone()],
                    received_ms: now,
                    attempts: 0,
                    next_attempt_ms: now,
                    last_error: None,
                    size: body.len() as u64,
                    warned: true,
                    dsn: None,
                    held: false,
                };
                match queue.insert(vec![(notice.clone(), body.clone())]).await {
                    Ok(()) => {
                        tracing::info!(queue_id = %env.queue_id(), notice = %notice.queue_id(), sender = %env.sender, ?action, "delivery status notification queued");
                        metrics::counter!("mxrelay_notifications_total").increment(1);
                        let _ = events.send(Event::Accepted(vec![notice], body));
                    }
                    Err(e) => tracing::error!(queue_id = %env.queue_id(), error = %e, "could not queue the notification"),
                }
            }
            if remove_original {
                queue.remove(env.id);
            }
        });
    }

    fn any_server_up(&self, domain: &str) -> bool {
        let policies = self.deliverer.policies();
        policies.domain(domain).is_some_and(|p| p.servers().iter().any(|s| !self.deliverer.health().is_down(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backlog of one domain does not hold up another's mail: domains take turns, and each
    /// domain's mail goes in arrival order.
    #[test]
    fn ready_mail_is_taken_in_turn_by_domain() {
        let mut ready = Ready::default();
        for id in 1..=5 {
            ready.push("backlog.test", id);
        }
        ready.push("fresh.test", 100);
        ready.push("other.test", 200);
        ready.push("fresh.test", 101);
        let mut order = Vec::new();
        while let Some(id) = ready.next() {
            ready.take();
            order.push(id);
        }
        assert_eq!(order, [1, 100, 200, 2, 101, 3, 4, 5]);
        assert!(ready.by_domain.is_empty() && ready.turns.is_empty(), "nothing left behind");
        // A domain whose mail arrives while another's is being taken gets the next turn but one.
        for id in 6..=8 {
            ready.push("backlog.test", id);
        }
        ready.take();
        ready.push("fresh.test", 102);
        let mut order = Vec::new();
        while let Some(id) = ready.next() {
            ready.take();
            order.push(id);
        }
        assert_eq!(order, [7, 102, 8]);
    }

    #[test]
    fn fresh_data_stays_within_its_budget_and_counts_what_it_hands_over() {
        let data = |len: usize| Arc::new(vec![b'x'; len]);
        let mut fresh = FreshData::new(100);
        fresh.keep(1, &data(60));
        fresh.keep(2, &data(60));
        assert!(fresh.take(2).is_none(), "kept past the budget");
        fresh.keep(3, &data(40));
        assert_eq!(fresh.bytes, 100);
        assert_eq!(fresh.take(1).map(|d| d.len()), Some(60));
        assert!(fresh.take(1).is_none(), "handed over twice");
        assert_eq!(fresh.bytes, 40);
        fresh.keep(4, &data(60));
        assert_eq!(fresh.bytes, 100, "room freed by a hand-over is used again");
        fresh.keep(3, &data(10));
        assert_eq!(fresh.bytes, 70, "kept again: the old data no longer counts");
    }

    fn envelope(id: u64, held: bool) -> Envelope {
        Envelope {
            id,
            sender: "a@src.test".into(),
            domain: if held { "held.test" } else { "customer.test" }.into(),
            recipients: vec!["u@x.test".into()],
            received_ms: 0,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            size: 10,
            warned: false,
            dsn: None,
            held,
        }
    }

    #[test]
    fn the_data_of_mail_held_on_arrival_is_not_kept() {
        let mut fresh = FreshData::new(1000);
        fresh.keep_accepted(&[envelope(1, false), envelope(2, true)], &Arc::new(vec![b'x'; 10]));
        assert!(fresh.take(2).is_none(), "held mail's data kept in memory");
        assert!(fresh.take(1).is_some());
        assert_eq!(fresh.bytes, 0);
    }

    /// An operator's hold drops what was kept for the first delivery; a release keeps
    /// nothing new, and mail outside the scope keeps its data.
    #[test]
    fn an_operators_hold_drops_the_data_kept_for_the_held_mail() {
        let mut entries: HashMap<u64, Envelope> = (1..=3).map(|id| (id, envelope(id, false))).collect();
        let mut fresh = FreshData::new(1000);
        for id in 1..=3 {
            fresh.keep(id, &Arc::new(vec![b'x'; 10]));
        }
        let ids = |changed: Vec<Envelope>| -> Vec<u64> {
            let mut ids: Vec<u64> = changed.iter().map(|e| e.id).collect();
            ids.sort_unstable();
            ids
        };
        let changed = set_held(&mut entries, &mut fresh, &Scope::Id(2), true);
        assert!(changed.iter().all(|e| e.held), "returned as they are now");
        assert_eq!(ids(changed), [2]);
        assert!(entries[&2].held);
        assert_eq!(fresh.bytes, 20, "the held message's data still kept");
        assert!(fresh.take(2).is_none());
        assert_eq!(ids(set_held(&mut entries, &mut fresh, &Scope::All, true)), [1, 3], "only what changes is reported");
        assert_eq!(fresh.bytes, 0);
        assert_eq!(ids(set_held(&mut entries, &mut fresh, &Scope::Id(2), false)), [2]);
        assert!(!entries[&2].held);
    }
}
