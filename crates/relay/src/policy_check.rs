//! `mxrelay policy check MODULE.wasm`: is a policy component usable?
//!
//! Loads the module (it must implement the `mxrelay:policy/policy` world), runs the shared
//! golden-vector scenarios and a set of hostile inputs through it under the relay's limits,
//! and reports the time per call and the memory used. Every plan must name every server
//! exactly once; any trap, timeout, memory overrun or invalid plan makes the module unusable.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use mxrelay_policy_core::golden;
use mxrelay_policy_core::{Router, Server};
use mxrelay_policy_host::{
    Envelope, Limits, Message, PolicyEngine, PolicyError, PolicyInstance, RouterHandle, setting_problem_text,
};

const VECTORS: &str = include_str!("../../../tests/golden/vectors.json");

/// What the check found.
#[derive(Debug)]
pub struct Report {
    /// Human-readable lines.
    pub text: String,
    /// Why the module is unusable, if it is.
    pub unusable: Option<String>,
}

struct Run {
    instance: PolicyInstance,
    times: Vec<Duration>,
    calls: usize,
    /// Scenarios skipped because the module refused the settings for their server list.
    skipped: Vec<String>,
}

impl Run {
    /// One plan call, sending the envelope only to a policy that reads it, as the relay does.
    fn plan(&mut self, router: &RouterHandle, msg: &Probe) -> Result<(), PolicyError> {
        let message = Message {
            seed: msg.seed,
            attempt: msg.attempt,
            now_ms: msg.now_ms,
            down: msg.down.clone(),
            envelope: router.wants_envelope().then(|| Envelope {
                recipients: msg.recipients.clone(),
                sender: msg.sender.clone(),
                size: 2048,
            }),
        };
        let t0 = Instant::now();
        self.instance.plan(router, &message)?;
        self.times.push(t0.elapsed());
        self.calls += 1;
        Ok(())
    }
}

/// One message of a scenario.
#[derive(Debug, Clone)]
struct Probe {
    seed: u64,
    attempt: u32,
    now_ms: u64,
    down: Vec<u32>,
    recipients: Vec<String>,
    sender: String,
}

fn message(seed: u64, down: Vec<u32>) -> Probe {
    Probe {
        seed,
        attempt: 1,
        now_ms: 1_795_891_700_000,
        down,
        recipients: vec!["user@example.com".into()],
        sender: "sender@example.net".into(),
    }
}

/// Checks the module at `path` with the domain settings `settings_json`.
pub fn check(path: &std::path::Path, settings_json: &str) -> Report {
    let mut text = String::new();
    let fail = |text: String, why: String| Report { text, unusable: Some(why) };
    // The relay hands a module its `[domain.policy_config]` table as a JSON object.
    match serde_json::from_str::<serde_json::Value>(settings_json) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(other) => {
            return fail(text, format!("--settings must be a JSON object, like the [domain.policy_config] table; got {other}"));
        }
        Err(e) => return fail(text, format!("--settings is not JSON: {e}")),
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return fail(text, format!("cannot read {}: {e}", path.display())),
    };
    let engine = match PolicyEngine::new(Limits::default()) {
        Ok(e) => e,
        Err(e) => return fail(text, e.to_string()),
    };
    let t0 = Instant::now();
    let component = match engine.load(&path.display().to_string(), &bytes) {
        Ok(c) => c,
        Err(e) => return fail(text, e.to_string()),
    };
    let _ = writeln!(
        text,
        "loaded {} ({} bytes) in {:.1} ms: implements mxrelay:policy/policy",
        path.display(),
        bytes.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let instance = match component.instantiate() {
        Ok(i) => i,
        Err(e) => return fail(text, e.to_string()),
    };
    let mut run = Run { instance, times: Vec::new(), calls: 0, skipped: Vec::new() };
    if let Err(why) = scenarios(&mut run, settings_json, &mut text) {
        return fail(text, why);
    }
    for skipped in &run.skipped {
        let _ = writeln!(text, "skipped: {skipped}");
    }
    if run.calls == 0 {
        return fail(
            text,
            format!(
                "no scenario could run: the module refused the settings {settings_json} for every server list; pass settings that fit with --settings JSON"
            ),
        );
    }
    run.times.sort();
    let pct = |p: f64| run.times[((run.times.len() as f64 * p) as usize).min(run.times.len() - 1)].as_secs_f64() * 1e6;
    let _ = writeln!(
        text,
        "{} plan calls: median {:.2} µs, p99 {:.2} µs, max {:.2} µs; peak memory {} KiB (limit {} KiB); deadline {} ms per call",
        run.calls,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        run.instance.peak_memory_bytes() / 1024,
        engine.limits().max_memory_bytes / 1024,
        engine.limits().call_deadline.as_millis()
    );
    Report { text, unusable: None }
}

fn scenarios(run: &mut Run, settings_json: &str, text: &mut String) -> Result<(), String> {
    let vectors = golden::parse(VECTORS).map_err(|e| format!("embedded vectors: {e}"))?;
    let validate_cases = vectors.validation.len();
    for case in &vectors.validation {
        run.instance.validate(&case.servers).map_err(|e| format!("validate ({}): {e}", case.name))?;
    }
    let _ = writeln!(text, "validate: {validate_cases} golden cases answered");

    for case in &vectors.plans {
        let (router, _) = Router::from_raw(&case.servers).map_err(|p| format!("{}: {p:?}", case.name))?;
        let Some(handle) = create(run, router.servers(), settings_json, &case.name)? else { continue };
        for v in &case.plans {
            run.plan(&handle, &Probe { attempt: v.attempt, now_ms: v.now_ms, ..message(v.seed, v.down.clone()) })
                .map_err(|e| format!("{} (seed {}, down {:?}): {e}", case.name, v.seed, v.down))?;
        }
        run.instance.drop_router(handle).map_err(|e| e.to_string())?;
    }
    let _ = writeln!(text, "golden scenarios: {} server lists, every plan valid", vectors.plans.len());

    // Hostile inputs: extremes of every field the host passes.
    let many: Vec<Server> = (0..256).map(|i| Server::new(format!("mx{i}.example.com"), (i % 16) as u16 * 10)).collect();
    let one = vec![Server::new("mx.example.com", 10)];
    let cases: Vec<(&str, &[Server], Probe)> = vec![
        ("one server, down", &one, message(1, vec![0])),
        ("256 servers in 16 tiers", &many, message(2, vec![])),
        ("256 servers, all down", &many, message(3, (0..256).collect())),
        (
            "extreme seed, attempt and clock",
            &many,
            Probe { attempt: u32::MAX, now_ms: u64::MAX, ..message(u64::MAX, vec![255, 0]) },
        ),
        (
            "1000 long recipients",
            &one,
            Probe {
                recipients: (0..1000).map(|i| format!("{}{i}@example.com", "r".repeat(200))).collect(),
                ..message(4, vec![])
            },
        ),
        (
            "empty and unicode strings",
            &one,
            Probe { sender: "ünïcødé@exämple.com".into(), recipients: vec![String::new()], ..message(5, vec![]) },
        ),
        ("down list with repeats", &many, message(6, vec![3, 3, 3, 7])),
    ];
    for (name, servers, msg) in &cases {
        let Some(handle) = create(run, servers, settings_json, name)? else { continue };
        for seed in 0..20 {
            run.plan(&handle, &Probe { seed: msg.seed.wrapping_add(seed), ..msg.clone() })
                .map_err(|e| format!("hostile input \"{name}\": {e}"))?;
        }
        run.instance.drop_router(handle).map_err(|e| e.to_string())?;
    }
    let _ = writeln!(text, "hostile inputs: {} cases, every plan valid", cases.len());
    Ok(())
}

/// The router for one scenario, `None` when the module refuses the settings for this server
/// list (a mismatch of settings and servers, not a fault of the module).
fn create(run: &mut Run, servers: &[Server], settings_json: &str, case: &str) -> Result<Option<RouterHandle>, String> {
    match run.instance.router("example.com", servers, settings_json) {
        Ok(h) => Ok(Some(h)),
        Err(PolicyError::Settings { problems, .. }) => {
            let why = problems.iter().map(setting_problem_text).collect::<Vec<_>>().join("; ");
            run.skipped.push(format!("\"{case}\": settings refused for this server list ({why})"));
            Ok(None)
        }
        Err(e) => Err(format!("create for \"{case}\": {e}")),
    }
}
