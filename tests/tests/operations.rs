//! Operating the relay: live reload on SIGHUP, graceful shutdown on SIGTERM, the queue
//! commands, and the source address of deliveries.

use std::sync::atomic::{AtomicUsize, Ordering};

use mxrelay_e2e::strace::{Strace, thread};
use mxrelay_e2e::{
    Relay, Sink, domain_block, domain_with, eventually, http_get, listens_on, mxrelay, relay_binary, send, send_one,
    spawn_until_ready,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_config_and_refuses_a_broken_one() {
    let a = Sink::start("127.0.1.80", &[]);
    let b = Sink::start("127.0.1.81", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&a, 10)]), "");
    assert!(send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("first message at a", || a.count() == 1).await;
    assert!(!send_one(&relay.addr, "user@second.test", 2).await, "second.test is not configured yet");

    // New server list for customer.test and a new domain, applied without a restart.
    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    let head = text.split("[[domain]]").next().expect("head").to_string();
    let next = format!("{head}{}{}", domain_block("customer.test", &[(&b, 10)]), domain_block("second.test", &[(&b, 10)]));
    std::fs::write(&path, &next).expect("write");
    relay.signal("HUP");
    relay.eventually("reloaded", || !relay.log_lines(&["configuration reloaded"]).is_empty()).await;
    assert!(send_one(&relay.addr, "user@customer.test", 3).await);
    assert!(send_one(&relay.addr, "user@second.test", 4).await, "the new domain is accepted");
    relay.eventually("both at b", || b.count() == 2).await;
    assert_eq!(a.count(), 1, "the old server list is gone");

    // A broken config is refused with the errors logged; the running one stays.
    std::fs::write(&path, next.replace("preference = 10", "preference = 70000")).expect("write");
    relay.signal("HUP");
    relay.eventually("refused", || !relay.log_lines(&["reload refused", "70000"]).is_empty()).await;
    assert!(send_one(&relay.addr, "user@customer.test", 5).await);
    relay.eventually("still delivered by b", || b.count() == 3).await;
}

/// Under systemd (`Type=notify`, `WatchdogSec=`), the relay says over `$NOTIFY_SOCKET` when
/// it accepts mail, when a reload starts and how it ended, and when it stops, and pings the
/// watchdog meanwhile.
#[test]
fn systemd_is_told_of_readiness_reloads_and_shutdown_and_the_watchdog_is_pinged() {
    let notify = mxrelay_e2e::NotifySocket::bind();
    let env = [("NOTIFY_SOCKET", notify.path.as_str()), ("WATCHDOG_USEC", "200000")];
    let mut relay =
        Relay::start_with_env(&env, "", &mxrelay_e2e::domain_with("customer.test", "", &[("127.0.1.148", 25, 10)]), "");
    let receive = || notify.receive();
    // The next notification that is not a watchdog ping (those are counted).
    let next = |pings: &mut u32| loop {
        match receive() {
            ping if ping == "WATCHDOG=1" => *pings += 1,
            other => return other,
        }
    };
    let mut pings = 0;
    let ready = format!("READY=1\nSTATUS=accepting mail on {}", relay.addr);
    assert_eq!(next(&mut pings), ready);

    relay.signal("HUP");
    let reloading = next(&mut pings);
    assert!(reloading.starts_with("RELOADING=1\n") && reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(next(&mut pings), ready);

    let config = relay.config_path();
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("preference = 10", "preference = 70000")).expect("write");
    relay.signal("HUP");
    assert!(next(&mut pings).starts_with("RELOADING=1\n"));
    assert_eq!(next(&mut pings), format!("{ready}; the last reload was refused (see the log)"));

    // The watchdog is pinged every 100 ms, also after the reloads.
    for _ in 0..2 {
        assert_eq!(receive(), "WATCHDOG=1");
    }
    assert!(pings > 0, "pinged from the start");
    relay.signal("TERM");
    let stopping = next(&mut pings);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert!(relay.wait_exit());
}

/// A reload that takes long holds up neither intake nor delivery. Here the configuration
/// file is a named pipe that the test writes only after mail has gone through, so the reload
/// waits on it all that time. The relay has one runtime worker: a reload that blocked it, or
/// held a lock that sessions or deliveries take, would stop the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_through_while_a_reload_waits_to_read_its_file() {
    let notify = mxrelay_e2e::NotifySocket::bind();
    let sink = Sink::start("127.0.1.164", &[]);
    let env = [("NOTIFY_SOCKET", notify.path.as_str()), ("TOKIO_WORKER_THREADS", "1")];
    let relay = Relay::start_with_env(&env, "", &domain_block("customer.test", &[(&sink, 10)]), "");
    let ready = notify.receive();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::remove_file(&path).expect("remove the config");
    let made = std::process::Command::new("mkfifo").arg(&path).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");

    relay.signal("HUP");
    let reloading = notify.receive();
    assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
    // The reload now waits for a writer of the pipe.
    let sent = tokio::time::timeout(mxrelay_e2e::PATIENCE, send(&relay.addr, "user@customer.test", 0..10, 4)).await;
    assert_eq!(sent.map(|acked| acked.len()), Ok(10), "mail refused, or unanswered for 30 s, during the reload");
    relay.eventually("delivered during the reload", || sink.count() == 10).await;
    assert!(relay.log_lines(&["configuration reloaded"]).is_empty(), "the reload ended before its file was written");
    assert!(!send_one(&relay.addr, "user@second.test", 10).await, "second.test is not configured yet");

    // Written, the file is read, and the reload ends and is applied.
    let next = format!("{text}{}", domain_block("second.test", &[(&sink, 10)]));
    let writer = std::thread::spawn(move || std::fs::write(&path, next));
    assert_eq!(notify.receive(), ready);
    assert!(writer.join().expect("writer").is_ok(), "writing the pipe");
    assert!(send_one(&relay.addr, "user@second.test", 11).await, "the reloaded configuration is in force");
    relay.eventually("delivered after the reload", || sink.count() == 11).await;
}

/// A service manager that stops reading `$NOTIFY_SOCKET` (its queue holds ten datagrams)
/// never holds up mail: with one runtime thread, a relay that sent from it stopped
/// accepting once the queue was full.
#[tokio::test]
async fn a_service_manager_that_stops_reading_never_holds_up_mail() {
    let notify = mxrelay_e2e::NotifySocket::bind();
    let sink = Sink::start("127.0.1.152", &[]);
    let env = [("NOTIFY_SOCKET", notify.path.as_str()), ("WATCHDOG_USEC", "20000"), ("TOKIO_WORKER_THREADS", "1")];
    let relay = Relay::start_with_env(&env, "", &domain_block("customer.test", &[(&sink, 10)]), "");
    relay.logged(&["not reading its notifications"]).await;
    let acked = send(&relay.addr, "user@customer.test", 0..20, 4).await;
    assert_eq!(acked.len(), 20, "mail refused or unanswered while the service manager was not reading");
    relay.eventually("all delivered", || sink.count() == 20).await;
    // Reading again, it hears the watchdog again.
    notify.drain();
    assert_eq!(notify.receive(), "WATCHDOG=1");
}

/// A log reader that stops reading (a stalled journald: stderr is a stream that fills)
/// never holds up mail. With one runtime thread, a relay that wrote its log from it stopped
/// once the pipe was full (some 300 lines). Past the 10 000 lines that may wait, lines are
/// dropped, and the relay says how many once it is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_never_holds_up_mail() {
    let sink = Sink::start("127.0.1.154", &[]);
    let relay = Relay::start_with_env(
        &[("TOKIO_WORKER_THREADS", "1")],
        "admin_listen = \"127.0.0.1:0\"",
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    relay.pause_log_reader();
    // Two lines a message (accepted, delivered): more than may wait.
    let acked = send(&relay.addr, "user@customer.test", 0..6000, 20).await;
    assert_eq!(acked.len(), 6000, "mail refused or unanswered while nothing read the log");
    relay.eventually("all delivered", || sink.count() == 6000).await;
    relay.resume_log_reader();
    relay.logged(&["log lines dropped: stderr was not being read"]).await;
    // Counted for monitoring too (set before the line above is logged).
    let metrics = relay.metrics();
    let dropped = mxrelay_e2e::metric(&metrics, "mxrelay_log_lines_dropped_total");
    assert!(dropped.is_some_and(|n| n > 0.0), "{metrics}");
}

/// Saves `[host]` as `domain`'s server list through the admin API; panics unless `200`.
fn save_server_list(admin: &str, token: &str, domain: &str, host: &str) {
    let body = format!(r#"[{{"host":"{host}","preference":10}}]"#);
    let (status, reply) = mxrelay_e2e::http_request(admin, "PUT", &format!("/api/domains/{domain}/servers"), Some(token), &body);
    assert_eq!(status, 200, "{domain}: {reply}");
}

/// `domain`'s server list in force, as the admin API shows it (JSON).
fn server_list_in_force(admin: &str, token: &str, domain: &str) -> String {
    mxrelay_e2e::http_request(admin, "GET", &format!("/api/domains/{domain}/servers"), Some(token), "").1
}

/// Server lists saved through the API at the same time, for different domains, are all
/// kept: in force, in the config file, and so after a restart.
#[test]
fn server_lists_saved_at_once_are_all_kept() {
    const TOKEN: &str = "lists-test-token-0123456789";
    let domains = ["d1.test", "d2.test", "d3.test", "d4.test"];
    let blocks: String = domains.iter().map(|d| mxrelay_e2e::domain_with(d, "", &[("127.0.1.155", 25, 10)])).collect();
    let mut relay = Relay::start_with(&format!("admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\""), &blocks, "");
    let admin = relay.admin_addr();
    let last = |d: &str| format!("mx9.{d}");
    std::thread::scope(|s| {
        for d in domains {
            let admin = &admin;
            s.spawn(move || {
                for i in 0..10 {
                    save_server_list(admin, TOKEN, d, &format!("mx{i}.{d}"));
                }
            });
        }
    });
    let in_force = |relay: &Relay, d: &str| server_list_in_force(&relay.admin_addr(), TOKEN, d);
    let config = std::fs::read_to_string(relay.config_path()).expect("config");
    for d in domains {
        assert!(in_force(&relay, d).contains(&format!("\"{}\"", last(d))), "{d}: {}", in_force(&relay, d));
        assert!(config.contains(&format!("\"{}\"", last(d))), "{d} lost from the file:\n{config}");
    }
    relay.kill9();
    relay.restart();
    for d in domains {
        assert!(in_force(&relay, d).contains(&format!("\"{}\"", last(d))), "{d} after a restart: {}", in_force(&relay, d));
    }
}

/// A misspelt key in a server list sent to the API is refused, naming the entry and the key,
/// and nothing changes. Read as the default, `prefrence = 20` would have made the backup a
/// primary.
#[test]
fn a_server_list_with_an_unknown_key_is_refused_and_nothing_changes() {
    const TOKEN: &str = "unknown-key-token-0123456789";
    let block = domain_with("customer.test", "", &[("127.0.1.155", 25, 10), ("127.0.1.156", 25, 20)]);
    let relay = Relay::start_with(&format!("admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\""), &block, "");
    let admin = relay.admin_addr();
    let state =
        || (server_list_in_force(&admin, TOKEN, "customer.test"), std::fs::read_to_string(relay.config_path()).expect("config"));
    let before = state();
    let list = r#"[{"host":"mx1.customer.test","preference":10},{"host":"backup.customer.test","prefrence":20}]"#;
    let unknown = "prefrence: unknown field `prefrence`, expected one of `host`, `port`, `preference`, `weight`";
    let (status, reply) = mxrelay_e2e::http_request(&admin, "PUT", "/api/domains/customer.test/servers", Some(TOKEN), list);
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains(&format!("the body must be a JSON list of servers: [1].{unknown}\"")), "{reply}");
    let test = format!(r#"{{"servers":{list}}}"#);
    let (status, reply) = mxrelay_e2e::http_request(&admin, "POST", "/api/domains/customer.test/test", Some(TOKEN), &test);
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains(&format!("servers[1].{unknown}\"")), "{reply}");
    assert_eq!(state(), before, "nothing changed, in force or in the file");
}

/// A `200` to a `PUT` of a server list means the new file is on disk and stays there
/// through a power cut: it is written whole under another name and synced, then renamed over
/// the config file, and the directory is synced before the answer. No test here can cut the
/// power, so this one watches the relay's system calls with strace: a sync missing, or one
/// moved after the rename or the answer, fails it.
#[test]
fn a_saved_server_list_is_synced_before_the_put_is_answered() {
    const TOKEN: &str = "synced-test-token-0123456789";
    let block = mxrelay_e2e::domain_with("customer.test", "", &[("127.0.1.160", 25, 10)]);
    let relay = Relay::start_with(&format!("admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\""), &block, "");
    let admin = relay.admin_addr();
    let config = std::fs::canonicalize(relay.config_path()).expect("config path");
    let dir = config.parent().expect("config dir").display().to_string();
    let (config, tmp) = (config.display().to_string(), format!("{}.tmp", config.display()));
    let calls = "fsync,fdatasync,rename,renameat,renameat2";
    let strace = Strace::attach(relay.pid(), calls, relay.dir.path(), || {
        save_server_list(&admin, TOKEN, "customer.test", "warm-up.customer.test");
    });
    save_server_list(&admin, TOKEN, "customer.test", "mx-synced.customer.test");
    let lines = strace.finish();
    let record = lines.join("\n");
    // The calls of the last save, by the thread that made them: after the rename of the save
    // before it (the warm-up's, answered before the last one was sent).
    let renames = |l: &String| l.contains(&format!("\"{tmp}\", ")) && l.contains(&format!("\"{config}\""));
    let rename = lines.iter().rposition(renames).unwrap_or_else(|| panic!("no rename of {tmp} over {config}:\n{record}"));
    let before = lines[..rename].iter().rposition(renames).map_or(0, |i| i + 1);
    let own = |i: &usize| thread(&lines[*i]) == thread(&lines[rename]);
    let synced = |path: &str, range: std::ops::Range<usize>| {
        range.filter(own).any(|i| lines[i].contains("sync(") && lines[i].contains(&format!("<{path}>")))
    };
    assert!(synced(&tmp, before..rename), "{tmp} was not synced before the rename:\n{record}");
    assert!(synced(&dir, rename + 1..lines.len()), "{dir} was not synced after the rename, before the 200:\n{record}");
    assert!(std::fs::read_to_string(&config).expect("config").contains("mx-synced.customer.test"));
}

/// A reload (SIGHUP) while server lists are being saved through the API never undoes a save:
/// each list is in force as soon as its `PUT` has answered, and stays so, however the reloads
/// fall. A reload that read the file before a save and applied it after would put the old
/// list back. A domain with a custom policy makes each reload take some 90 ms (the module is
/// compiled again), so that saves fall inside reloads, and the saves go on until twenty
/// reloads have ended. (Without the lock that keeps them apart, it failed 11 runs in 12.)
#[test]
fn reloads_while_server_lists_are_saved_never_undo_a_save() {
    const TOKEN: &str = "reload-test-token-0123456789";
    const RELOADS: usize = 20;
    let domains = ["r1.test", "r2.test"];
    let mut blocks: String = domains.iter().map(|d| mxrelay_e2e::domain_with(d, "", &[("127.0.1.157", 25, 10)])).collect();
    let sticky = format!("policy = \"{}\"", mxrelay_e2e::policy_module!(STICKY));
    blocks.push_str(&mxrelay_e2e::domain_with("sticky.test", &sticky, &[("127.0.1.157", 25, 10)]));
    let relay = Relay::start_with(&format!("admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\""), &blocks, "");
    let admin = relay.admin_addr();
    let reloaded = || relay.log_lines(&["configuration reloaded"]).len();
    let reloads = AtomicUsize::new(0);
    let last_saved: Vec<String> = std::thread::scope(|s| {
        let savers: Vec<_> = domains
            .iter()
            .map(|d| {
                let (admin, reloads) = (&admin, &reloads);
                s.spawn(move || {
                    let mut i = 0;
                    loop {
                        let host = format!("mx{i}.{d}");
                        save_server_list(admin, TOKEN, d, &host);
                        let in_force = server_list_in_force(admin, TOKEN, d);
                        assert!(in_force.contains(&format!("\"{host}\"")), "{d}: saved {host}, in force {in_force}");
                        if reloads.load(Ordering::SeqCst) >= RELOADS {
                            return host;
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        // One reload after another, for as long as the saves go on.
        while savers.iter().any(|saver| !saver.is_finished()) {
            let before = reloaded();
            relay.signal("HUP");
            assert!(mxrelay_e2e::wait_until(mxrelay_e2e::PATIENCE, || reloaded() > before), "{}", relay.log_text());
            reloads.fetch_add(1, Ordering::SeqCst);
        }
        savers.into_iter().map(|saver| saver.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    // The last reload may have begun before the last save.
    let config = std::fs::read_to_string(relay.config_path()).expect("config");
    for (d, host) in domains.iter().zip(&last_saved) {
        let in_force = server_list_in_force(&admin, TOKEN, d);
        assert!(in_force.contains(&format!("\"{host}\"")), "{d}: {host}, the last list saved, is no longer in force: {in_force}");
        assert!(config.contains(&format!("\"{host}\"")), "{d}: {host}, the last list saved, is not in the file:\n{config}");
    }
}

/// The systemd unit in `contrib/` passes `systemd-analyze verify` with no complaint (an
/// unknown key or a command that cannot run would be one), and runs the relay the way the
/// test above does: `Type=notify` with a watchdog, and a reload by SIGHUP. It and the
/// README's run script keep glibc to two malloc arenas (the README's memory figures after a
/// restart with a large queue depend on it).
#[test]
fn the_systemd_unit_is_valid() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(repo.join("contrib/systemd/mxrelay.service")).expect("unit");
    let lines = [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/local/bin/mxrelay run ",
        "Environment=MALLOC_ARENA_MAX=2",
    ];
    for line in lines {
        assert!(unit.lines().any(|l| l.starts_with(line)), "no {line} line");
    }
    let run = std::fs::read_to_string(repo.join("scripts/run.sh")).expect("run script");
    assert!(run.lines().any(|l| l.starts_with("export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2}")), "{run}");
    // Verified with this build standing in for the installed binary.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mxrelay.service");
    let binary = mxrelay_e2e::relay_binary();
    std::fs::write(&path, unit.replace("/usr/local/bin/mxrelay", &binary.display().to_string())).expect("write");
    let out =
        std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().expect("systemd-analyze");
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && complaints.trim().is_empty(), "{complaints}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_delivery_in_flight_finish_and_keeps_the_rest_queued() {
    // The sink waits 2 s before answering DATA, so the first delivery is in flight when the
    // relay is told to stop; one worker means the other two have not started.
    let mut slow = Sink::start("127.0.1.82", &["-w", "2"]);
    let (mut relay, admin) = with_admin(&format!("127.0.1.82:{}", slow.host_port().1), "workers = 1\nretry = [\"1h\"]");
    let acked = send(&relay.addr, "user@customer.test", 0..3, 3).await;
    assert_eq!(acked.len(), 3);
    relay.eventually("first delivery under way", || !relay.log_lines(&["accepted"]).is_empty()).await;
    relay.signal("TERM");
    // While the delivery finishes, a load balancer is told to send mail elsewhere.
    relay
        .eventually("/healthz says stopping", || {
            let (status, body) = mxrelay_e2e::http_request(&admin, "GET", "/healthz", None, "");
            status == 503 && body.contains("\"stopping\"")
        })
        .await;
    assert!(relay.wait_exit(), "graceful shutdown exits with 0");
    relay.logged(&["stopped; queued mail stays queued"]).await;
    assert_eq!(slow.count(), 1, "exactly the delivery in flight finished");

    // The rest was kept and goes out on the next start, each message once.
    slow.kill();
    slow.restart();
    relay.restart();
    relay.eventually("the queued two delivered", || slow.received().len() == 3).await;
    mxrelay_e2e::assert_exactly_once(&[&slow], &acked);
}

/// A relay with the admin API on, delivering customer.test to `server` (`IP:PORT`), with
/// `delivery` lines; returns it and the admin address.
fn with_admin(server: &str, delivery: &str) -> (Relay, String) {
    let (host, port) = server.split_once(':').expect("addr");
    // A fixed port, since `mxrelay queue` reads it from the config, on an address of its
    // own: ports of 127.0.0.1 are also taken by the tests' outgoing connections.
    let admin = format!("127.0.2.1:{}", mxrelay_e2e::free_port("127.0.2.1"));
    let domain = format!("[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"{host}\"\nport = {port}\n");
    let relay = Relay::start_with(
        &format!("admin_listen = \"{admin}\"\nadmin_token = \"queue-test-token-0123456789\""),
        &domain,
        delivery,
    );
    (relay, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_retry_and_remove_against_a_running_relay() {
    // The customer's server is down and no probe will notice it coming back (1 h): only the
    // operator's retry brings the mail out.
    let sink_addr = format!("127.0.1.83:{}", mxrelay_e2e::free_port("127.0.1.83"));
    let (relay, admin) = with_admin(&sink_addr, "retry = [\"1h\"]\nprobe_interval = \"1h\"");
    let config = relay.config_path().display().to_string();
    let acked = send(&relay.addr, "user@customer.test", 0..3, 3).await;
    assert_eq!(acked.len(), 3);
    relay.eventually("three deferred", || relay.log_lines(&["deferred"]).len() >= 3).await;

    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "list", &config]);
    assert!(ok && out.contains("3 queued") && out.contains("customer.test"), "{out}{err}");
    // One domain's mail: a customer's own, and nothing for a domain with none queued.
    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "list", &config, "--domain", "Customer.Test"]);
    assert!(ok && out.contains("3 queued"), "{out}{err}");
    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "list", &config, "--domain", "other.test"]);
    assert!(ok && out.contains("the queue is empty"), "{out}{err}");
    let (ok, _, err) = mxrelay_e2e::mxrelay(&["queue", "list", &config, "--domain", "a b"]);
    assert!(!ok && err.contains("\"a b\" is not a domain name"), "{err}");
    let token = Some("queue-test-token-0123456789");
    // Health for load balancers: no token, and the queue's writer and the scheduler answered.
    let (status, body) = mxrelay_e2e::http_request(&admin, "GET", "/healthz", None, "");
    assert!(status == 200 && body.contains("\"ok\""), "{status} {body}");
    let (status, body) = mxrelay_e2e::http_request(&admin, "GET", "/api/queue?sender=x", token, "");
    assert!(status == 400 && body.contains("?domain=NAME"), "{status} {body}");
    let (ok, json, _) = mxrelay_e2e::mxrelay(&["queue", "list", &config, "--json"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&json).expect("json");
    let first = list[0]["id"].as_str().expect("id").to_string();

    // What is queued, as Postfix's postcat shows it: the envelope and headers, or all of it.
    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "show", &config, &first]);
    assert!(ok && out.starts_with(&format!("id: {first}\ndomain: customer.test\nsender: <sender@src.test>\n")), "{out}{err}");
    assert!(out.contains("\nReceived: from ") && out.contains("\nX-Seq: ") && !out.contains("END-OF-MESSAGE"), "{out}");
    let (ok, full, err) = mxrelay_e2e::mxrelay(&["queue", "show", &config, &first, "--full"]);
    assert!(ok && full.contains("X-Seq: ") && full.contains("END-OF-MESSAGE"), "{full}{err}");
    let (ok, _, err) = mxrelay_e2e::mxrelay(&["queue", "show", &config, "00000000000000FF"]);
    assert!(!ok && err.contains("404"), "{err}");

    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "remove", &config, &first]);
    assert!(ok && out.contains(&first), "{out}{err}");
    let (ok, _, err) = mxrelay_e2e::mxrelay(&["queue", "remove", &config, &first]);
    assert!(!ok && err.contains("404"), "removing twice: {err}");
    let (_, out, _) = mxrelay_e2e::mxrelay(&["queue", "list", &config]);
    assert!(out.contains("2 queued"), "{out}");
    let metrics = mxrelay_e2e::http_get(&admin, "/metrics");
    assert_eq!(mxrelay_e2e::metric(&metrics, "mxrelay_queue_size "), Some(2.0), "{metrics}");
    let age = mxrelay_e2e::metric(&metrics, "mxrelay_queue_oldest_seconds ").expect("queue age metric");
    assert!(age > 0.0 && age < 60.0, "oldest queued message is {age} s old");
    let series = "mxrelay_domain_queue_size{domain=\"customer.test\"} ";
    assert_eq!(mxrelay_e2e::metric(&metrics, series), Some(2.0), "{metrics}");
    let domain_age = mxrelay_e2e::metric(&metrics, "mxrelay_domain_queue_oldest_seconds{domain=\"customer.test\"} ");
    assert_eq!(domain_age, Some(age), "one domain: its oldest is the queue's oldest");

    // A retry of what is not queued says so.
    let (ok, _, err) = mxrelay_e2e::mxrelay(&["queue", "retry", &config, &first]);
    assert!(!ok && err.contains("404") && err.contains("is not in the queue"), "retrying a removed message: {err}");
    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "retry", &config, "--domain", "other.test"]);
    assert!(ok && out == "no message for other.test is queued\n", "{out}{err}");

    let sink = Sink::start_at(&sink_addr, &[]);
    let (ok, out, err) = mxrelay_e2e::mxrelay(&["queue", "retry", &config, "--domain", "customer.test"]);
    assert!(ok && out == "retrying 2 messages for customer.test now\n", "{out}{err}");
    relay.eventually("the two left delivered", || sink.count() == 2).await;
    relay.eventually("queue empty", || mxrelay_e2e::mxrelay(&["queue", "list", &config]).1.contains("the queue is empty")).await;
    let metrics = mxrelay_e2e::http_get(&admin, "/metrics");
    assert_eq!(mxrelay_e2e::metric(&metrics, series), Some(0.0), "a drained domain reads 0: {metrics}");
    // Both were queued for longer than the oldest's age at the first scrape.
    assert_eq!(mxrelay_e2e::metric(&metrics, "mxrelay_delivery_delay_seconds_count "), Some(2.0), "{metrics}");
    let delays = mxrelay_e2e::metric(&metrics, "mxrelay_delivery_delay_seconds_sum ").expect("delay sum");
    assert!(delays >= 2.0 * age, "delivery delays {delays} s in all, each message queued for over {age} s");
    assert_eq!(sink.received().len(), 2, "the removed message must not be delivered");

    let (ok, _, err) =
        mxrelay_e2e::mxrelay(&["queue", "list", &relay.config_path().with_file_name("missing.toml").display().to_string()]);
    assert!(!ok && err.contains("cannot read"), "{err}");
}

/// Held mail gets no attempt, not on the operator's retry, nor when its server comes back,
/// nor after a crash and restart, while new mail for the same domain flows; released, it is
/// delivered at once, exactly once.
/// Sends `message` (CRLF lines, any bytes) as 8-bit MIME in one plain SMTP session;
/// returns the reply to the final dot.
fn send_bytes(addr: &str, rcpt: &str, message: &[u8]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut reply = || {
        let mut last = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("reply");
            last.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return last;
            }
        }
    };
    let mut w = &stream;
    let mut say = |bytes: &[u8]| w.write_all(bytes).expect("write");
    reply();
    say(b"EHLO sender.test\r\n");
    reply();
    for command in
        ["MAIL FROM:<sender@src.test> BODY=8BITMIME\r\n".to_string(), format!("RCPT TO:<{rcpt}>\r\n"), "DATA\r\n".into()]
    {
        say(command.as_bytes());
        let r = reply();
        assert!(r.starts_with('2') || r.starts_with('3'), "{command:?} got {r}");
    }
    say(message);
    say(b".\r\n");
    let end = reply();
    say(b"QUIT\r\n");
    end
}

/// `queue show --full` prints the queued message byte for byte, as `postcat` does, also
/// when it is not UTF-8 (Latin-1 text from an old mail client) and larger than one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_show_full_prints_an_8bit_message_byte_for_byte() {
    let closed = format!("127.0.1.144:{}", mxrelay_e2e::free_port("127.0.1.144"));
    let (relay, _) = with_admin(&closed, "retry = [\"1h\"]\nprobe_interval = \"1h\"");
    let config = relay.config_path().display().to_string();
    let mut message = b"From: M\xfcller <sender@src.test>\r\nSubject: r\xe9sum\xe9\r\n\r\n".to_vec();
    for line in 0..2000 {
        message.extend_from_slice(format!("{line:04} Gr\u{fc}\u{df}e, caf").as_bytes());
        message.extend_from_slice(b"\xe9 \xff\r\n");
    }
    let end = send_bytes(&relay.addr, "user@customer.test", &message);
    assert!(end.starts_with("250"), "{end}");
    relay.eventually("deferred", || !relay.log_lines(&["deferred"]).is_empty()).await;
    let (_, json, _) = mxrelay(&["queue", "list", &config, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&json).expect("json");
    let id = list[0]["id"].as_str().expect("id");

    let out = std::process::Command::new(mxrelay_e2e::relay_binary())
        .args(["queue", "show", &config, id, "--full"])
        .output()
        .expect("run mxrelay");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.starts_with(b"Received: from "), "the relay's trace header comes first");
    assert!(out.stdout.ends_with(&message), "the message as sent follows, byte for byte ({} bytes shown)", out.stdout.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_mail_waits_through_retries_and_restarts_until_released() {
    let sink_addr = format!("127.0.1.141:{}", mxrelay_e2e::free_port("127.0.1.141"));
    let (mut relay, admin) = with_admin(&sink_addr, "retry = [\"1h\"]");
    let config = relay.config_path().display().to_string();
    let queue = |args: &[&str]| {
        let (ok, out, err) = mxrelay(&[&["queue"], args].concat());
        assert!(ok, "queue {args:?}: {err}");
        out
    };
    let acked = send(&relay.addr, "user@customer.test", 0..3, 3).await;
    assert_eq!(acked.len(), 3);
    relay.eventually("three deferred", || relay.log_lines(&["deferred"]).len() >= 3).await;

    assert_eq!(queue(&["hold", &config, "--domain", "customer.test"]), "held 3 messages\n");
    assert_eq!(queue(&["hold", &config, "--all"]), "held 0 messages\n", "already held");
    let list = queue(&["list", &config]);
    assert_eq!(list.matches(" held ").count(), 3, "{list}");
    assert!(list.ends_with("3 queued, 3 held\n"), "{list}");
    let held_gauge = || mxrelay_e2e::metric(&mxrelay_e2e::http_get(&admin, "/metrics"), "mxrelay_queue_held ");
    assert_eq!(held_gauge(), Some(3.0));
    let (ok, _, err) = mxrelay(&["queue", "hold", &config, "not-an-id"]);
    assert!(!ok && err.contains("400") && err.contains("not a queue ID"), "{err}");
    let (ok, _, err) = mxrelay(&["queue", "hold", &config, "00000000000000FF"]);
    assert!(!ok && err.contains("404") && err.contains("00000000000000FF is not in the queue"), "{err}");
    let (ok, _, err) = mxrelay(&["queue", "release", &config, "00000000000000FF"]);
    assert!(!ok && err.contains("404"), "{err}");

    // The server comes back (the probe sees it), and the operator retries everything: only
    // mail that arrives now is delivered.
    let sink = Sink::start_at(&sink_addr, &[]);
    assert_eq!(
        queue(&["retry", &config]),
        "retrying 0 queued messages now; 3 queued messages stay held (`queue release` delivers them)\n"
    );
    assert!(send_one(&relay.addr, "user@customer.test", 10).await);
    relay.eventually("new mail delivered", || sink.received().contains_key(&10)).await;
    // After a crash the hold is still there, and start-up's retry of everything skips it.
    relay.kill9();
    relay.restart();
    assert!(send_one(&relay.addr, "user@customer.test", 11).await);
    relay.eventually("new mail delivered after the restart", || sink.received().contains_key(&11)).await;
    assert_eq!(sink.received().keys().copied().collect::<Vec<u64>>(), [10, 11], "held mail was delivered");
    let list: serde_json::Value = serde_json::from_str(&queue(&["list", &config, "--json"])).expect("json");
    let held: Vec<&str> =
        list.as_array().expect("list").iter().filter(|e| e["held"] == true).filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(held.len(), 3, "{list}");

    assert_eq!(queue(&["release", &config, held[0]]), "released 1 message\n");
    relay.eventually("the released one delivered", || sink.received().len() == 3).await;
    assert_eq!(queue(&["release", &config, "--domain", "customer.test"]), "released 2 messages\n");
    relay.eventually("all delivered", || sink.received().len() == 5).await;
    // Message 10 may arrive twice: it was delivered moments before the kill -9, perhaps
    // before the relay wrote it off. The held ones arrive once each.
    mxrelay_e2e::assert_delivered(&[&sink], &[0, 1, 2, 10, 11], 1);
    let got = sink.received();
    assert!([0, 1, 2, 11].iter().all(|seq| got.get(seq) == Some(&1)), "{got:?}");
    assert_eq!(held_gauge(), Some(0.0));
}

/// A held message does not expire while held, though one left unheld beside it does; once
/// released it gets its attempt and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_mail_does_not_expire_while_held() {
    let sink_addr = format!("127.0.1.143:{}", mxrelay_e2e::free_port("127.0.1.143"));
    let (relay, _) = with_admin(&sink_addr, "retry = [\"100ms\"]\nmax_queue_lifetime = \"1s\"\nprobe_interval = \"1h\"");
    let config = relay.config_path().display().to_string();
    assert!(send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("deferred", || !relay.log_lines(&["deferred"]).is_empty()).await;
    // The customer's mail in the queue (the expiry's notification to the sender is there too).
    let listed = || -> Vec<serde_json::Value> {
        let all: Vec<serde_json::Value> = serde_json::from_str(&mxrelay(&["queue", "list", &config, "--json"]).1).expect("json");
        all.into_iter().filter(|e| e["domain"] == "customer.test").collect()
    };
    let held = listed()[0]["id"].as_str().expect("id").to_string();
    let (ok, out, err) = mxrelay(&["queue", "hold", &config, &held]);
    assert!(ok && out == "held 1 message\n", "{out}{err}");
    // The same, unheld: its retries go on, and it expires after the lifetime.
    assert!(send_one(&relay.addr, "user@customer.test", 2).await);
    relay.eventually("the unheld one expired", || !relay.log_lines(&["expired after max_queue_lifetime"]).is_empty()).await;
    relay
        .eventually("the held one past the lifetime", || listed().first().is_some_and(|e| e["age_seconds"].as_u64() >= Some(2)))
        .await;
    assert_eq!(listed().len(), 1, "only the held message is left");
    assert_eq!(listed()[0]["id"], held.as_str());

    let sink = Sink::start_at(&sink_addr, &[]);
    let (ok, out, err) = mxrelay(&["queue", "release", &config, &held]);
    assert!(ok && out == "released 1 message\n", "{out}{err}");
    relay.eventually("delivered once released", || sink.received().contains_key(&1)).await;
    // Only the unheld one expired (its notification to the sender, undeliverable here, may
    // expire too: its recipient is the sender).
    let expired = relay.log_lines(&["expired after max_queue_lifetime", "user@customer.test"]);
    assert_eq!(expired.len(), 1, "{}", relay.log_text());
    assert!(!sink.received().contains_key(&2), "the expired one is not delivered");
}

/// `hold = true` on a domain: its mail is accepted and held on arrival while other domains'
/// mail flows. Turned off by a reload, new mail flows again, and what was held waits for the
/// operator's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_on_hold_keeps_what_arrives_until_released() {
    let sink = Sink::start("127.0.1.142", &[]);
    let (host, port) = sink.host_port();
    let admin = format!("127.0.2.2:{}", mxrelay_e2e::free_port("127.0.2.2"));
    let domains = [
        mxrelay_e2e::domain_with("held.test", "hold = true", &[(host, port, 10)]),
        mxrelay_e2e::domain_with("open.test", "", &[(host, port, 10)]),
    ]
    .concat();
    let relay =
        Relay::start_with(&format!("admin_listen = \"{admin}\"\nadmin_token = \"hold-test-token-0123456789\""), &domains, "");
    let config = relay.config_path().display().to_string();
    assert!(send_one(&relay.addr, "user@held.test", 1).await);
    assert!(send_one(&relay.addr, "user@open.test", 2).await);
    relay.eventually("the other domain's mail delivered", || sink.received().contains_key(&2)).await;
    assert!(!sink.received().contains_key(&1), "mail for a domain on hold was delivered");
    assert_eq!(relay.logged(&["held on arrival (the domain's hold = true)", "held.test"]).await, 1, "{}", relay.log_text());
    assert!(mxrelay(&["queue", "list", &config]).1.ends_with("1 queued, 1 held\n"));
    relay.logged(&["warning: domain held.test: hold"]).await;

    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    // A reload with the hold still on warns again; one that turns it off does not.
    relay.signal("HUP");
    relay.eventually("reloaded", || relay.log_lines(&["configuration reloaded"]).len() == 1).await;
    assert_eq!(relay.logged(&["configuration warning", "domain held.test: hold"]).await, 1, "{}", relay.log_text());
    std::fs::write(&path, text.replace("hold = true", "hold = false")).expect("write");
    relay.signal("HUP");
    relay.eventually("reloaded", || relay.log_lines(&["configuration reloaded"]).len() == 2).await;
    assert_eq!(relay.logged(&["configuration warning", "domain held.test: hold"]).await, 1, "{}", relay.log_text());
    assert!(send_one(&relay.addr, "user@held.test", 3).await);
    relay.eventually("new mail flows once the hold is off", || sink.received().contains_key(&3)).await;
    assert!(!sink.received().contains_key(&1), "what was held waits for the release");

    let (ok, out, err) = mxrelay(&["queue", "release", &config, "--domain", "held.test"]);
    assert!(ok && out == "released 1 message\n", "{out}{err}");
    relay.eventually("the held one delivered", || sink.count() == 3).await;
    mxrelay_e2e::assert_exactly_once(&[&sink], &[1, 2, 3]);
}

/// A domain taken out of the config keeps its queued mail and its queue gauge; once that
/// mail is gone the gauge reads 0, not its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_gauge_of_a_removed_domain_falls_to_zero_when_its_mail_is_gone() {
    let down = format!("127.0.1.84:{}", mxrelay_e2e::free_port("127.0.1.84"));
    let (host, port) = down.split_once(':').expect("addr");
    let admin = format!("127.0.2.3:{}", mxrelay_e2e::free_port("127.0.2.3"));
    let block = |name: &str| format!("[[domain]]\nname = \"{name}\"\n[[domain.server]]\nhost = \"{host}\"\nport = {port}\n");
    let relay = Relay::start_with(
        &format!("admin_listen = \"{admin}\"\nadmin_token = \"gauge-test-token-0123456789\""),
        &block("gone.test"),
        "retry = [\"1h\"]\nprobe_interval = \"1h\"",
    );
    assert!(send_one(&relay.addr, "user@gone.test", 1).await);
    relay.eventually("deferred", || !relay.log_lines(&["deferred"]).is_empty()).await;
    let series = "mxrelay_domain_queue_size{domain=\"gone.test\"} ";
    let gauge = || mxrelay_e2e::metric(&mxrelay_e2e::http_get(&admin, "/metrics"), series);
    assert_eq!(gauge(), Some(1.0));

    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    let head = text.split("[[domain]]").next().expect("head").to_string();
    std::fs::write(&path, format!("{head}{}", block("other.test"))).expect("write");
    relay.signal("HUP");
    relay.eventually("reloaded", || !relay.log_lines(&["configuration reloaded"]).is_empty()).await;
    assert_eq!(gauge(), Some(1.0), "the mail is still queued");

    let config = path.display().to_string();
    let (_, json, _) = mxrelay(&["queue", "list", &config, "--json"]);
    let list: serde_json::Value = serde_json::from_str(&json).expect("json");
    let (ok, out, err) = mxrelay(&["queue", "remove", &config, list[0]["id"].as_str().expect("id")]);
    assert!(ok, "{out}{err}");
    assert_eq!(gauge(), Some(0.0), "neither configured nor queued for: 0");
    assert_eq!(
        mxrelay_e2e::metric(&mxrelay_e2e::http_get(&admin, "/metrics"), "mxrelay_domain_queue_size{domain=\"other.test\"} "),
        Some(0.0)
    );
}

/// A second relay started by mistake on a queue in use (a copy of the config with another
/// port, say) stops at once and says why, before it touches the queue's files; the first goes
/// on taking and delivering mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_queue_in_use_stops_and_the_first_goes_on() {
    let sink = Sink::start("127.0.1.174", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    assert!(send_one(&relay.addr, "user@customer.test", 1).await);
    eventually("the first message delivered", || sink.count() == 1).await;
    let path = relay.config_path();
    let other = format!("127.0.0.1:{}", mxrelay_e2e::free_port("127.0.0.1"));
    let text = std::fs::read_to_string(&path).expect("config");
    assert!(text.contains(&relay.addr), "the listen address is in the file");
    let second = path.with_file_name("second.toml");
    std::fs::write(&second, text.replace(&relay.addr, &other)).expect("write");

    let mut child = std::process::Command::new(relay_binary())
        .arg("run")
        .arg(&second)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = mxrelay_e2e::wait_until(mxrelay_e2e::PATIENCE, || child.try_wait().is_ok_and(|s| s.is_some()));
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited && !out.status.success(), "a second relay ran on the queue in use: {err}");
    assert!(err.contains("is in use by another process") && err.contains("a queue directory of its own"), "{err}");

    assert!(send_one(&relay.addr, "user@customer.test", 2).await, "the first relay still takes mail");
    eventually("the second message delivered", || sink.count() == 2).await;
    assert_eq!(relay.log_lines(&["ERROR"]), Vec::<String>::new(), "the first relay saw nothing wrong");
}

/// Customers often let in only the filtering service's addresses: deliveries and health
/// probes leave from `bind_address`, and an address the machine does not have stops the
/// start instead of marking every server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_leave_from_the_configured_source_address() {
    let mut sink = Sink::start("127.0.1.128", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "bind_address = \"127.0.0.9\"");
    assert!(send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("delivered", || sink.count() == 1).await;
    let dump = &sink.dumps()[0];
    assert!(dump.contains("X-Client-Addr: 127.0.0.9\n"), "{dump}");
    // Down, then probed: the probe's connection comes from the same address. A listener of
    // the test's own takes the sink's place to see where the probe comes from.
    sink.kill();
    assert!(send_one(&relay.addr, "user@customer.test", 2).await);
    relay.eventually("marked down", || !relay.log_lines(&["outcome=\"unreachable\""]).is_empty()).await;
    let catcher = tokio::net::TcpListener::bind(&sink.addr).await.expect("bind the sink's address");
    let (mut probe, from) = catcher.accept().await.expect("the probe");
    assert_eq!(from.ip().to_string(), "127.0.0.9", "the probe's source address");
    let _ = tokio::io::AsyncWriteExt::write_all(&mut probe, b"554 not yet\r\n").await;
    drop((probe, catcher));
    sink.restart();
    relay.eventually("the queued message delivered", || sink.count() == 2).await;
    assert!(sink.dumps().iter().all(|d| d.contains("X-Client-Addr: 127.0.0.9\n")));

    // `check` reads the address as an address; only a start can tell whether it is ours.
    let (ok, out, err) = mxrelay(&["check", relay.config_path().to_str().expect("utf-8 path")]);
    assert!(ok && out.ends_with(": ok (1 domain, 1 server)\n"), "{out}{err}");
    let config = std::fs::read_to_string(relay.config_path()).expect("config");
    let elsewhere = relay.config_path().with_file_name("elsewhere.toml");
    std::fs::write(&elsewhere, config.replace("bind_address = \"127.0.0.9\"", "bind_address = \"192.0.2.1\"")).expect("write");
    let (ok, _, stderr) = mxrelay(&["run", elsewhere.to_str().expect("utf-8 path")]);
    assert!(!ok && stderr.contains("delivery.bind_address = \"192.0.2.1\" cannot be used as a source address"), "{stderr}");
    // With JSON logs the same start-up error is a log event, like every other line.
    let (ok, _, stderr) = mxrelay(&["run", elsewhere.to_str().expect("utf-8 path"), "--log-format", "json"]);
    let events: Vec<serde_json::Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"))).collect();
    let error = events.iter().find(|e| e["level"] == "ERROR").expect("the start-up error as an event");
    assert!(!ok && error["message"].as_str().is_some_and(|m| m.contains("delivery.bind_address = \"192.0.2.1\"")), "{stderr}");
}

/// `run --log-format json`: every line one JSON object, with the event's fields at the top,
/// for log shippers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_each_events_fields() {
    let sink = Sink::start("127.0.1.133", &[]);
    let mut relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    let text_lines = relay.log_text().lines().count();
    relay.json_logs = true;
    relay.kill9();
    relay.restart();
    let (ok, out) =
        mxrelay_e2e::swaks_tagged(&relay.addr, "user@customer.test", 1, &["--header", "Message-Id: <json-1@src.test>"]);
    assert!(ok, "{out}");
    relay.eventually("delivered", || sink.count() == 1).await;
    relay.eventually("its log line", || !relay.log_lines(&["\"outcome\":\"delivered\""]).is_empty()).await;
    let events: Vec<serde_json::Value> = relay
        .log_text()
        .lines()
        .skip(text_lines)
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}")))
        .collect();
    // The config's warning (a single server) is an event like any other.
    let warning = events.iter().find(|e| e["level"] == "WARN").expect("the config warning");
    assert!(warning["message"].as_str().is_some_and(|m| m.contains("the only server")), "{warning}");
    let accepted = events.iter().find(|e| e["message"] == "accepted").expect("the accepted event");
    assert_eq!((&accepted["level"], &accepted["target"]), (&"INFO".into(), &"mxrelay::inbound".into()), "{accepted}");
    assert!(accepted["timestamp"].is_string() && accepted["queue_id"].is_string(), "{accepted}");
    assert_eq!(accepted["sender"], "a@src.test", "{accepted}");
    // The Message-ID, to match the filtering service's logs.
    assert_eq!(accepted["message_id"], "<json-1@src.test>", "{accepted}");
    let delivered = events.iter().find(|e| e["outcome"] == "delivered").expect("the delivery event");
    assert_eq!(
        (&delivered["rcpt"], &delivered["queue_id"]),
        (&"user@customer.test".into(), &accepted["queue_id"]),
        "{delivered}"
    );
}

/// The customer's server sees every relay session end with QUIT (Postfix's smtpd counts
/// `quit=1` in its `disconnect` line): a connection idle for `connection_cache_time`, and the
/// idle connections at shutdown. Left open, they would hold one of its processes each until
/// it timed them out, and its log would show timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customers_postfix_sees_every_session_end_with_quit() {
    use mxrelay_e2e::postfix::{Listener, Postfix};
    let sink = Sink::start("127.0.1.139", &[]);
    let front = Listener { port: mxrelay_e2e::free_port("127.0.0.1"), options: vec![] };
    let postfix = Postfix::start(&["customer.test"], &sink.addr, std::slice::from_ref(&front), "");
    let domain =
        format!("[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"127.0.0.1\"\nport = {}\n", postfix.port(0));
    let disconnects = || {
        let log = postfix.log();
        // Sessions that said EHLO: the harness's readiness check connects and says nothing.
        let relay_session = |l: &&str| l.contains("smtpd") && l.contains("disconnect from") && l.contains(" ehlo=1 ");
        log.lines().filter(relay_session).map(String::from).collect::<Vec<_>>()
    };

    // Idle for the cache time: closed with QUIT while the relay runs.
    let relay = Relay::start(&domain, "connection_cache_time = \"300ms\"");
    assert!(send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("delivered through Postfix", || sink.count() == 1).await;
    relay.eventually("the idle session ended", || disconnects().len() == 1).await;

    // Idle when the relay stops: closed with QUIT at shutdown.
    let mut relay = Relay::start(&domain, "connection_cache_time = \"1h\"");
    assert!(send_one(&relay.addr, "user@customer.test", 2).await);
    relay.eventually("delivered through Postfix", || sink.count() == 2).await;
    relay.signal("TERM");
    assert!(relay.wait_exit(), "graceful shutdown exits with 0");
    relay.eventually("the session ended at shutdown", || disconnects().len() == 2).await;

    let ends = disconnects();
    assert!(ends.iter().all(|l| l.contains(" quit=1 ")), "{ends:#?}");
    let log = postfix.log();
    // Apart from the readiness check's, which says nothing at all.
    let unclean = |l: &&str| l.contains("timeout after") || (l.contains("lost connection") && !l.contains("after CONNECT"));
    assert_eq!(log.lines().filter(unclean).count(), 0, "{log}");
}

/// `test-servers` reaches the servers without the domain's policy: a module that does not
/// compile, which `check` refuses, does not keep the servers from being tested.
#[test]
fn test_servers_does_not_need_the_domains_policy() {
    let sink = Sink::start("127.0.1.158", &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("broken.wasm"), b"not a component").expect("module");
    let (host, port) = sink.host_port();
    let domain = mxrelay_e2e::domain_with("customer.test", "policy = \"broken.wasm\"", &[(host, port, 10)]);
    let config = mxrelay_e2e::write_config(dir.path(), &domain);
    let (ok, _, err) = mxrelay(&["check", &config]);
    assert!(!ok && err.contains("broken.wasm"), "check refuses the module: {err}");
    // With one domain configured, it needs no --domain.
    for args in [&["test-servers", &config, "--domain", "customer.test"][..], &["test-servers", &config]] {
        let (ok, out, err) = mxrelay(args);
        assert!(ok && out.contains("accepts"), "{args:?}: {out}{err}");
    }
}

/// `plan` and `test-servers` take the only domain when --domain is left out; with several,
/// they name some of them rather than guess, and so does a domain that is not configured.
#[test]
fn commands_about_one_domain_take_the_only_one_or_name_the_choices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = mxrelay_e2e::domain_with("customer.test", "", &[("mx.customer.test", 25, 10)]);
    let config = mxrelay_e2e::write_config(dir.path(), &one);
    let (ok, out, err) = mxrelay(&["plan", &config, "--json"]);
    assert!(ok, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(plan["domain"], "customer.test", "{plan}");

    let servers = [("mx1.customer.test", 25, 10), ("mx2.customer.test", 25, 20)];
    let many: String = (0..12).map(|n| mxrelay_e2e::domain_with(&format!("d{n}.test"), "", &servers)).collect();
    let config = mxrelay_e2e::write_config(dir.path(), &many);
    for command in ["plan", "test-servers"] {
        let (ok, _, err) = mxrelay(&[command, &config]);
        assert!(!ok && err.contains("--domain is needed") && err.contains("configures 12 domains: d0.test, d1.test"), "{err}");
        assert!(err.contains("d9.test and 2 more") && !err.contains("d10.test"), "{err}");
        let (ok, _, err) = mxrelay(&[command, &config, "--domain", "nope.test"]);
        assert!(!ok && err.contains("\"nope.test\" is not configured") && err.contains("and 2 more"), "{err}");
    }
    let (ok, out, err) = mxrelay(&["plan", &config, "--domain", "d11.test", "--json"]);
    assert!(ok && out.contains("\"d11.test\""), "{out}{err}");
}

/// `test-servers` asks each of a domain's servers, as a delivery reaches it, whether it would
/// take the domain's mail, and sends no message: smtp-sinks that accept, defer (`-r rcpt`)
/// and refuse (`-f rcpt`) the recipient, and a port where nothing listens. The admin API
/// tests the same way, also a list given before it is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_servers_asks_each_server_about_the_recipient_and_sends_nothing() {
    let accepting = Sink::start("127.0.1.145", &[]);
    let deferring = Sink::start("127.0.1.145", &["-r", "rcpt"]);
    let refusing = Sink::start("127.0.1.146", &["-f", "rcpt"]);
    let closed = mxrelay_e2e::free_port("127.0.1.147");
    let (a, d, r) = (accepting.host_port(), deferring.host_port(), refusing.host_port());
    let servers = [(a.0, a.1, 10), (d.0, d.1, 10), (r.0, r.1, 20), ("127.0.1.147", closed, 30)];
    let admin = format!("127.0.2.4:{}", mxrelay_e2e::free_port("127.0.2.4"));
    let token = "server-test-token-0123456789";
    let relay = Relay::start_with(
        &format!("admin_listen = \"{admin}\"\nadmin_token = \"{token}\""),
        &mxrelay_e2e::domain_with("customer.test", "", &servers),
        "",
    );
    let config = relay.config_path().display().to_string();

    let (ok, out, err) = mxrelay(&["test-servers", &config, "--domain", "customer.test", "--json"]);
    assert!(!ok, "not every server accepts, so the exit status is 1: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(report["rcpt"], "postmaster@customer.test");
    assert_eq!(report["passed"], false);
    let result =
        |i: usize| (report["servers"][i]["addresses"][0]["result"].as_str(), report["servers"][i]["preference"].as_u64());
    assert_eq!(
        (0..4).map(result).collect::<Vec<_>>(),
        [(Some("accepts"), Some(10)), (Some("defers"), Some(10)), (Some("refuses"), Some(20)), (Some("failed"), Some(30))],
        "{report}"
    );
    assert!(report["servers"][2]["addresses"][0]["reply"].as_str().is_some_and(|r| r.starts_with("RCPT: 5")), "{report}");
    // Timed finely enough to tell apart servers that all answer within a millisecond.
    assert!(report["servers"][0]["addresses"][0]["micros"].as_u64().is_some_and(|us| us > 0), "{report}");
    let (_, text, _) = mxrelay(&["test-servers", &config, "--domain", "customer.test", "--rcpt", "alice@customer.test"]);
    mxrelay_e2e::assert_contains_all(
        &text,
        &[
            "RCPT TO:<alice@customer.test>",
            "preference 10\n",
            "preference 30\n",
            "accepts",
            "DEFERS",
            "REFUSES",
            "FAILED",
            "1 of 4 servers",
        ],
    );
    let (ok, _, err) = mxrelay(&["test-servers", &config, "--domain", "other.test"]);
    assert!(!ok && err.contains("\"other.test\" is not configured"), "{err}");

    // Through the API: the configured list, then one given in the body, before it is saved.
    let (status, body) = mxrelay_e2e::http_request(&admin, "POST", "/api/domains/customer.test/test", Some(token), "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"passed\":false"), "{body}");
    let only_accepting = format!(r#"{{"rcpt":"bob@customer.test","servers":[{{"host":"{}","port":{}}}]}}"#, a.0, a.1);
    let (status, body) =
        mxrelay_e2e::http_request(&admin, "POST", "/api/domains/customer.test/test", Some(token), &only_accepting);
    assert_eq!(status, 200, "{body}");
    let tested: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!((tested["passed"].as_bool(), tested["rcpt"].as_str()), (Some(true), Some("bob@customer.test")), "{body}");
    let bad = r#"{"servers":[{"host":"999.1.1.1"}]}"#;
    let (status, body) = mxrelay_e2e::http_request(&admin, "POST", "/api/domains/customer.test/test", Some(token), bad);
    assert!(status == 422 && body.contains("999.1.1.1"), "{status} {body}");
    let (status, _) = mxrelay_e2e::http_request(&admin, "POST", "/api/domains/customer.test/test", None, "");
    assert_eq!(status, 401, "the test needs the token");

    // Tests are not deliveries: no sink got a message, no server was marked down, and no
    // connection counts in the delivery metrics.
    assert_eq!(accepting.count() + deferring.count() + refusing.count(), 0);
    assert!(relay.log_lines(&["marked down"]).is_empty(), "{}", relay.log_text());
    let metrics = mxrelay_e2e::http_get(&admin, "/metrics");
    for series in ["mxrelay_outbound_connections_total{", "mxrelay_server_marked_down_total{", "mxrelay_delivered_total{"] {
        assert!(!metrics.contains(series), "{series} counted a test: {metrics}");
    }
    let saved = std::fs::read_to_string(relay.config_path()).expect("config");
    assert!(saved.contains("127.0.1.147"), "testing a list does not save it");
}

/// The relay of the README's first command, `mxrelay run examples/relay.toml`, ended when
/// the test ends.
struct ExampleRelay(std::process::Child);

impl Drop for ExampleRelay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The example configuration as shipped, run as the README's first command runs it: both
/// example files check clean, the relay listens where the file says and serves the widget,
/// and mail goes to the first server, then, with that one gone, to its backup at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_example_runs_and_fails_over_to_its_backup() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for file in ["relay.toml", "seed.toml"] {
        let (ok, out, err) = mxrelay(&["check", examples.join(file).to_str().expect("utf-8 path")]);
        assert!(ok, "examples/{file} does not check clean:\n{out}{err}");
    }
    // A copy, so that its queue (`../var/queue`) is the test's; the widget is the checkout's.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("examples")).expect("mkdir");
    let config = dir.path().join("examples/relay.toml");
    std::fs::copy(examples.join("relay.toml"), &config).expect("copy");
    std::os::unix::fs::symlink(examples.join("../web"), dir.path().join("web")).expect("symlink");
    // The file's own addresses: its comment says to start sinks on these two ports.
    let mut primary = Sink::start_at("127.0.0.1:2526", &[]);
    let backup = Sink::start_at("127.0.0.1:2527", &[]);
    let mut run = std::process::Command::new(relay_binary());
    run.arg("run").arg(&config).env("MXRELAY_LOG", "info").stdout(std::process::Stdio::null());
    let child = spawn_until_ready(&mut run, &dir.path().join("stderr"), |pid| listens_on(pid, "127.0.0.1:2525"))
        .unwrap_or_else(|why| panic!("mxrelay run examples/relay.toml: {why}"));
    let _relay = ExampleRelay(child);

    assert!(send_one("127.0.0.1:2525", "user@example.test", 1).await, "the example's domain takes mail");
    eventually("the message at the preferred server", || primary.count() == 1).await;
    primary.kill();
    assert!(send_one("127.0.0.1:2525", "user@example.test", 2).await);
    eventually("the message at the backup", || backup.received().contains_key(&2)).await;
    assert_eq!(backup.count(), 1, "the backup got only what the first server could not take");
    assert!(dir.path().join("var/queue").is_dir(), "the queue is where the file says, next to examples/");

    let page = http_get("127.0.0.1:8025", "/");
    assert!(page.contains("<title>Inbound servers · mxrelay</title>"), "the widget at the admin address: {page}");
}

/// A filtering service has many customer domains. Each took an instance of the built-in
/// policy of its own, with four memory mappings, so past some 16 000 domains the relay did not
/// start (`Cannot allocate memory`: Linux allows 65 530 mappings per process). The domains now
/// share instances: 20 000 start, and each takes mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_domains_start_and_each_takes_mail() {
    let sink = Sink::start("127.0.1.170", &[]);
    let mut domains: String = (0..19_999)
        .map(|i| domain_with(&format!("customer{i}.test"), "", &[(&format!("192.0.2.{}", i % 250 + 1), 25, 10)]))
        .collect();
    domains.push_str(&domain_block("customer19999.test", &[(&sink, 10)]));
    let relay = Relay::start(&domains, "");
    assert!(send_one(&relay.addr, "user@customer19999.test", 1).await);
    relay.eventually("the message at the last domain's server", || sink.count() == 1).await;
}
