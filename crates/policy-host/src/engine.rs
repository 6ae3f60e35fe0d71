//! The wasmtime engine, its limits, compiled components and live instances.

use std::sync::Arc;
use std::time::Duration;

use mxrelay_policy_core as core;
use wasmtime::component::{Component, Linker, ResourceAny};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline};

use crate::bindings::{Policy, PolicyPre};
use crate::convert;
use crate::error::{PolicyError, check_plan};
use crate::shared::InstancePool;
use crate::ticker::{Call, TICK, Ticker};
use crate::{BUILTIN_COMPONENT, Message};

/// Limits applied to every policy call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time a single call may use before it is interrupted, counted from the first epoch
    /// tick the call runs into (0-5 ms after it starts; reading the thread's CPU clock on
    /// every call would cost more than the call). CPU time, not wall time: a call runs on
    /// its caller's thread and never waits (the world imports nothing), so wall time beyond
    /// its CPU time is the machine's load, which must not fail it.
    pub call_deadline: Duration,
    /// Largest linear memory an instance may grow to.
    pub max_memory_bytes: usize,
    /// Enforce `call_deadline` with epoch interruption. Turn off only for trusted code or to
    /// measure what the deadline costs; without it an endless loop hangs the caller.
    pub interruptible: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { call_deadline: Duration::from_millis(50), max_memory_bytes: 16 << 20, interruptible: true }
    }
}

struct EngineInner {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: Limits,
    ticker: Arc<Ticker>,
    /// The built-in policy, compiled on first use and shared by every domain and reload.
    builtin: std::sync::OnceLock<PolicyPre<StoreState>>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// A wasmtime engine configured for policies: epoch interruption driven by a 5 ms ticker
/// thread that runs while calls are made (at each deadline the call's CPU time is checked
/// against its budget), and memory caps. Cheap to clone; the ticker stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<EngineInner>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine").field("limits", &self.inner.limits).finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Creates an engine and starts its epoch ticker.
    pub fn new(limits: Limits) -> Result<Self, PolicyError> {
        let mut config = Config::new();
        config.epoch_interruption(limits.interruptible);
        config.max_wasm_stack(512 << 10);
        let engine = Engine::new(&config).map_err(|e| load_error("engine", &e))?;
        // The world imports nothing, so the linker stays empty: a policy gets no capabilities.
        let linker = Linker::new(&engine);
        let ticker = Ticker::start(engine.weak())
            .map_err(|e| PolicyError::Load { name: "engine".into(), reason: format!("cannot start epoch ticker: {e}") })?;
        let inner = EngineInner { engine, linker, limits, ticker, builtin: std::sync::OnceLock::new() };
        Ok(PolicyEngine { inner: Arc::new(inner) })
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Whether the epoch ticker sleeps: no call has been made for a second. The next call
    /// wakes it.
    pub fn is_idle(&self) -> bool {
        self.inner.ticker.is_asleep()
    }

    /// The built-in policy; compiled once per engine (about 80 ms), then shared.
    pub fn builtin(&self) -> Result<PolicyComponent, PolicyError> {
        let pre = match self.inner.builtin.get() {
            Some(pre) => pre.clone(),
            None => {
                let pre = self.compile("builtin", BUILTIN_COMPONENT)?;
                self.inner.builtin.get_or_init(|| pre).clone()
            }
        };
        Ok(PolicyComponent::new(self.clone(), pre, "builtin", BUILTIN_DOMAINS_PER_INSTANCE))
    }

    /// Compiles and pre-instantiates a policy component; fails unless it implements the world.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<PolicyComponent, PolicyError> {
        let pre = self.compile(name, bytes)?;
        Ok(PolicyComponent::new(self.clone(), pre, name, 1))
    }

    fn compile(&self, name: &str, bytes: &[u8]) -> Result<PolicyPre<StoreState>, PolicyError> {
        if let Some(reason) = not_a_component(bytes) {
            return Err(PolicyError::Load { name: name.into(), reason: reason.into() });
        }
        let component = Component::new(&self.inner.engine, bytes).map_err(|e| load_error(name, &e))?;
        let instance_pre = self.inner.linker.instantiate_pre(&component).map_err(|e| load_error(name, &e))?;
        PolicyPre::new(instance_pre).map_err(|e| load_error(name, &e))
    }
}

/// Why `bytes` cannot be a component, when their first eight bytes say so already. Wasmtime's
/// words for these are about parsers and magic numbers.
fn not_a_component(bytes: &[u8]) -> Option<&'static str> {
    if !bytes.starts_with(b"\0asm") {
        Some("not a WebAssembly file (it does not begin with \\0asm)")
    } else if bytes.get(4..8) == Some(&[1, 0, 0, 0][..]) {
        Some(
            "a core WebAssembly module, not a component: encode it as one with mxrelay-componentize \
             (scripts/build-policy.sh does)",
        )
    } else {
        None
    }
}

fn load_error(name: &str, e: &wasmtime::Error) -> PolicyError {
    PolicyError::Load {
        name: name.into(),
        reason: format!("{e:#} (is it a component implementing mxrelay:policy/policy from wit/policy.wit?)"),
    }
}

/// Per-store data: the resource limiter, which also records the largest memory asked for,
/// and the CPU clock of the call in progress.
struct StoreState {
    limits: StoreLimits,
    peak_memory: usize,
    /// Set when a memory growth was refused: the failure that follows is the memory cap.
    memory_denied: bool,
    /// The calling thread's CPU time at the first tick the current call ran into.
    cpu_mark: Option<Duration>,
    /// The CPU time a call may use ([`Limits::call_deadline`]).
    call_budget: Duration,
    /// How often a call reached an epoch deadline (tests check that they exercised it).
    #[cfg(test)]
    deadlines_reached: u64,
}

/// Arms the deadline of the call about to run in `store`: its CPU clock is read at the next
/// tick, if it lasts that long. The ticker ticks until the returned guard is dropped.
fn start_call<'t>(store: &mut Store<StoreState>, ticker: &'t Ticker) -> Call<'t> {
    store.data_mut().cpu_mark = None;
    store.set_epoch_deadline(1);
    ticker.begin()
}

impl StoreState {
    /// At an epoch deadline: at the first, reads the CPU clock; later, interrupts the call
    /// once it has used its budget since then. Otherwise returns the next deadline, where the
    /// rest of the budget could run out.
    fn deadline_reached(&mut self) -> UpdateDeadline {
        #[cfg(test)]
        {
            self.deadlines_reached += 1;
        }
        let now = thread_cpu_time();
        let mark = *self.cpu_mark.get_or_insert(now);
        match self.call_budget.checked_sub(now.saturating_sub(mark)) {
            Some(rest) if !rest.is_zero() => UpdateDeadline::Continue(deadline_ticks(rest)),
            Some(_) | None => UpdateDeadline::Interrupt,
        }
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.unsigned_abs(), t.tv_nsec.clamp(0, 999_999_999) as u32)
}

impl wasmtime::ResourceLimiter for StoreState {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum);
        match allowed {
            Ok(true) => self.peak_memory = self.peak_memory.max(desired),
            Ok(false) | Err(_) => self.memory_denied = true,
        }
        allowed
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// How many domains' routers share one instance of the built-in policy. Each instance costs
/// some 44 KB of memory and 4 GiB of address space, so one per domain made a relay with
/// 10 000 domains take 465 MB. A built-in router of 8 servers takes some 600 bytes of the
/// instance's memory, so 64 of them use a small part of its 16 MiB.
pub const BUILTIN_DOMAINS_PER_INSTANCE: usize = 64;

/// A compiled, pre-instantiated policy, with the live instances its domains share. Cheap to
/// clone (clones share the instances).
#[derive(Clone)]
pub struct PolicyComponent {
    engine: PolicyEngine,
    pre: PolicyPre<StoreState>,
    name: String,
    pub(crate) pool: Arc<InstancePool>,
}

impl std::fmt::Debug for PolicyComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyComponent").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PolicyComponent {
    fn new(engine: PolicyEngine, pre: PolicyPre<StoreState>, name: &str, domains_per_instance: usize) -> PolicyComponent {
        PolicyComponent { engine, pre, name: name.into(), pool: Arc::new(InstancePool::new(domains_per_instance)) }
    }

    /// The same compiled policy with instances of its own, each shared by up to `n` domains.
    /// The built-in policy shares by [`BUILTIN_DOMAINS_PER_INSTANCE`]; a custom module by 1,
    /// so that each domain's calls have their own memory cap and a failure stays with them.
    pub fn with_domains_per_instance(&self, n: usize) -> PolicyComponent {
        PolicyComponent::new(self.engine.clone(), self.pre.clone(), &self.name, n)
    }

    /// How many domains share one instance.
    pub fn domains_per_instance(&self) -> usize {
        self.pool.per_instance()
    }

    /// How many instances the domains made with this component (and its clones) hold live.
    pub fn instances_in_use(&self) -> usize {
        self.pool.in_use()
    }

    /// The policy's name (`builtin` or the module's path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A fresh instance in its own store, with the engine's limits applied.
    pub fn instantiate(&self) -> Result<PolicyInstance, PolicyError> {
        let limits = self.engine.inner.limits;
        let state = StoreState {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.max_memory_bytes)
                .trap_on_grow_failure(true)
                .instances(16)
                .build(),
            peak_memory: 0,
            memory_denied: false,
            cpu_mark: None,
            call_budget: limits.call_deadline,
            #[cfg(test)]
            deadlines_reached: 0,
        };
        let mut store = Store::new(&self.engine.inner.engine, state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        let ticker = self.engine.inner.ticker.clone();
        if limits.interruptible {
            // Wall-clock ticks only say when to look: the budget is the call's CPU time.
            store.epoch_deadline_callback(|mut store| Ok(store.data_mut().deadline_reached()));
        }
        // Instantiating runs the module's start code, which is a call like any other.
        let call = limits.interruptible.then(|| start_call(&mut store, &ticker));
        let bindings = self.pre.instantiate(&mut store).map_err(|e| {
            let denied = store.data().memory_denied;
            classify(&self.name, limits, denied, e)
        })?;
        drop(call);
        Ok(PolicyInstance { store, bindings, name: self.name.clone(), limits, poisoned: false, ticker })
    }
}

fn deadline_ticks(deadline: Duration) -> u64 {
    (deadline.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

/// Turns a failed call into the error a caller can act on. `memory_denied` says whether the
/// store's limiter refused a memory growth during the call.
fn classify(name: &str, limits: Limits, memory_denied: bool, e: wasmtime::Error) -> PolicyError {
    let name = name.to_string();
    tracing::debug!(policy = %name, error = ?e, "policy call failed");
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PolicyError::Timeout { name, deadline_ms: limits.call_deadline.as_millis() as u64 },
        _ if memory_denied => PolicyError::MemoryLimit { name, limit_bytes: limits.max_memory_bytes },
        Some(trap) => PolicyError::Trap { name, reason: trap.to_string() },
        None => PolicyError::Trap { name, reason: e.root_cause().to_string() },
    }
}

/// A domain's router resource inside one instance.
#[derive(Debug)]
pub struct RouterHandle {
    resource: ResourceAny,
    servers: usize,
    wants_envelope: bool,
}

impl RouterHandle {
    /// How many servers the router was built with.
    pub fn servers(&self) -> usize {
        self.servers
    }

    /// Whether the policy reads the envelope; when false, send `envelope: None`.
    pub fn wants_envelope(&self) -> bool {
        self.wants_envelope
    }
}

/// A live instance of a policy. After any trap it is poisoned and must be replaced.
pub struct PolicyInstance {
    store: Store<StoreState>,
    bindings: Policy,
    name: String,
    limits: Limits,
    poisoned: bool,
    ticker: Arc<Ticker>,
}

impl std::fmt::Debug for PolicyInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyInstance").field("name", &self.name).field("poisoned", &self.poisoned).finish_non_exhaustive()
    }
}

impl PolicyInstance {
    /// Runs `call` under a fresh deadline, poisoning the instance when it fails.
    fn guarded<T>(
        &mut self,
        call: impl FnOnce(&Policy, &mut Store<StoreState>) -> wasmtime::Result<T>,
    ) -> Result<T, PolicyError> {
        if self.poisoned {
            return Err(PolicyError::Poisoned { name: self.name.clone() });
        }
        let _call = self.limits.interruptible.then(|| start_call(&mut self.store, &self.ticker));
        call(&self.bindings, &mut self.store).map_err(|e| {
            self.poisoned = true;
            classify(&self.name, self.limits, self.store.data().memory_denied, e)
        })
    }

    /// The largest linear memory this instance has grown to, in bytes.
    pub fn peak_memory_bytes(&self) -> usize {
        self.store.data().peak_memory
    }

    /// Asks the policy to validate a server list as typed.
    pub fn validate(&mut self, raw: &[core::RawServer]) -> Result<Vec<core::Problem>, PolicyError> {
        let wit: Vec<_> = raw.iter().map(convert::raw_to_wit).collect();
        let problems = self.guarded(|b, store| b.mxrelay_policy_routing().call_validate(store, &wit))?;
        Ok(problems.into_iter().map(convert::problem_from_wit).collect())
    }

    /// Builds the policy's router for a domain, its validated servers and its settings (JSON).
    pub fn router(&mut self, domain: &str, servers: &[core::Server], settings_json: &str) -> Result<RouterHandle, PolicyError> {
        let wit: Vec<_> = servers.iter().map(convert::server_to_wit).collect();
        let created =
            self.guarded(|b, store| b.mxrelay_policy_routing().router().call_create(store, domain, &wit, settings_json))?;
        match created {
            Ok(resource) => {
                let wants_envelope =
                    self.guarded(|b, store| b.mxrelay_policy_routing().router().call_wants_envelope(store, resource))?;
                Ok(RouterHandle { resource, servers: servers.len(), wants_envelope })
            }
            Err(problems) => Err(PolicyError::Settings {
                name: self.name.clone(),
                problems: problems.into_iter().map(convert::problem_from_wit).collect(),
            }),
        }
    }

    /// Asks for one message's plan and checks that it names every server exactly once.
    pub fn plan(&mut self, router: &RouterHandle, msg: &Message) -> Result<Vec<u32>, PolicyError> {
        let plan = self.guarded(|b, store| b.mxrelay_policy_routing().router().call_plan(store, router.resource, msg))?;
        check_plan(&plan, router.servers).map_err(|reason| PolicyError::InvalidPlan { name: self.name.clone(), reason })?;
        Ok(plan)
    }

    /// Releases a router inside the instance.
    pub fn drop_router(&mut self, router: RouterHandle) -> Result<(), PolicyError> {
        self.guarded(|_, store| router.resource.resource_drop(store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    fn servers(n: usize) -> Vec<core::Server> {
        (0..n).map(|i| core::Server::new(format!("mx{i}.example.com"), 10 * (i as u16 % 4))).collect()
    }

    fn message(seed: u64) -> Message {
        Message { seed, attempt: 1, now_ms: 0, down: vec![], envelope: None }
    }

    /// Epochs that pass while a call uses little CPU (a busy machine, simulated by a thread
    /// that advances the epoch far faster than the ticker) never interrupt it: the deadline
    /// is each call's CPU time. With a wall-clock deadline every call here would fail.
    #[test]
    fn wall_time_without_cpu_time_never_interrupts_a_call() {
        let engine = PolicyEngine::new(Limits::default()).expect("engine");
        let mut instance = engine.builtin().expect("builtin").instantiate().expect("instance");
        let router = instance.router("example.com", &servers(256), "{}").expect("router");
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (engine, stop) = (engine.inner.engine.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A minute of ticks every millisecond.
                    for _ in 0..12_000 {
                        engine.increment_epoch();
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut seed = 0;
        while instance.store.data().deadlines_reached < 100 {
            seed += 1;
            instance.plan(&router, &message(seed)).unwrap_or_else(|e| panic!("call {seed}: {e}"));
        }
        stop.store(true, Ordering::Relaxed);
        hammer.join().expect("hammer");
    }

    /// At a deadline, a call goes on while it has CPU budget left and is interrupted once it
    /// has used it up. (The hostile modules in `tests/` show a real endless loop interrupted.)
    #[test]
    fn a_deadline_interrupts_only_once_the_cpu_budget_is_spent() {
        let engine = PolicyEngine::new(Limits::default()).expect("engine");
        let mut instance = engine.builtin().expect("builtin").instantiate().expect("instance");
        let _call = start_call(&mut instance.store, &engine.inner.ticker);
        let state = instance.store.data_mut();
        assert!(matches!(state.deadline_reached(), UpdateDeadline::Continue(ticks) if ticks > 1), "the first look");
        assert!(matches!(state.deadline_reached(), UpdateDeadline::Continue(ticks) if ticks > 1), "budget left");
        let spin_until = thread_cpu_time() + state.call_budget;
        while thread_cpu_time() < spin_until {
            std::hint::black_box(());
        }
        assert!(matches!(state.deadline_reached(), UpdateDeadline::Interrupt));
    }
}
