//! Server health memory: a circuit breaker per server.
//!
//! A server that cannot be reached, does not greet with `220` or does not answer EHLO is
//! marked down at once and reported to the policy as down, so later messages go straight to
//! the next server or tier without a connection attempt (Postfix probes the dead server again
//! for every new connection). A background probe runs the same greeting every
//! `probe_interval` ([`Transport::probe`]); once it gets past it the server is marked up and
//! the relay retries the queued mail of its domains at once.
//!
//! A server that greets but then stops answering in a transaction ([`Fault::Stalled`]) is
//! marked down too, but a greeting cannot show that it answers again. Once the probe gets
//! past the greeting, the circuit is half open: one delivery at a time is let through as a
//! trial while the others keep going elsewhere, and the server is up again when the trial
//! gets an answer. Without this, every message sent to it after the probe would wait the
//! whole command timeout.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mxrelay_policy_core::Server;
use tokio::sync::mpsc;

use crate::outbound::Transport;
use crate::scheduler::Event;

/// Why a server was marked down, which decides what brings it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No session: the connection failed, or no `220` greeting, or no answer to EHLO. The
    /// probe checks exactly this, so a probe that gets through brings the server back.
    Unreachable,
    /// A session, then silence mid-transaction (no reply within the command timeout, the
    /// data not taken, or no reply to the final dot). Brought back by a trial delivery.
    Stalled,
}

impl Fault {
    /// The `fault` label of `mxrelay_server_marked_down_total`.
    fn label(self) -> &'static str {
        match self {
            Fault::Unreachable => "unreachable",
            Fault::Stalled => "stalled",
        }
    }
}

/// Where a down server is on its way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// The background probe runs.
    Probing,
    /// A stalled server greets again: the next delivery to it is a trial.
    TrialOpen,
    /// A delivery holds the trial; the others pass the server over.
    TrialTaken,
}

#[derive(Debug, Clone)]
struct DownState {
    since: Instant,
    fault: Fault,
    recovery: Recovery,
}

impl DownState {
    /// Whether deliveries and the policy see the server as down. An open trial is not: the
    /// policy plans the server in its place, and the first delivery that reaches it takes
    /// the trial.
    fn passes_over(&self) -> bool {
        match self.recovery {
            Recovery::Probing | Recovery::TrialTaken => true,
            Recovery::TrialOpen => false,
        }
    }
}

/// Whether a delivery may use a server ([`Health::admit`]).
#[derive(Debug)]
pub enum Admission {
    /// The server is up.
    Up,
    /// The server stalled and greets again: this delivery is its trial.
    Trial(Trial),
    /// The server is down, or another delivery holds its trial: pass it over.
    Down,
}

/// A delivery's hold on a stalled server's trial. Dropped without [`Trial::passed`] (the
/// delivery was cancelled, or failed and marked the server down again), the trial is open
/// for the next delivery, unless the server was marked down again.
#[derive(Debug)]
pub struct Trial {
    health: Health,
    key: String,
}

impl Trial {
    /// The server answered: it is up again.
    pub fn passed(self) {
        self.health.mark_up_key(&self.key);
    }
}

impl Drop for Trial {
    fn drop(&mut self) {
        if let Some(state) = self.health.lock().get_mut(&self.key)
            && state.recovery == Recovery::TrialTaken
        {
            state.recovery = Recovery::TrialOpen;
        }
    }
}

/// Which servers are down, shared by every delivery.
#[derive(Debug, Clone)]
pub struct Health {
    down: Arc<Mutex<HashMap<String, DownState>>>,
    events: mpsc::UnboundedSender<Event>,
    probe_interval: Duration,
}

/// The key health is kept under: `host:port`.
pub fn key(server: &Server) -> String {
    server.address()
}

impl Health {
    /// Health memory that tells the scheduler when a server (by key) answers again.
    pub fn new(probe_interval: Duration, events: mpsc::UnboundedSender<Event>) -> Health {
        Health { down: Arc::default(), events, probe_interval }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DownState>> {
        self.down.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether deliveries pass the server over: it is marked down, and no trial is open.
    pub fn is_down(&self, server: &Server) -> bool {
        let down = self.lock();
        // Nearly always nothing is down: skip building the key.
        !down.is_empty() && down.get(&key(server)).is_some_and(DownState::passes_over)
    }

    /// Indices of the servers in `servers` that deliveries pass over ([`Health::is_down`]).
    pub fn down_indices(&self, servers: &[Server]) -> Vec<u32> {
        let down = self.lock();
        if down.is_empty() {
            return Vec::new();
        }
        (0..servers.len() as u32).filter(|&i| down.get(&key(&servers[i as usize])).is_some_and(DownState::passes_over)).collect()
    }

    /// Whether a delivery may use the server now; takes the trial when one is open.
    pub fn admit(&self, server: &Server) -> Admission {
        let mut down = self.lock();
        if down.is_empty() {
            return Admission::Up;
        }
        let key = key(server);
        match down.get_mut(&key) {
            None => Admission::Up,
            Some(state) => match state.recovery {
                Recovery::TrialOpen => {
                    state.recovery = Recovery::TrialTaken;
                    drop(down);
                    tracing::info!(server = %key, "trial delivery to a server that stalled");
                    Admission::Trial(Trial { health: self.clone(), key })
                }
                Recovery::Probing | Recovery::TrialTaken => Admission::Down,
            },
        }
    }

    /// Marks a server down and starts probing it, unless a probe already runs. Its idle
    /// connections are dropped: a server that failed keeps none for later messages. A
    /// server that stalled once needs a trial to come back, even if it later also fails to
    /// connect.
    pub fn mark_down(&self, server: &Server, fault: Fault, reason: &str, transport: &Arc<Transport>) {
        transport.forget(server);
        let key = key(server);
        let probe = match self.lock().entry(key.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(DownState { since: Instant::now(), fault, recovery: Recovery::Probing });
                tracing::warn!(server = %key, reason, "server marked down; probing it in the background");
                metrics::gauge!("mxrelay_server_up", "server" => key.clone()).set(0.0);
                true
            }
            Entry::Occupied(mut slot) => {
                let state = slot.get_mut();
                if fault == Fault::Stalled {
                    state.fault = Fault::Stalled;
                }
                match state.recovery {
                    Recovery::Probing => false,
                    Recovery::TrialOpen | Recovery::TrialTaken => {
                        state.recovery = Recovery::Probing;
                        tracing::warn!(server = %key, reason, "trial delivery failed; server down again, probing it");
                        true
                    }
                }
            }
        };
        if probe {
            metrics::counter!("mxrelay_server_marked_down_total", "server" => key, "fault" => fault.label()).increment(1);
            let (health, server, transport) = (self.clone(), server.clone(), transport.clone());
            tokio::spawn(async move { health.probe_until_back(&server, &transport).await });
        }
    }

    /// Forgets that a server is down without announcing a recovery (an operator asked for a
    /// retry: the next delivery makes a real attempt, and marks it down again if it fails).
    pub fn clear(&self, server: &Server) {
        self.lock().remove(&key(server));
    }

    /// Marks a server up: it answers again.
    fn mark_up_key(&self, key: &str) {
        let was = self.lock().remove(key);
        if let Some(state) = was {
            tracing::info!(server = %key, down_for = ?state.since.elapsed(), "server is up again");
            metrics::gauge!("mxrelay_server_up", "server" => key.to_string()).set(1.0);
            let _ = self.events.send(Event::Recovered(key.to_string()));
        }
    }

    /// Probes every `probe_interval` until the server greets: then it is up, or, if it
    /// stalled, its trial is open.
    async fn probe_until_back(&self, server: &Server, transport: &Transport) {
        let key = key(server);
        loop {
            tokio::time::sleep(self.probe_interval).await;
            if !self.lock().get(&key).is_some_and(|state| state.recovery == Recovery::Probing) {
                return; // cleared by an operator
            }
            let answered = match transport.addresses(server).await {
                Ok(mut addrs) => {
                    let mut ok = false;
                    while let Some(addr) = addrs.next().await {
                        if transport.probe(addr).await.is_ok() {
                            ok = true;
                            break;
                        }
                    }
                    ok
                }
                Err(_) => false,
            };
            if !answered {
                continue;
            }
            // The fault as it is now: a delivery in flight during the probe may have stalled.
            let mut down = self.lock();
            match down.get_mut(&key) {
                Some(state) if state.recovery == Recovery::Probing => match state.fault {
                    Fault::Unreachable => {
                        drop(down);
                        self.mark_up_key(&key);
                    }
                    Fault::Stalled => {
                        state.recovery = Recovery::TrialOpen;
                        drop(down);
                        tracing::info!(server = %key, "a server that stalled greets again; the next delivery to it is a trial");
                    }
                },
                Some(_) | None => {} // cleared by an operator, or another probe got there first
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that greets and answers EHLO on every connection, as a stalled one may.
    async fn greeting_server() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = stream.write_all(b"220 fake ESMTP\r\n").await;
                    let mut buf = [0u8; 512];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(b"250 fake\r\n").await;
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        Server { port, ..Server::new("127.0.0.1", 10) }
    }

    /// A greeting server, a transport, health memory probing every 10 ms, and its events.
    async fn scene() -> (Server, Arc<Transport>, Health, mpsc::UnboundedReceiver<Event>) {
        let text = "[relay]\nhostname = \"relay.test\"\nlisten = [\"127.0.0.1:2525\"]\nqueue = \"q\"\n\n[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"192.0.2.1\"\n";
        let config = crate::config::Config::parse(std::path::Path::new("relay.toml"), text).expect("config");
        let transport = Arc::new(Transport::new("relay.test", &config.delivery));
        let (events, recovered) = mpsc::unbounded_channel();
        (greeting_server().await, transport, Health::new(Duration::from_millis(10), events), recovered)
    }

    /// Waits for the background probe to open the trial: the state changes on its own task.
    async fn trial_opens(health: &Health, server: &Server) -> Trial {
        for _ in 0..500 {
            match health.admit(server) {
                Admission::Trial(trial) => return trial,
                Admission::Down => tokio::time::sleep(Duration::from_millis(10)).await,
                Admission::Up => panic!("a stalled server came back without a trial"),
            }
        }
        panic!("no trial within 5 s of a greeting probe");
    }

    /// The server key of the next event, which must be a recovery.
    async fn recovery(events: &mut mpsc::UnboundedReceiver<Event>) -> String {
        match events.recv().await {
            Some(Event::Recovered(key)) => key,
            other => panic!("expected a recovery event: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stalled_server_comes_back_through_one_trial_at_a_time() {
        let (server, transport, health, mut recovered) = scene().await;

        health.mark_down(&server, Fault::Stalled, "stalled", &transport);
        assert!(health.is_down(&server));
        let trial = trial_opens(&health, &server).await;
        // While one delivery holds the trial, the others and the policy pass the server over.
        assert!(matches!(health.admit(&server), Admission::Down));
        assert!(health.is_down(&server) && health.down_indices(std::slice::from_ref(&server)) == [0]);
        assert!(recovered.try_recv().is_err(), "greeting again is not a recovery");

        // A trial dropped undecided (its delivery was cancelled) opens the trial again.
        drop(trial);
        assert!(!health.is_down(&server) && health.down_indices(std::slice::from_ref(&server)).is_empty());
        let trial = match health.admit(&server) {
            Admission::Trial(trial) => trial,
            other @ (Admission::Up | Admission::Down) => panic!("the trial should be open again: {other:?}"),
        };

        // A trial that stalls again: down, probed, and another trial later.
        health.mark_down(&server, Fault::Stalled, "stalled again", &transport);
        drop(trial);
        assert!(matches!(health.admit(&server), Admission::Down), "down again, not reopened by the failed trial");
        let trial = trial_opens(&health, &server).await;

        // An answer brings it back, and its domains' queued mail is retried.
        trial.passed();
        assert!(matches!(health.admit(&server), Admission::Up));
        assert_eq!(recovery(&mut recovered).await, server.address());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_up_once_it_greets_and_a_stall_is_not_forgotten() {
        let (server, transport, health, mut recovered) = scene().await;

        health.mark_down(&server, Fault::Unreachable, "refused", &transport);
        assert_eq!(recovery(&mut recovered).await, server.address());
        assert!(matches!(health.admit(&server), Admission::Up), "up with no trial");

        // Stalled, then unreachable while down: it still needs a trial.
        health.mark_down(&server, Fault::Stalled, "stalled", &transport);
        health.mark_down(&server, Fault::Unreachable, "refused", &transport);
        let _trial = trial_opens(&health, &server).await;
    }
}
