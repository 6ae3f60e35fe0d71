//! Live instances that several domains share, each domain with its own router resource in
//! the instance (the WIT `router` is a resource for this: one instance, many routers).
//!
//! An instance that fails is dropped, and the next call of any domain in it starts a new one.
//! Routers made in the old one are gone with it: each domain remembers the generation of the
//! instance its router was made in, and makes it again in the new one.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mxrelay_policy_core as core;

use crate::engine::{PolicyComponent, PolicyInstance, RouterHandle};
use crate::error::PolicyError;

/// The instances of one component, each with room for `per_instance` domains.
#[derive(Debug)]
pub(crate) struct InstancePool {
    per_instance: usize,
    /// A slot is taken by each domain that holds its `Arc` (the pool holds one more).
    slots: Mutex<Vec<Arc<SharedInstance>>>,
}

impl InstancePool {
    pub(crate) fn new(per_instance: usize) -> InstancePool {
        InstancePool { per_instance: per_instance.max(1), slots: Mutex::default() }
    }

    pub(crate) fn per_instance(&self) -> usize {
        self.per_instance
    }

    /// A place for one more domain: in an instance with room, or in a new one. The domain
    /// keeps it until it is dropped.
    pub(crate) fn join(&self) -> Arc<SharedInstance> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        // Slots whose domains are all gone hold an instance nobody calls.
        slots.retain(|slot| Arc::strong_count(slot) > 1);
        if let Some(slot) = slots.iter().find(|slot| Arc::strong_count(slot) - 1 < self.per_instance) {
            return slot.clone();
        }
        let slot = Arc::new(SharedInstance { state: Mutex::default() });
        slots.push(slot.clone());
        slot
    }

    /// How many instances are live: started, and not yet dropped after a failure or with the
    /// last of their domains.
    pub(crate) fn in_use(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.iter().filter(|slot| slot.lock().instance.is_some()).count()
    }
}

/// One instance, live or to be started, shared by the domains that joined it.
#[derive(Debug)]
pub(crate) struct SharedInstance {
    state: Mutex<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    instance: Option<PolicyInstance>,
    /// Counts the instances started in this slot; a router is valid only in its own.
    generation: u64,
}

/// A domain's router, with the generation of the instance it lives in.
#[derive(Debug)]
pub(crate) struct DomainRouter {
    generation: u64,
    handle: RouterHandle,
}

/// What a domain needs to make its router.
pub(crate) struct RouterSpec<'a> {
    pub component: &'a PolicyComponent,
    pub domain: &'a str,
    pub servers: &'a [core::Server],
    pub settings_json: &'a str,
}

impl SharedInstance {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `call` with the domain's router, made first (in a new instance if need be) when
    /// `router` is missing or was made in an instance since dropped. When anything fails,
    /// the instance is dropped, as it may be unusable (a trap) or suspect (an invalid plan),
    /// and the router with it.
    pub(crate) fn with_router<T>(
        &self,
        spec: &RouterSpec<'_>,
        router: &mut Option<DomainRouter>,
        call: impl FnOnce(&mut PolicyInstance, &RouterHandle) -> Result<T, PolicyError>,
    ) -> Result<T, PolicyError> {
        let mut slot = self.lock();
        let result = slot.call(spec, router, call);
        if result.is_err() {
            *router = None;
            slot.instance = None;
        }
        result
    }

    /// Makes the domain's router now, so that a policy that refuses its settings is found at
    /// load time. A refusal of the settings leaves the instance to the others.
    pub(crate) fn make_router(&self, spec: &RouterSpec<'_>) -> Result<DomainRouter, PolicyError> {
        let mut slot = self.lock();
        let made = slot.make_router(spec).map(|(_, router)| router);
        if let Err(e) = &made {
            match e {
                PolicyError::Settings { .. } => {}
                PolicyError::Load { .. }
                | PolicyError::Trap { .. }
                | PolicyError::Timeout { .. }
                | PolicyError::MemoryLimit { .. }
                | PolicyError::InvalidPlan { .. }
                | PolicyError::Poisoned { .. } => slot.instance = None,
            }
        }
        made
    }

    /// Releases the router of a domain that is dropped, if its instance still lives, and the
    /// instance with it when no other domain is left in it.
    pub(crate) fn release(self: &Arc<Self>, router: Option<DomainRouter>) {
        let mut slot = self.lock();
        // Held by the pool and by the domain being dropped, and by no other domain.
        if Arc::strong_count(self) <= 2 {
            slot.instance = None;
            return;
        }
        let Some(router) = router.filter(|r| r.generation == slot.generation) else { return };
        if let Some(instance) = slot.instance.as_mut()
            && instance.drop_router(router.handle).is_err()
        {
            slot.instance = None;
        }
    }
}

impl Slot {
    fn call<T>(
        &mut self,
        spec: &RouterSpec<'_>,
        router: &mut Option<DomainRouter>,
        call: impl FnOnce(&mut PolicyInstance, &RouterHandle) -> Result<T, PolicyError>,
    ) -> Result<T, PolicyError> {
        let generation = self.generation;
        if let (Some(instance), Some(current)) = (self.instance.as_mut(), router.as_ref())
            && current.generation == generation
        {
            return call(instance, &current.handle);
        }
        let (instance, made) = self.make_router(spec)?;
        call(instance, &router.insert(made).handle)
    }

    /// Makes the domain's router, in the live instance or in a new one; returns the instance
    /// with it.
    fn make_router(&mut self, spec: &RouterSpec<'_>) -> Result<(&mut PolicyInstance, DomainRouter), PolicyError> {
        let instance = match self.instance.take() {
            Some(instance) => instance,
            None => {
                let started = spec.component.instantiate()?;
                self.generation += 1;
                started
            }
        };
        let generation = self.generation;
        let instance = self.instance.insert(instance);
        let handle = instance.router(spec.domain, spec.servers, spec.settings_json)?;
        Ok((instance, DomainRouter { generation, handle }))
    }
}
