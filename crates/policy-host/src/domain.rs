//! One domain's policy as the relay uses it: the domain's router in a live component
//! instance (shared with other domains of a built-in policy), checked on every call, with the
//! native core as the fail-safe.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mxrelay_policy_core::{self as core, PlanInput};

use crate::engine::PolicyComponent;
use crate::error::PolicyError;
use crate::shared::{DomainRouter, RouterSpec, SharedInstance};
use crate::{Envelope, Message};

/// Consecutive failures after which a component is set aside for [`COOL_DOWN`].
const FAILURES_BEFORE_COOL_DOWN: u32 = 3;
/// How long a failing component is left out before it is tried again.
const COOL_DOWN: Duration = Duration::from_secs(30);

/// Where a plan came from.
#[derive(Debug, Clone)]
pub enum PlanSource {
    /// The domain's policy component answered and its plan passed the checks.
    Component,
    /// The component failed (or is cooling down after failures); the built-in core planned.
    Fallback(PolicyError),
}

/// One message, as the relay describes it; borrowed, so a call copies only what the policy
/// reads.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    /// Seed for the policy's randomness.
    pub seed: u64,
    /// 1 for the first attempt, then 2, 3, ...
    pub attempt: u32,
    /// The clock, ms since the epoch.
    pub now_ms: u64,
    /// Servers known to be down.
    pub down: &'a [u32],
    /// Recipients for this domain.
    pub recipients: &'a [String],
    /// Envelope sender (empty for `<>`).
    pub sender: &'a str,
    /// Size in bytes.
    pub size: u64,
}

impl PlanRequest<'_> {
    /// The WIT message, with the envelope only if the router reads it.
    fn message(&self, wants_envelope: bool) -> Message {
        Message {
            seed: self.seed,
            attempt: self.attempt,
            now_ms: self.now_ms,
            down: self.down.to_vec(),
            envelope: wants_envelope.then(|| Envelope {
                recipients: self.recipients.to_vec(),
                sender: self.sender.to_string(),
                size: self.size,
            }),
        }
    }
}

/// A checked plan: every server index exactly once, in the order to try them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Indices into the domain's server list.
    pub order: Vec<u32>,
    /// Whether the component or the fail-safe produced it.
    pub source: PlanSource,
}

#[derive(Default)]
struct State {
    /// The domain's router in its shared instance; none until the first call after a
    /// failure dropped the instance.
    router: Option<DomainRouter>,
    consecutive_failures: u32,
    cooling_until: Option<Instant>,
    last_error: Option<PolicyError>,
}

/// A domain's server list bound to its policy component, with its router in an instance it
/// may share with other domains of the same component (see [`PolicyComponent`]).
pub struct DomainPolicy {
    component: PolicyComponent,
    domain: String,
    settings_json: String,
    fallback: core::Router,
    instance: Arc<SharedInstance>,
    state: Mutex<State>,
}

impl std::fmt::Debug for DomainPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainPolicy")
            .field("component", &self.component.name())
            .field("servers", &self.fallback.servers())
            .finish_non_exhaustive()
    }
}

impl DomainPolicy {
    /// Builds the domain's router in an instance of the component (started if need be);
    /// fails if either fails (e.g. the policy refuses the settings), so a bad configuration
    /// is refused at load time.
    pub fn new(
        component: PolicyComponent,
        domain: &str,
        servers: Vec<core::Server>,
        settings_json: String,
    ) -> Result<Self, PolicyError> {
        let instance = component.pool.join();
        let mut policy = DomainPolicy {
            component,
            domain: domain.to_string(),
            settings_json,
            fallback: core::Router::new(servers),
            instance,
            state: Mutex::default(),
        };
        // On an error the policy is dropped, and with it its place in the instance.
        let router = policy.instance.make_router(&policy.spec())?;
        policy.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).router = Some(router);
        Ok(policy)
    }

    fn spec(&self) -> RouterSpec<'_> {
        RouterSpec {
            component: &self.component,
            domain: &self.domain,
            servers: self.fallback.servers(),
            settings_json: &self.settings_json,
        }
    }

    /// The domain this policy routes.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether the component is set aside after repeated failures (the core plans meanwhile).
    pub fn is_cooling_down(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.cooling_until.is_some_and(|until| Instant::now() < until)
    }

    /// The policy component (to build the domain again with other servers).
    pub fn component(&self) -> &PolicyComponent {
        &self.component
    }

    /// The domain's policy settings, as JSON.
    pub fn settings_json(&self) -> &str {
        &self.settings_json
    }

    /// The policy component's name.
    pub fn policy_name(&self) -> &str {
        self.component.name()
    }

    /// The native router over the same servers: tiers and shares for display, and the fail-safe.
    pub fn router(&self) -> &core::Router {
        &self.fallback
    }

    /// The domain's servers; plan indices point into this.
    pub fn servers(&self) -> &[core::Server] {
        self.fallback.servers()
    }

    /// The plan for one message. Never fails: when the component cannot answer, or answers
    /// with an invalid plan, the built-in core plans instead and the source says why.
    pub fn plan(&self, request: &PlanRequest<'_>) -> Plan {
        let error = match self.try_component(request) {
            Ok(order) => {
                return Plan { order, source: PlanSource::Component };
            }
            Err(e) => e,
        };
        let input = PlanInput { seed: request.seed, attempt: request.attempt, now_ms: request.now_ms, down: request.down };
        Plan { order: self.fallback.plan(&input), source: PlanSource::Fallback(error) }
    }

    fn try_component(&self, request: &PlanRequest<'_>) -> Result<Vec<u32>, PolicyError> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = state.cooling_until {
            if Instant::now() < until {
                return Err(state.last_error.clone().unwrap_or(PolicyError::Poisoned { name: self.component.name().into() }));
            }
            state.cooling_until = None;
        }
        // After a failure the instance was dropped: the call starts a fresh one, and makes
        // the router again in it.
        let result = self.instance.with_router(&self.spec(), &mut state.router, |instance, router| {
            instance.plan(router, &request.message(router.wants_envelope()))
        });
        match result {
            Ok(plan) => {
                state.consecutive_failures = 0;
                Ok(plan)
            }
            Err(e) => {
                tracing::warn!(policy = self.component.name(), error = %e, "policy call failed; planned by the built-in core");
                // The instance was dropped (`with_router`): a trapped one is unusable, and an
                // invalid plan makes it suspect.
                state.consecutive_failures += 1;
                if state.consecutive_failures >= FAILURES_BEFORE_COOL_DOWN {
                    state.cooling_until = Some(Instant::now() + COOL_DOWN);
                }
                state.last_error = Some(e.clone());
                Err(e)
            }
        }
    }
}

impl Drop for DomainPolicy {
    fn drop(&mut self) {
        // The router's memory in a shared instance is freed with it, not with the instance.
        let state = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.instance.release(state.router.take());
    }
}
