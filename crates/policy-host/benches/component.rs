//! Plan latency for the seed page's 8-server list, native core and built-in component side
//! by side in one run, the same through a domain's policy as the relay calls it, plus
//! component compile and instantiation times.
//! Run: `cargo bench -p mxrelay-policy-host --bench component`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mxrelay_policy_core::{PlanInput, Router, seed_page_example};
use mxrelay_policy_host::{BUILTIN_DOMAINS_PER_INSTANCE, DomainPolicy, Limits, Message, PlanRequest, PolicyEngine};

fn bench(c: &mut Criterion) {
    let servers = seed_page_example();
    let router = Router::new(servers.clone());
    let mut out = Vec::with_capacity(8);
    let mut seed = 0u64;
    let mut group = c.benchmark_group("plan 8 servers");
    group.bench_function("native core", |b| {
        b.iter(|| {
            seed += 1;
            router.plan_into(&PlanInput { seed: black_box(seed), attempt: 1, now_ms: 0, down: &[] }, &mut out);
            black_box(&out);
        })
    });

    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let component = engine.builtin().expect("builtin");
    let mut instance = component.instantiate().expect("instance");
    let handle = instance.router("mailroutedemo.com", &servers, "{}").expect("router");
    // The built-in policy asks for no envelope: a call sends numbers only, as in the relay.
    assert!(!handle.wants_envelope());
    let mut msg = Message { seed: 0, attempt: 1, now_ms: 0, down: vec![], envelope: None };
    group.bench_function("component (host call included)", |b| {
        b.iter(|| {
            msg.seed += 1;
            black_box(instance.plan(&handle, &msg).expect("plan"));
        })
    });
    // As the relay calls it: a domain's router in an instance shared with other domains,
    // the plan checked, the domain's and the instance's locks taken.
    let domains: Vec<DomainPolicy> = (0..BUILTIN_DOMAINS_PER_INSTANCE)
        .map(|i| DomainPolicy::new(component.clone(), &format!("d{i}.test"), servers.clone(), "{}".into()).expect("domain"))
        .collect();
    let mut seed = 0u64;
    group.bench_function("domain policy (shared instance, checked plan)", |b| {
        b.iter(|| {
            seed += 1;
            let request =
                PlanRequest { seed: black_box(seed), attempt: 1, now_ms: 0, down: &[], recipients: &[], sender: "", size: 0 };
            black_box(domains[(seed % 64) as usize].plan(&request));
        })
    });
    group.finish();

    let mut group = c.benchmark_group("component setup");
    group.sample_size(10);
    // `load` always compiles; `builtin()` compiles once per engine.
    group.bench_function("compile built-in component", |b| {
        b.iter(|| black_box(engine.load("builtin", mxrelay_policy_host::BUILTIN_COMPONENT).expect("builtin")))
    });
    group.bench_function("instantiate (pre-instantiated)", |b| b.iter(|| black_box(component.instantiate().expect("instance"))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
