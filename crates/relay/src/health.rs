//! Server health memory: a circuit breaker per server.
//!
//! A server that cannot be reached, does not greet with `220` or does not answer EHLO is
//! marked down at once and reported to the policy as down, so later messages go straight to
//! the next server or tier without a connection attempt (Postfix probes the dead server again
//! for every new connection). A background probe runs the same greeting every
//! `probe_interval` ([`Transport::probe`]); once it gets past it the server is marked up and
//! the relay retries the queued mail of its domains at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mxrelay_policy_core::Server;
use tokio::sync::mpsc;

use crate::outbound::Transport;
use crate::scheduler::Event;

#[derive(Debug, Clone)]
struct DownState {
    since: Instant,
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

    /// Whether the server is currently marked down.
    pub fn is_down(&self, server: &Server) -> bool {
        let down = self.lock();
        // Nearly always nothing is down: skip building the key.
        !down.is_empty() && down.contains_key(&key(server))
    }

    /// Indices of the servers in `servers` that are marked down.
    pub fn down_indices(&self, servers: &[Server]) -> Vec<u32> {
        let down = self.lock();
        if down.is_empty() {
            return Vec::new();
        }
        (0..servers.len() as u32).filter(|&i| down.contains_key(&key(&servers[i as usize]))).collect()
    }

    /// Marks a server down and starts probing it, unless it already is. Its idle connections
    /// are dropped: a server that cannot be reached keeps none for later messages.
    pub fn mark_down(&self, server: &Server, reason: &str, transport: &Arc<Transport>) {
        transport.forget(server);
        let newly = match self.lock().entry(key(server)) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(DownState { since: Instant::now() });
                true
            }
        };
        if newly {
            tracing::warn!(server = %key(server), reason, "server marked down; probing it in the background");
            metrics::gauge!("mxrelay_server_up", "server" => key(server)).set(0.0);
            let (health, server, transport) = (self.clone(), server.clone(), transport.clone());
            tokio::spawn(async move { health.probe_until_up(&server, &transport).await });
        }
    }

    /// Forgets that a server is down without announcing a recovery (an operator asked for a
    /// retry: the next delivery makes a real attempt, and marks it down again if it fails).
    pub fn clear(&self, server: &Server) {
        self.lock().remove(&key(server));
    }

    /// Marks a server up (a delivery to it succeeded).
    pub fn mark_up(&self, server: &Server) {
        let was = self.lock().remove(&key(server));
        if let Some(state) = was {
            tracing::info!(server = %key(server), down_for = ?state.since.elapsed(), "server is up again");
            metrics::gauge!("mxrelay_server_up", "server" => key(server)).set(1.0);
            let _ = self.events.send(Event::Recovered(key(server)));
        }
    }

    async fn probe_until_up(&self, server: &Server, transport: &Transport) {
        loop {
            tokio::time::sleep(self.probe_interval).await;
            if !self.is_down(server) {
                return; // a delivery found it up first
            }
            let answered = match transport.addresses(server).await {
                Ok(addrs) => {
                    let mut ok = false;
                    for addr in addrs {
                        if transport.probe(addr).await.is_ok() {
                            ok = true;
                            break;
                        }
                    }
                    ok
                }
                Err(_) => false,
            };
            if answered {
                self.mark_up(server);
                return;
            }
        }
    }
}
