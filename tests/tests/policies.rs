//! Custom policy modules: the examples' behaviour through `mxrelay plan --json`, sticky
//! routing through the component, `mxrelay policy check`, and hot reload in a running relay.

use mxrelay_e2e::{Relay, Sink, domain_with, mxrelay, policy_module, send, write_config};
use serde_json::Value;

fn plan_json(config: &str, extra: &[&str]) -> Value {
    let mut args = vec!["plan", config, "--domain", "customer.test", "--json"];
    args.extend_from_slice(extra);
    let (ok, out, err) = mxrelay(&args);
    assert!(ok, "plan failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("plan --json output is not JSON ({e}): {out}"))
}

const THREE: &str = "[[domain.server]]\nhost = \"old1.example.com\"\npreference = 10\n[[domain.server]]\nhost = \"old2.example.com\"\npreference = 10\n[[domain.server]]\nhost = \"new.example.com\"\npreference = 10\n";

#[test]
fn canary_sends_ten_percent_to_the_new_server() {
    let dir = tempfile::tempdir().expect("dir");
    let block = format!(
        "[[domain]]\nname = \"customer.test\"\npolicy = \"{}\"\n[domain.policy_config]\nservers = [\"new.example.com\"]\npercent = 10\n{THREE}",
        policy_module!(CANARY)
    );
    let config = write_config(dir.path(), &block);
    let v = plan_json(&config, &["--messages", "10000"]);
    assert_eq!(v["policy"], policy_module!(CANARY));
    let canary = v["delivered"]["new.example.com:25"].as_u64().expect("count");
    assert!((900..=1100).contains(&canary), "canary got {canary} of 10000: {v}");
    // With the canary down, its share goes back to the old servers: nothing is undeliverable.
    let v = plan_json(&config, &["--messages", "1000", "--down", "new.example.com:25"]);
    assert_eq!(v["delivered"]["new.example.com:25"], 0);
    assert_eq!(v["undeliverable"], 0);
}

#[test]
fn canary_settings_errors_are_config_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let block = format!(
        "[[domain]]\nname = \"customer.test\"\npolicy = \"{}\"\n[domain.policy_config]\nservers = [\"nope.example.com\"]\npercent = 150\n{THREE}",
        policy_module!(CANARY)
    );
    let config = write_config(dir.path(), &block);
    let (ok, _, err) = mxrelay(&["check", &config]);
    assert!(!ok);
    assert!(err.contains("error: domain customer.test: policy_config.percent: 150 is outside 0 to 100\n"), "{err}");
    assert!(
        err.contains(
            "error: domain customer.test: policy_config.servers: \"nope.example.com\" is not one of the domain's servers\n"
        ),
        "{err}"
    );
    // A setting of the wrong type is named, with no position in the JSON the relay hands the
    // module (the operator wrote TOML).
    let block = block.replace("percent = 150", "percent = \"ten\"");
    let (ok, _, err) = mxrelay(&["check", &write_config(dir.path(), &block)]);
    assert!(!ok);
    assert!(
        err.contains("error: domain customer.test: policy_config.percent: invalid type: string \"ten\", expected f64\n"),
        "{err}"
    );
}

#[test]
fn sticky_keeps_a_mailbox_on_one_server() {
    let dir = tempfile::tempdir().expect("dir");
    let block = format!("[[domain]]\nname = \"customer.test\"\npolicy = \"{}\"\n{THREE}", policy_module!(STICKY));
    let config = write_config(dir.path(), &block);
    let v = plan_json(&config, &["--messages", "1000", "--rcpt", "alice@customer.test"]);
    let counts: Vec<u64> = v["delivered"].as_object().expect("object").values().filter_map(Value::as_u64).collect();
    assert_eq!(counts.iter().filter(|c| **c > 0).count(), 1, "alice went to more than one server: {v}");
    assert_eq!(counts.iter().sum::<u64>(), 1000);
}

#[test]
fn sticky_moves_only_the_dead_servers_mailboxes() {
    use mxrelay_policy_core::Server;
    use mxrelay_policy_host::{DomainPolicy, Limits, PlanRequest, PlanSource, PolicyEngine};
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let bytes = std::fs::read(policy_module!(STICKY)).expect("module");
    let component = engine.load("sticky", &bytes).expect("load");
    let servers: Vec<Server> = (1..=4).map(|n| Server::new(format!("mx{n}.example.com"), 10)).collect();
    let policy = DomainPolicy::new(component, "example.com", servers, "{}".into()).expect("policy");
    let first = |rcpt: &str, down: Vec<u32>| {
        let recipients = [rcpt.to_string()];
        let plan = policy.plan(&PlanRequest {
            seed: 0,
            attempt: 1,
            now_ms: 0,
            down: &down,
            recipients: &recipients,
            sender: "",
            size: 0,
        });
        assert!(matches!(plan.source, PlanSource::Component), "{:?}", plan.source);
        plan.order[0]
    };
    let mut moved = 0;
    for n in 0..1000 {
        let rcpt = format!("user{n}@example.com");
        let (before, after) = (first(&rcpt, vec![]), first(&rcpt, vec![2]));
        if before == 2 {
            moved += 1;
            assert_ne!(after, 2);
        } else {
            assert_eq!(after, before, "{rcpt} moved although its server is up");
        }
    }
    assert!((180..=320).contains(&moved), "server 2 held {moved} of 1000 mailboxes");
}

#[test]
fn maintenance_window_makes_a_server_last_resort() {
    let dir = tempfile::tempdir().expect("dir");
    let block = format!(
        "[[domain]]\nname = \"customer.test\"\npolicy = \"{}\"\n[[domain.policy_config.windows]]\nserver = \"mx1.example.com\"\nstart = \"2026-12-06T02:00:00Z\"\nend = \"2026-12-06T04:00:00Z\"\n[[domain.server]]\nhost = \"mx1.example.com\"\npreference = 10\n[[domain.server]]\nhost = \"mx2.example.com\"\npreference = 20\n",
        policy_module!(MAINTENANCE)
    );
    let config = write_config(dir.path(), &block);
    let before = plan_json(&config, &["--messages", "100", "--now-ms", "1796522340000"]); // 01:59 UTC
    assert_eq!(before["delivered"]["mx1.example.com:25"], 100, "{before}");
    let during = plan_json(&config, &["--messages", "100", "--now-ms", "1796526000000"]); // 03:00 UTC
    assert_eq!(during["delivered"]["mx2.example.com:25"], 100, "{during}");
    let backup_down = plan_json(&config, &["--messages", "100", "--now-ms", "1796526000000", "--down", "mx2.example.com:25"]);
    assert_eq!(backup_down["delivered"]["mx1.example.com:25"], 100, "last resort, not excluded: {backup_down}");
}

/// Runs `command` in `dir` with the target directory the template's builds share; returns
/// its stdout, or panics with both streams.
fn run_in(dir: &std::path::Path, command: &[&str], env: &[(&str, &std::path::Path)]) -> String {
    let mut cmd = std::process::Command::new(command[0]);
    cmd.args(&command[1..]).current_dir(dir);
    // Flags meant for this test's own build must not reach the policy's.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"]
    {
        cmd.env_remove(var);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{command:?} failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

/// The policy SDK README's commands, as a policy's author runs them: `scripts/new-policy.sh`
/// makes a crate from `templates/policy`, its unit test passes, and `scripts/build-policy.sh`
/// makes a component that `mxrelay policy check` finds usable and a domain can plan with.
/// In a copy of the repository, since the first command adds the crate to the workspace.
#[test]
fn a_policy_made_from_the_template_builds_passes_the_check_and_plans() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let bin_dir = mxrelay_e2e::relay_binary().parent().expect("target/release").to_path_buf();
    assert!(
        bin_dir.join("mxrelay-componentize").is_file(),
        "build it first: cargo build --release --workspace --all-targets (scripts/test.sh does)"
    );
    let copy = tempfile::tempdir().expect("dir");
    for entry in ["Cargo.toml", "Cargo.lock", "rustfmt.toml", "crates", "policies", "templates", "scripts", "wit", "tests"] {
        let status = std::process::Command::new("cp").arg("-r").arg(repo.join(entry)).arg(copy.path()).status().expect("cp");
        assert!(status.success(), "copy {entry}");
    }
    // The guests' target directory (see mxrelay-wasm-build): the SDK's dependencies are built
    // there already for the wasm profile.
    let target = repo.join("target").join("wasm-guest");
    let env = [("CARGO_TARGET_DIR", target.as_path()), ("MXRELAY_BIN_DIR", bin_dir.as_path())];
    let dir = copy.path();

    let made = run_in(dir, &["bash", "scripts/new-policy.sh", "from-template"], &env);
    assert!(made.contains("created policies/from-template"), "{made}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_in(dir, &[&cargo, "test", "-q", "-p", "mxrelay-policy-from-template"], &env);
    let built = run_in(dir, &["bash", "scripts/build-policy.sh", "from-template", "{}"], &env);
    assert!(built.contains("golden scenarios:") && built.contains("\nusable\n"), "{built}");
    let component = built
        .lines()
        .find_map(|l| l.strip_prefix("component: "))
        .and_then(|l| l.split("  (").next())
        .unwrap_or_else(|| panic!("no component path in: {built}"));

    let config_dir = tempfile::tempdir().expect("dir");
    let block = format!("[[domain]]\nname = \"customer.test\"\npolicy = \"{component}\"\n{THREE}");
    let v = plan_json(&write_config(config_dir.path(), &block), &["--messages", "3000"]);
    assert_eq!(v["policy"], component, "{v}");
    // The template starts from the built-in plan: three equal servers share the mail.
    for server in ["old1.example.com:25", "old2.example.com:25", "new.example.com:25"] {
        let got = v["delivered"][server].as_u64().unwrap_or_else(|| panic!("no count for {server}: {v}"));
        assert!((999..=1001).contains(&got), "{server}: {got} of 3000: {v}");
    }
}

#[test]
fn policy_check_passes_the_examples_and_names_what_is_wrong_with_hostile_modules() {
    for (module, settings) in [
        (policy_module!(STICKY), "{}"),
        (policy_module!(MAINTENANCE), "{}"),
        (policy_module!(CANARY), r#"{"servers":["mx0.example.com"],"percent":10}"#),
        (policy_module!(HOSTILE), r#"{"mode":"fine"}"#),
    ] {
        let (ok, out, err) = mxrelay(&["policy", "check", module, "--settings", settings]);
        assert!(ok && out.contains("usable") && out.contains("plan calls: median"), "{module}: {out}{err}");
    }
    for (mode, reason) in [
        ("loop", "call used more than its 50 ms of CPU time"),
        ("memory", "memory limit of 16777216 bytes exceeded"),
        ("panic", "trapped: wasm trap"),
        ("garbage", "invalid plan"),
    ] {
        let settings = format!(r#"{{"mode":"{mode}"}}"#);
        let (ok, _, err) = mxrelay(&["policy", "check", policy_module!(HOSTILE), "--settings", &settings]);
        assert!(!ok && err.contains("is unusable") && err.contains(reason), "{mode}: {err}");
    }
    // Files that are not components are named for what they are.
    let junk = tempfile::NamedTempFile::new().expect("tmp");
    for (bytes, what) in [
        (
            &b"\0asm\x01\0\0\0"[..],
            "cannot load: a core WebAssembly module, not a component: encode it as one with mxrelay-componentize",
        ),
        (&b"# a README\n"[..], "cannot load: not a WebAssembly file (it does not begin with \\0asm)\n"),
    ] {
        std::fs::write(junk.path(), bytes).expect("write");
        let (ok, _, err) = mxrelay(&["policy", "check", &junk.path().display().to_string()]);
        assert!(!ok && err.contains(what), "{err}");
    }
    // Settings are a JSON object, as the relay hands a module its table.
    for (settings, what) in
        [("not json", "--settings is not JSON: expected ident at line 1 column 2"), ("[1]", "--settings must be a JSON object")]
    {
        let (ok, _, err) = mxrelay(&["policy", "check", policy_module!(STICKY), "--settings", settings]);
        assert!(!ok && err.contains(what), "{settings}: {err}");
    }
}

/// Hostile modules never stop delivery: every message is planned by the built-in fail-safe,
/// delivered exactly once, and the faults show in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_never_stop_delivery() {
    let a = Sink::start("127.0.1.50", &[]);
    let b = Sink::start("127.0.1.51", &[]);
    let (ah, ap) = a.host_port();
    let (bh, bp) = b.host_port();
    let modes = ["loop", "memory", "panic", "garbage"];
    let mut domains = String::new();
    for mode in modes {
        let extra = format!("policy = \"{}\"\n[domain.policy_config]\nmode = \"{mode}\"", policy_module!(HOSTILE));
        domains.push_str(&domain_with(&format!("{mode}.test"), &extra, &[(ah, ap, 10), (bh, bp, 20)]));
    }
    let relay = Relay::start_with("admin_listen = \"127.0.0.1:0\"", &domains, "retry = [\"1h\"]");
    let mut acked = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let base = i as u64 * 100;
        acked.extend(send(&relay.addr, &format!("user@{mode}.test"), base..base + 20, 5).await);
    }
    assert_eq!(acked.len(), 80);
    relay.eventually("all 80 delivered", || a.received().len() + b.received().len() == 80).await;
    mxrelay_e2e::assert_exactly_once(&[&a, &b], &acked);
    assert_eq!(b.count(), 0, "the fail-safe keeps preference order: the backup got mail");
    let metrics = relay.metrics();
    for mode in modes {
        let n = mxrelay_e2e::metric(&metrics, &format!("mxrelay_policy_fallbacks_total{{domain=\"{mode}.test\"}}"));
        assert!(n.is_some_and(|n| n >= 1.0), "no fallback counted for {mode}:\n{metrics}");
    }
    relay.logged(&["planned by the built-in fail-safe", "50 ms of CPU time"]).await;
}

/// Replacing a module file reloads it; a broken replacement is refused and the old one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_modules_reload_and_broken_ones_are_refused() {
    let a = Sink::start("127.0.1.52", &[]);
    let b = Sink::start("127.0.1.53", &[]);
    let (ah, ap) = a.host_port();
    let (bh, bp) = b.host_port();
    let modules = tempfile::tempdir().expect("dir");
    let module = modules.path().join("policy.wasm");
    std::fs::copy(policy_module!(STICKY), &module).expect("copy");
    let policy = format!("policy = \"{}\"", module.display());
    let domain = domain_with("customer.test", &policy, &[(ah, ap, 10), (bh, bp, 10)]);
    let relay = Relay::start(&domain, "retry = [\"1h\"]");
    // Sticky: one mailbox, one server.
    send(&relay.addr, "alice@customer.test", 0..20, 4).await;
    relay.eventually("20 delivered", || a.count() + b.count() == 20).await;
    assert!(a.count() == 20 || b.count() == 20, "sticky split alice: {} / {}", a.count(), b.count());

    // A broken file is refused; sticky stays in service.
    std::fs::write(&module, b"not a component").expect("write");
    relay.eventually("broken module refused", || !relay.log_lines(&["policy module refused"]).is_empty()).await;
    send(&relay.addr, "alice@customer.test", 20..40, 4).await;
    relay.eventually("40 delivered", || a.count() + b.count() == 40).await;
    assert!(a.count() == 40 || b.count() == 40, "the previous module left service: {} / {}", a.count(), b.count());

    // The built-in policy as a module file: alice's mail is shared again.
    let tmp = modules.path().join("next.wasm");
    std::fs::write(&tmp, mxrelay_policy_host::BUILTIN_COMPONENT).expect("write");
    std::fs::rename(&tmp, &module).expect("rename");
    relay.eventually("module reloaded", || !relay.log_lines(&["policy modules reloaded"]).is_empty()).await;
    let (a0, b0) = (a.count(), b.count());
    send(&relay.addr, "alice@customer.test", 40..100, 4).await;
    relay.eventually("100 delivered", || a.count() + b.count() == 100).await;
    assert!(a.count() > a0 + 15 && b.count() > b0 + 15, "after reload: {} / {}", a.count() - a0, b.count() - b0);
}

/// Domains that share an instance keep their own fate: when one domain's call traps, the
/// instance is dropped, and the other domain's next call makes its router again in a new
/// one and is planned by the component, not the fail-safe.
#[test]
fn a_trap_in_a_shared_instance_fails_only_the_domain_that_trapped() {
    use mxrelay_policy_core::Server;
    use mxrelay_policy_host::{DomainPolicy, Limits, PlanRequest, PlanSource, PolicyEngine, PolicyError};
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let bytes = std::fs::read(policy_module!(HOSTILE)).expect("module");
    let component = engine.load("hostile", &bytes).expect("load");
    assert_eq!(component.domains_per_instance(), 1, "a custom module's domains each have an instance of their own");
    let shared = component.with_domains_per_instance(2);
    let servers = vec![Server::new("a.example.com", 10), Server::new("b.example.com", 20)];
    let failing =
        DomainPolicy::new(shared.clone(), "failing.test", servers.clone(), r#"{"mode":"panic"}"#.into()).expect("policy");
    let fine = DomainPolicy::new(shared.clone(), "fine.test", servers, r#"{"mode":"fine"}"#.into()).expect("policy");
    assert_eq!(shared.instances_in_use(), 1, "both domains in one instance");
    let msg = PlanRequest { seed: 1, attempt: 1, now_ms: 0, down: &[0], recipients: &[], sender: "", size: 0 };
    for round in 0..3 {
        let plan = fine.plan(&msg);
        assert!(matches!(plan.source, PlanSource::Component), "round {round}: {:?}", plan.source);
        assert_eq!(plan.order, vec![1, 0]);
        let plan = failing.plan(&msg);
        assert!(matches!(plan.source, PlanSource::Fallback(PolicyError::Trap { .. })), "round {round}: {:?}", plan.source);
        assert_eq!(plan.order, vec![1, 0], "the fail-safe plan");
    }
    assert!(failing.is_cooling_down() && !fine.is_cooling_down());
    drop(failing);
    drop(fine);
    assert_eq!(shared.instances_in_use(), 0);
}

/// A module that keeps failing is set aside: after three failures in a row the built-in core
/// plans without calling it, until the cool-down ends.
#[test]
fn a_module_that_keeps_failing_is_set_aside() {
    use mxrelay_policy_core::Server;
    use mxrelay_policy_host::{DomainPolicy, Limits, PlanRequest, PlanSource, PolicyEngine, PolicyError};
    let engine = PolicyEngine::new(Limits::default()).expect("engine");
    let bytes = std::fs::read(policy_module!(HOSTILE)).expect("module");
    let component = engine.load("hostile", &bytes).expect("load");
    let servers = vec![Server::new("a.example.com", 10), Server::new("b.example.com", 20)];
    let policy = DomainPolicy::new(component, "example.com", servers, r#"{"mode":"loop"}"#.into()).expect("policy");
    let msg = PlanRequest { seed: 1, attempt: 1, now_ms: 0, down: &[0], recipients: &[], sender: "", size: 0 };
    for round in 0..3 {
        assert!(!policy.is_cooling_down(), "set aside after only {round} failures");
        let plan = policy.plan(&msg);
        assert!(matches!(plan.source, PlanSource::Fallback(PolicyError::Timeout { .. })), "{:?}", plan.source);
        assert_eq!(plan.order, vec![1, 0], "the fail-safe plan honours the down list");
    }
    assert!(policy.is_cooling_down());
    let plan = policy.plan(&msg);
    assert!(matches!(plan.source, PlanSource::Fallback(_)));
    assert_eq!(plan.order, vec![1, 0]);
}

/// The epoch ticker sleeps once no policy call has been made for a second, so an idle relay
/// is not woken 200 times a second. A call that starts wakes it, and one that runs longer
/// than that second keeps it awake: an endless loop is interrupted as on a busy engine.
#[test]
fn an_endless_loop_is_interrupted_after_the_engine_has_been_idle() {
    use mxrelay_policy_core::Server;
    use mxrelay_policy_host::{DomainPolicy, Limits, PlanRequest, PlanSource, PolicyEngine, PolicyError};
    use std::time::{Duration, Instant};
    let limits = Limits { call_deadline: Duration::from_millis(1500), ..Limits::default() };
    let engine = PolicyEngine::new(limits).expect("engine");
    let bytes = std::fs::read(policy_module!(HOSTILE)).expect("module");
    let component = engine.load("hostile", &bytes).expect("load");
    let servers = vec![Server::new("a.example.com", 10), Server::new("b.example.com", 20)];
    let policy = DomainPolicy::new(component, "example.com", servers, r#"{"mode":"loop"}"#.into()).expect("policy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !engine.is_idle() {
        assert!(Instant::now() < deadline, "the ticker kept ticking with no call for 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let msg = PlanRequest { seed: 1, attempt: 1, now_ms: 0, down: &[], recipients: &[], sender: "", size: 0 };
        let _ = done.send(policy.plan(&msg));
    });
    let plan = outcome.recv_timeout(Duration::from_secs(60)).expect("the endless call was never interrupted");
    assert!(matches!(plan.source, PlanSource::Fallback(PolicyError::Timeout { .. })), "{:?}", plan.source);
    assert_eq!(plan.order, vec![0, 1], "the fail-safe plan");
}
