//! One domain's policy as the relay uses it: a live component instance with the domain's
//! router, checked on every call, with the native core as the fail-safe.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mxrelay_policy_core::{self as core, PlanInput};

use crate::Message;
use crate::engine::{PolicyComponent, PolicyInstance, RouterHandle};
use crate::error::PolicyError;

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

/// A checked plan: every server index exactly once, in the order to try them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Indices into the domain's server list.
    pub order: Vec<u32>,
    /// Whether the component or the fail-safe produced it.
    pub source: PlanSource,
}

struct Live {
    instance: PolicyInstance,
    router: RouterHandle,
}

#[derive(Default)]
struct State {
    live: Option<Live>,
    consecutive_failures: u32,
    cooling_until: Option<Instant>,
    last_error: Option<PolicyError>,
}

/// A domain's server list bound to its policy component.
pub struct DomainPolicy {
    component: PolicyComponent,
    settings_json: String,
    fallback: core::Router,
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
    /// Instantiates the component and builds its router; fails if either fails (e.g. the
    /// policy refuses the settings), so a bad configuration is refused at load time.
    pub fn new(component: PolicyComponent, servers: Vec<core::Server>, settings_json: String) -> Result<Self, PolicyError> {
        let fallback = core::Router::new(servers);
        let live = start(&component, fallback.servers(), &settings_json)?;
        Ok(DomainPolicy { component, settings_json, fallback, state: Mutex::new(State { live: Some(live), ..State::default() }) })
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
    pub fn plan(&self, msg: &Message) -> Plan {
        let error = match self.try_component(msg) {
            Ok(order) => {
                return Plan { order, source: PlanSource::Component };
            }
            Err(e) => e,
        };
        let input = PlanInput { seed: msg.seed, attempt: msg.attempt, now_ms: msg.now_ms, down: &msg.down };
        Plan { order: self.fallback.plan(&input), source: PlanSource::Fallback(error) }
    }

    fn try_component(&self, msg: &Message) -> Result<Vec<u32>, PolicyError> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = state.cooling_until {
            if Instant::now() < until {
                return Err(state.last_error.clone().unwrap_or(PolicyError::Poisoned { name: self.component.name().into() }));
            }
            state.cooling_until = None;
        }
        let result = match state.live.as_mut() {
            Some(live) => live.instance.plan(&live.router, msg),
            None => start(&self.component, self.fallback.servers(), &self.settings_json)
                .and_then(|mut live| live.instance.plan(&live.router, msg).map(|plan| (plan, live)))
                .map(|(plan, live)| {
                    state.live = Some(live);
                    plan
                }),
        };
        match result {
            Ok(plan) => {
                state.consecutive_failures = 0;
                Ok(plan)
            }
            Err(e) => {
                tracing::warn!(policy = self.component.name(), error = %e, "policy call failed; planned by the built-in core");
                // A trapped instance is unusable; an invalid plan makes the instance suspect.
                state.live = None;
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

fn start(component: &PolicyComponent, servers: &[core::Server], settings_json: &str) -> Result<Live, PolicyError> {
    let mut instance = component.instantiate()?;
    let router = instance.router(servers, settings_json)?;
    Ok(Live { instance, router })
}
