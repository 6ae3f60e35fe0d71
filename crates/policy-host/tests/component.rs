//! The built-in policy running as a component in wasmtime: golden vectors, limits, fail-safe.

use mxrelay_policy_core::golden::{self, ExpectedProblem};
use mxrelay_policy_core::{Router, Server};
use mxrelay_policy_host::{DomainPolicy, Limits, Message, PlanRequest, PlanSource, PolicyEngine, PolicyError};

fn vectors() -> golden::Vectors {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(golden::PATH);
    golden::parse(&std::fs::read_to_string(path).expect("read vectors")).expect("parse vectors")
}

fn message(seed: u64, down: Vec<u32>) -> Message {
    // The built-in policy does not read the envelope, so none is sent (as the relay does).
    Message { seed, attempt: 1, now_ms: 0, down, envelope: None }
}

#[test]
fn component_matches_golden_vectors() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let mut instance = engine.builtin().expect("builtin").instantiate().expect("instance");
    let vectors = vectors();
    let mut checked = 0;
    for case in &vectors.plans {
        let (router, _) = Router::from_raw(&case.servers).expect("valid");
        let handle = instance.router("mailroutedemo.com", router.servers(), "{}").expect("router");
        for v in &case.plans {
            let msg = Message { attempt: v.attempt, now_ms: v.now_ms, ..message(v.seed, v.down.clone()) };
            let got = instance.plan(&handle, &msg).expect("plan");
            assert_eq!(Some(&got), v.expect.as_ref(), "{}: seed {} down {:?}", case.name, v.seed, v.down);
            checked += 1;
        }
        instance.drop_router(handle).expect("drop");
    }
    for case in &vectors.validation {
        let got: Vec<ExpectedProblem> =
            instance.validate(&case.servers).expect("validate").iter().map(ExpectedProblem::from).collect();
        assert_eq!(Some(&got), case.expect.as_ref(), "{}", case.name);
        checked += 1;
    }
    assert!(checked > 100, "only {checked} vectors checked");
}

#[test]
fn component_validation_messages_equal_native_ones() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let mut instance = engine.builtin().expect("builtin").instantiate().expect("instance");
    for case in &vectors().validation {
        assert_eq!(
            instance.validate(&case.servers).expect("validate"),
            mxrelay_policy_core::validate(&case.servers),
            "{}",
            case.name
        );
    }
}

#[test]
fn domain_policy_plans_through_the_component() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let servers = vec![Server::new("a.example.com", 10), Server::new("b.example.com", 20)];
    let policy = DomainPolicy::new(engine.builtin().expect("builtin"), "example.com", servers, "{}".into()).expect("domain");
    let plan = policy.plan(&PlanRequest { seed: 7, attempt: 1, now_ms: 0, down: &[0], recipients: &[], sender: "", size: 0 });
    assert_eq!(plan.order, vec![1, 0]);
    assert!(matches!(plan.source, PlanSource::Component), "{:?}", plan.source);
}

#[test]
fn garbage_bytes_are_refused_with_a_load_error() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let err = engine.load("junk.wasm", b"\0asm\x0d\0\x01\0garbage").expect_err("must refuse");
    assert!(matches!(err, PolicyError::Load { ref name, .. } if name == "junk.wasm"), "{err}");
}

#[test]
fn the_built_in_policy_asks_for_no_envelope() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let mut instance = engine.builtin().expect("builtin").instantiate().expect("instance");
    let handle = instance.router("example.com", &[Server::new("a.example.com", 10)], "{}").expect("router");
    assert!(!handle.wants_envelope(), "plan calls of the built-in policy must stay free of strings");
}

/// Domains of the built-in policy share instances, each with its own router in one, and a
/// domain's plans are the same as with an instance of its own (the native core's). Without
/// the sharing, each domain took an instance: 44 KB and 4 GiB of address space each.
#[test]
fn built_in_domains_share_instances() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let component = engine.builtin().expect("builtin");
    let per_instance = component.domains_per_instance();
    assert_eq!(per_instance, mxrelay_policy_host::BUILTIN_DOMAINS_PER_INSTANCE);
    let domains: Vec<(DomainPolicy, Router)> = (0..2 * per_instance + 2)
        .map(|i| {
            let servers: Vec<Server> =
                (0..=i % 5).map(|s| Server::new(format!("mx{s}.customer{i}.test"), 10 * (s as u16 % 3))).collect();
            let policy =
                DomainPolicy::new(component.clone(), &format!("customer{i}.test"), servers.clone(), "{}".into()).expect("domain");
            (policy, Router::new(servers))
        })
        .collect();
    assert_eq!(component.instances_in_use(), 3, "{} domains, {per_instance} to an instance", domains.len());
    for seed in 0..20 {
        for (policy, native) in &domains {
            let request = PlanRequest { seed, attempt: 1, now_ms: 0, down: &[0], recipients: &[], sender: "", size: 0 };
            let plan = policy.plan(&request);
            assert!(matches!(plan.source, PlanSource::Component), "{:?}", plan.source);
            let input = mxrelay_policy_core::PlanInput { seed, attempt: 1, now_ms: 0, down: &[0] };
            assert_eq!(plan.order, native.plan(&input), "{}: seed {seed}", policy.domain());
        }
    }
    // Domains dropped (a reload) leave their instance once the last of them is gone.
    let mut domains = domains;
    domains.truncate(per_instance);
    assert_eq!(component.instances_in_use(), 1, "the instances whose domains are all gone are dropped with the last");
    let more = DomainPolicy::new(component.clone(), "late.test", vec![Server::new("mx.late.test", 10)], "{}".into());
    assert!(more.is_ok());
    assert_eq!(component.instances_in_use(), 2, "the first instance is full, the others' domains are gone");
}

/// Domains sharing an instance are planned from several threads at once, as the relay's
/// delivery workers do, while other domains of the same instances come and go (reloads and
/// saved server lists): every plan comes from the component and is the native core's.
#[test]
fn shared_instances_serve_threads_while_domains_come_and_go() {
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let component = engine.builtin().expect("builtin");
    let make = |i: usize| {
        let servers: Vec<Server> = (0..=i % 4).map(|s| Server::new(format!("mx{s}.d{i}.test"), 10 * (s as u16 % 2))).collect();
        let policy = DomainPolicy::new(component.clone(), &format!("d{i}.test"), servers.clone(), "{}".into()).expect("domain");
        (policy, Router::new(servers))
    };
    let steady: Vec<(DomainPolicy, Router)> = (0..100).map(make).collect();
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            let steady = &steady;
            scope.spawn(move || {
                for seed in (worker * 1000)..(worker * 1000 + 500) {
                    let (policy, native) = &steady[(seed % 100) as usize];
                    let request = PlanRequest { seed, attempt: 1, now_ms: 0, down: &[], recipients: &[], sender: "", size: 0 };
                    let plan = policy.plan(&request);
                    assert!(matches!(plan.source, PlanSource::Component), "{:?}", plan.source);
                    let input = mxrelay_policy_core::PlanInput { seed, attempt: 1, now_ms: 0, down: &[] };
                    assert_eq!(plan.order, native.plan(&input), "{}", policy.domain());
                }
            });
        }
        // Meanwhile, domains join the instances and leave them again.
        for round in 0..50 {
            let passing: Vec<_> = (0..20).map(|i| make(1000 + round * 20 + i)).collect();
            drop(passing);
        }
    });
    assert_eq!(component.instances_in_use(), 2, "the 100 steady domains keep their two instances, and only those");
}
