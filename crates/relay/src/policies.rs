//! Loads each domain's policy component once and binds it to the domain's servers, with the
//! domain's other delivery settings (TLS, how long its mail is retried).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use mxrelay_policy_core::Severity;
use mxrelay_policy_host::{DomainPolicy, Limits, PolicyComponent, PolicyEngine, PolicyError, setting_path};

use crate::config::{Config, ConfigProblem, PolicySource};
use crate::tls::{ClientTls, OutboundTls};

/// Every configured domain's policy, ready to plan.
#[derive(Debug, Clone)]
pub struct Policies {
    engine: PolicyEngine,
    domains: BTreeMap<String, Arc<DomainPolicy>>,
    /// Each domain's outbound TLS (loaded with the policies so a bad `tls_ca` or client
    /// certificate is refused the same way, and renewed files are read again on reload).
    tls: BTreeMap<String, OutboundTls>,
    /// The outbound TLS of mail to anywhere else (notifications via `bounce_relay`).
    default_tls: OutboundTls,
    /// Domains whose `max_queue_lifetime` is not `delivery.max_queue_lifetime`.
    lifetimes: BTreeMap<String, Duration>,
    /// The built-in policy over `delivery.bounce_relay`, for notifications to senders
    /// outside the configured domains.
    bounce: Option<Arc<DomainPolicy>>,
}

impl Policies {
    /// Starts an engine and loads the policies of every domain in `config`. Each module is
    /// compiled once however many domains use it. Errors name the domain and the module.
    pub fn load(config: &Config) -> Result<Policies, Vec<ConfigProblem>> {
        let engine = PolicyEngine::new(Limits::default()).map_err(|e| {
            vec![ConfigProblem { location: "policy engine".into(), severity: Severity::Error, message: e.to_string() }]
        })?;
        Policies::load_with(engine, config)
    }

    /// As [`Policies::load`], with an existing engine (live reload keeps the engine).
    pub fn load_with(engine: PolicyEngine, config: &Config) -> Result<Policies, Vec<ConfigProblem>> {
        let mut components: BTreeMap<String, PolicyComponent> = BTreeMap::new();
        let mut domains = BTreeMap::new();
        let mut tls = BTreeMap::new();
        let mut problems = Vec::new();
        let client = ClientTls::load(&config.delivery).map_err(|p| vec![p])?;
        let default_tls = client.opportunistic();
        for domain in &config.domains {
            match OutboundTls::for_domain(domain, &client) {
                Ok(t) => {
                    tls.insert(domain.name.clone(), t);
                }
                Err(p) => problems.push(p),
            }
            let location = format!("domain {}: policy", domain.name);
            let component = match components.entry(domain.policy.label()) {
                Entry::Occupied(e) => e.get().clone(),
                Entry::Vacant(e) => {
                    let loaded = match &domain.policy {
                        PolicySource::Builtin => engine.builtin(),
                        PolicySource::Module(path) => match std::fs::read(path) {
                            Ok(bytes) => engine.load(&path.display().to_string(), &bytes),
                            Err(err) => Err(PolicyError::Load { name: path.display().to_string(), reason: err.to_string() }),
                        },
                    };
                    match loaded {
                        Ok(c) => e.insert(c).clone(),
                        Err(err) => {
                            problems.push(ConfigProblem { location, severity: Severity::Error, message: err.to_string() });
                            continue;
                        }
                    }
                }
            };
            match DomainPolicy::new(component, &domain.name, domain.servers.clone(), domain.policy_settings_json.clone()) {
                Ok(p) => {
                    domains.insert(domain.name.clone(), Arc::new(p));
                }
                Err(PolicyError::Settings { problems: found, .. }) => problems.extend(found.into_iter().map(|p| ConfigProblem {
                    location: format!("domain {}: {}", domain.name, setting_path(&p)),
                    severity: p.severity,
                    message: p.message,
                })),
                Err(err) => problems.push(ConfigProblem { location, severity: Severity::Error, message: err.to_string() }),
            }
        }
        let bounce = match &config.delivery.bounce_relay {
            None => None,
            Some(relay) => {
                match engine.builtin().and_then(|c| DomainPolicy::new(c, "bounce-relay", vec![relay.clone()], "{}".into())) {
                    Ok(p) => Some(Arc::new(p)),
                    Err(e) => {
                        problems.push(ConfigProblem {
                            location: "delivery.bounce_relay".into(),
                            severity: Severity::Error,
                            message: e.to_string(),
                        });
                        None
                    }
                }
            }
        };
        if problems.iter().any(|p| p.severity == Severity::Error) {
            return Err(problems);
        }
        let lifetimes = config.domains.iter().filter_map(|d| Some((d.name.clone(), d.max_queue_lifetime?))).collect();
        Ok(Policies { engine, domains, tls, default_tls, lifetimes, bounce })
    }

    /// A copy with `domain`'s servers replaced, its policy built anew for them (same
    /// component and settings). Fails, changing nothing, if the policy refuses the list.
    pub fn with_domain_servers(&self, domain: &str, servers: Vec<mxrelay_policy_core::Server>) -> Result<Policies, PolicyError> {
        let current = self
            .domains
            .get(domain)
            .ok_or_else(|| PolicyError::Load { name: domain.into(), reason: "not a configured domain".into() })?;
        let fresh =
            DomainPolicy::new(current.component().clone(), current.domain(), servers, current.settings_json().to_string())?;
        let mut next = self.clone();
        next.domains.insert(domain.to_string(), Arc::new(fresh));
        Ok(next)
    }

    /// The engine, for reloads.
    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    /// Where a notification to a sender outside the configured domains goes, if anywhere.
    pub fn bounce_route(&self) -> Option<&Arc<DomainPolicy>> {
        self.bounce.as_ref()
    }

    /// A domain's outbound TLS; opportunistic for anything else (notifications via `bounce_relay`).
    pub fn tls(&self, domain: &str) -> OutboundTls {
        self.tls.get(domain).unwrap_or(&self.default_tls).clone()
    }

    /// How long a domain's mail is retried, when it is not `delivery.max_queue_lifetime`.
    pub fn max_queue_lifetime(&self, domain: &str) -> Option<Duration> {
        self.lifetimes.get(domain).copied()
    }

    /// The policy of a configured domain.
    pub fn domain(&self, name: &str) -> Option<&Arc<DomainPolicy>> {
        self.domains.get(name)
    }
}
