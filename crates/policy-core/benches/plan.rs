//! Plan latency of the native core for the seed page's 8-server, 3-tier list.
use criterion::{Criterion, black_box, criterion_group, criterion_main};
use mxrelay_policy_core::{PlanInput, Router, Server};

fn seed_eight() -> Router {
    let list = [
        ("mail.mailroutedemo.com", 10),
        ("mail2.mailroutedemo.com", 10),
        ("mail3.mailroutedemo.com", 10),
        ("backup1.mailroutedemo.com", 20),
        ("backup2.mailroutedemo.com", 20),
        ("lastresort1.mailroutedemo.com", 30),
        ("lastresort2.mailroutedemo.com", 30),
        ("lastresort3.mailroutedemo.com", 30),
    ];
    Router::new(list.iter().map(|(h, p)| Server::new(*h, *p)).collect())
}

fn bench(c: &mut Criterion) {
    let router = seed_eight();
    let mut out = Vec::with_capacity(8);
    let mut seed = 0u64;
    c.bench_function("native plan, 8 servers", |b| {
        b.iter(|| {
            seed += 1;
            router.plan_into(&PlanInput { seed: black_box(seed), attempt: 1, now_ms: 0, down: &[] }, &mut out);
            black_box(&out);
        })
    });
    c.bench_function("native plan, 8 servers, 2 down", |b| {
        b.iter(|| {
            seed += 1;
            router.plan_into(&PlanInput { seed: black_box(seed), attempt: 1, now_ms: 0, down: &[0, 3] }, &mut out);
            black_box(&out);
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
