//! Custom policy modules vs the built-in component, side by side in one run: per-call plan
//! time, the cost of the epoch deadline, and the time to reload a module.
//! Run: `cargo bench -p mxrelay-e2e --bench policies`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mxrelay_policy_host::{BUILTIN_COMPONENT, Envelope, Limits, Message, PolicyEngine};

fn message(wants_envelope: bool) -> Message {
    Message {
        seed: 0,
        attempt: 1,
        now_ms: 1_795_891_700_000,
        down: vec![],
        envelope: wants_envelope.then(|| Envelope {
            recipients: vec!["user@mailroutedemo.com".into()],
            sender: "sender@example.net".into(),
            size: 2048,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let modules: [(&str, Vec<u8>, &str); 5] = [
        ("built-in", BUILTIN_COMPONENT.to_vec(), "{}"),
        // A custom module doing exactly the built-in's work: the overhead of being custom.
        (
            "custom module, built-in logic",
            std::fs::read(env!("MXRELAY_TEST_POLICY_HOSTILE")).expect("hostile"),
            r#"{"mode":"fine"}"#,
        ),
        ("sticky", std::fs::read(env!("MXRELAY_TEST_POLICY_STICKY")).expect("sticky"), "{}"),
        (
            "canary",
            std::fs::read(env!("MXRELAY_TEST_POLICY_CANARY")).expect("canary"),
            r#"{"servers":["mail3.mailroutedemo.com"],"percent":10}"#,
        ),
        ("maintenance", std::fs::read(env!("MXRELAY_TEST_POLICY_MAINTENANCE")).expect("maintenance"), "{}"),
    ];
    let servers = mxrelay_policy_core::seed_page_example();
    let mut group = c.benchmark_group("plan call, 8 servers");
    for interruptible in [true, false] {
        let engine = PolicyEngine::new(Limits { interruptible, ..Limits::default() }).expect("engine");
        for (name, bytes, settings) in &modules {
            if !interruptible && *name != "built-in" {
                continue;
            }
            let mut instance = engine.load(name, bytes).expect("load").instantiate().expect("instance");
            let handle = instance.router("mailroutedemo.com", &servers, settings).expect("router");
            let mut msg = message(handle.wants_envelope());
            let label = if interruptible { (*name).to_string() } else { format!("{name}, no deadline") };
            group.bench_function(label, |b| {
                b.iter(|| {
                    msg.seed += 1;
                    black_box(instance.plan(&handle, &msg).expect("plan"));
                })
            });
        }
    }
    group.finish();

    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let mut group = c.benchmark_group("reload");
    group.sample_size(10);
    let (_, sticky, _) = &modules[2];
    group.bench_function("sticky: compile, instantiate, create router", |b| {
        b.iter(|| {
            let mut instance = engine.load("sticky", sticky).expect("load").instantiate().expect("instance");
            black_box(instance.router("mailroutedemo.com", &servers, "{}").expect("router"));
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
