//! The `mxrelay` command: `run`, `check`, `plan`, `test-servers`, `queue`, `policy check`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxrelay::config::{Config, ConfigError, ConfigProblem};
use mxrelay::policies::Policies;
use mxrelay::relay::Readiness;
use mxrelay::service_manager::ServiceManager;
use mxrelay::simulate;
use mxrelay_policy_core::Severity;

#[derive(Debug, Parser)]
#[command(name = "mxrelay", version, about = "Delivers filtered inbound mail to each customer's own mail servers, MX-style.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay: receive mail over SMTP, queue it durably and deliver it.
    Run {
        /// The configuration file.
        config: PathBuf,
        /// Log lines as text, or as one JSON object each (for log shippers).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration file: exit 0 when usable (warnings printed), 1 with one line per error.
    Check {
        /// The configuration file.
        config: PathBuf,
    },
    /// Show how a domain's mail flows: tiers, shares and failover, for simulated messages.
    Plan {
        /// The configuration file.
        config: PathBuf,
        /// The domain to plan for (may be left out when the config has only one).
        #[arg(long)]
        domain: Option<String>,
        /// How many messages to simulate (seeds 0..N).
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        /// A server to treat as down (HOST:PORT); repeat for more.
        #[arg(long = "down", value_name = "HOST:PORT")]
        down: Vec<String>,
        /// The clock to hand the policy, in ms since the epoch (default: now).
        #[arg(long)]
        now_ms: Option<u64>,
        /// Recipient of the simulated messages (default postmaster@DOMAIN); sticky policies route by it.
        #[arg(long)]
        rcpt: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Test a domain's servers as a delivery reaches them, without sending a message:
    /// connect, EHLO, STARTTLS as the domain's `tls` asks, MAIL FROM and RCPT TO, then RSET.
    /// Exit 0 when every address of every server accepts the recipient, 1 otherwise.
    TestServers {
        /// The configuration file.
        config: PathBuf,
        /// The domain whose servers to test (may be left out when the config has only one).
        #[arg(long)]
        domain: Option<String>,
        /// The recipient to offer (default postmaster@DOMAIN, which every server must accept).
        #[arg(long)]
        rcpt: Option<String>,
        /// The sender to offer (default the null sender `<>`, as the relay's notifications use).
        #[arg(long, default_value = "")]
        sender: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Queue control of a running relay (through its admin API).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Work with policy modules.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

/// How `run` writes its log lines to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line: time, level, target and the event's fields.
    Json,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// List queued messages.
    List {
        /// The running relay's configuration file.
        config: PathBuf,
        /// Only this domain's messages.
        #[arg(long)]
        domain: Option<String>,
        /// Print the JSON list instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Retry now: one message, a domain's messages, or everything.
    Retry {
        /// The running relay's configuration file.
        config: PathBuf,
        /// A queue ID (as `queue list` shows it).
        id: Option<String>,
        /// Every message for this domain.
        #[arg(long, conflicts_with = "id")]
        domain: Option<String>,
    },
    /// Show a queued message: its envelope and headers, or with --full the whole message
    /// as stored (Postfix's `postcat -q`).
    Show {
        /// The running relay's configuration file.
        config: PathBuf,
        /// The queue ID.
        id: String,
        /// Print the whole message instead.
        #[arg(long)]
        full: bool,
    },
    /// Remove a message from the queue (it will not be delivered).
    Remove {
        /// The running relay's configuration file.
        config: PathBuf,
        /// The queue ID.
        id: String,
    },
    /// Keep messages queued without delivery attempts until released (Postfix's
    /// `postsuper -h`); a hold survives restarts. Mail that arrives later is not held.
    Hold {
        /// The running relay's configuration file.
        config: PathBuf,
        #[command(flatten)]
        which: Selection,
    },
    /// Release held messages: they are tried at once (Postfix's `postsuper -H`).
    Release {
        /// The running relay's configuration file.
        config: PathBuf,
        #[command(flatten)]
        which: Selection,
    },
}

/// The messages a hold or release applies to: exactly one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Selection {
    /// A queue ID (as `queue list` shows it).
    id: Option<String>,
    /// Every message for this domain.
    #[arg(long)]
    domain: Option<String>,
    /// Every queued message.
    #[arg(long)]
    all: bool,
}

impl Selection {
    /// The admin API's request body.
    fn body(&self) -> String {
        match (&self.id, &self.domain) {
            (Some(id), _) => serde_json::json!({ "id": id }),
            (None, Some(domain)) => serde_json::json!({ "domain": domain }),
            (None, None) => serde_json::json!({ "all": true }),
        }
        .to_string()
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check that a .wasm policy component is usable: implements the world, gives valid plans
    /// for the golden scenarios and hostile inputs within the limits. Exit 1 with the reason if not.
    Check {
        /// The component.
        module: PathBuf,
        /// The domain settings to create it with, as JSON (a [domain.policy_config] table).
        #[arg(long, default_value = "{}")]
        settings: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => run(&config, log_format),
        Command::Check { config } => check(&config),
        Command::Plan { config, domain, messages, down, now_ms, rcpt, json } => {
            plan(&config, domain.as_deref(), PlanOptions { messages, down: &down, now_ms, rcpt, json })
        }
        Command::TestServers { config, domain, rcpt, sender, json } => {
            test_servers(&config, domain.as_deref(), rcpt, sender, json)
        }
        Command::Queue { command } => queue(command),
        Command::Policy { command: PolicyCommand::Check { module, settings } } => {
            let report = mxrelay::policy_check::check(&module, &settings);
            print!("{}", report.text);
            match report.unusable {
                None => {
                    println!("usable");
                    ExitCode::SUCCESS
                }
                Some(why) => {
                    eprintln!("error: {} is unusable: {why}", module.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A configuration with everything it refers to loaded: policies and the STARTTLS identity.
struct Loaded {
    config: Config,
    policies: Policies,
    tls: Option<mxrelay::tls::TlsAcceptor>,
}

/// Where problems go: `level: text` lines on stderr, or log events when `run` logs JSON, so
/// that every line a log shipper reads is one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Say {
    Lines,
    LogEvents,
}

impl Say {
    fn problem(self, severity: Severity, text: &dyn std::fmt::Display) {
        match (self, severity) {
            (Say::Lines, Severity::Error) => eprintln!("error: {text}"),
            (Say::Lines, Severity::Warning) => eprintln!("warning: {text}"),
            (Say::LogEvents, Severity::Error) => tracing::error!("{text}"),
            (Say::LogEvents, Severity::Warning) => tracing::warn!("{text}"),
        }
    }

    fn problems(self, problems: &[ConfigProblem]) {
        for p in problems {
            self.problem(p.severity, p);
        }
    }
}

/// Loads the config file; reports its problems and warnings one per line.
fn load_config(path: &Path, say: Say) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(ConfigError::Invalid { problems }) => {
            say.problems(&problems);
            return None;
        }
        Err(e) => {
            say.problem(Severity::Error, &e);
            return None;
        }
    };
    say.problems(&config.warnings);
    Some(config)
}

/// Loads the config, its policies and its certificate; reports problems one per line.
fn load(path: &Path, say: Say) -> Option<Loaded> {
    let config = load_config(path, say)?;
    match (Policies::load(&config), mxrelay::tls::acceptor(&config.relay)) {
        (Ok(policies), Ok(tls)) => Some(Loaded { config, policies, tls }),
        (policies, tls) => {
            let problems: Vec<ConfigProblem> = policies.err().into_iter().flatten().chain(tls.err()).collect();
            say.problems(&problems);
            None
        }
    }
}

/// Log lines that may wait for stderr; past these, new lines are dropped and counted.
const LOG_LINES_WAITING: usize = 10_000;

fn run(path: &Path, log_format: LogFormat) -> ExitCode {
    // Log lines go to stderr from a thread of their own. Under systemd stderr is a stream to
    // journald, and a write to it blocks while journald does not read: written from the
    // runtime's threads, a stalled journald would stop mail. Lines past LOG_LINES_WAITING
    // are dropped instead, and counted. Dropping the guard at the end writes what waits.
    let (log_writer, _log_flush) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_LINES_WAITING)
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped_lines = log_writer.error_counter();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MXRELAY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(log_writer);
    let say = match log_format {
        LogFormat::Text => {
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
            Say::Lines
        }
        LogFormat::Json => {
            logs.json().flatten_event(true).init();
            Say::LogEvents
        }
    };
    let Some(Loaded { config, policies, tls }) = load(path, say) else {
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            say.problem(Severity::Error, &format_args!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Handlers first: a signal sent as soon as the relay says it is ready (a reload
        // right after start, say) must reach them, not the default action, which ends the
        // process.
        use tokio::signal::unix::{SignalKind, signal};
        let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()));
        handle_file_size_limit();
        let relay = match mxrelay::relay::start(&config, policies, tls).await {
            Ok(r) => r,
            Err(e) => {
                say.problem(Severity::Error, &e);
                return ExitCode::FAILURE;
            }
        };
        let addrs: Vec<String> = relay.listening.iter().map(ToString::to_string).collect();
        let admin = relay.admin.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
        tracing::info!(listen = %addrs.join(","), admin = %admin, queue = %config.relay.queue.display(), domains = config.domains.len(), "mxrelay ready");
        tokio::spawn(report_dropped_log_lines(dropped_lines));
        let manager = std::sync::Arc::new(ServiceManager::from_env());
        let status = format!("accepting mail on {}", addrs.join(", "));
        manager.ready(&status);
        if let Some(every) = manager.watchdog_interval() {
            // Alive means more than this task running: the queue's writer (intake's path to
            // the disk) and the scheduler (delivery) both answer. One that hangs stops the pings.
            let (manager, queue, events) = (manager.clone(), relay.queue.clone(), relay.events.clone());
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    ticks.tick().await;
                    match mxrelay::relay::check_alive(&queue, &events, every).await {
                        // Refusing mail for a full disk is not a hang: a restart would not help.
                        Ok(Readiness::Ready | Readiness::Refusing(_)) => manager.watchdog(),
                        Err(stuck) => tracing::error!(error = %stuck, "not telling the watchdog the relay is alive"),
                    }
                }
            });
        }
        serve_signals(signals, relay, path, config.relay.shutdown_timeout, &manager, &status).await;
        ExitCode::SUCCESS
    })
}

/// A write past the file-size limit (systemd's LimitFSIZE=, `ulimit -f`) raises SIGXFSZ,
/// whose default action ends the process. Handled, the write fails with EFBIG instead, and
/// the relay treats it as a full disk: new mail refused with 452, queued mail kept.
fn handle_file_size_limit() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        Ok(mut too_large) => {
            tokio::spawn(async move {
                while too_large.recv().await.is_some() {
                    tracing::warn!("a write went past the file-size limit (RLIMIT_FSIZE); it failed as on a full disk");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGXFSZ; a write past the file-size limit ends the process"),
    }
}

/// Once a second: log lines dropped since the last look (stderr not read) are counted in
/// `mxrelay_log_lines_dropped_total` and reported in the log.
async fn report_dropped_log_lines(dropped_lines: tracing_appender::non_blocking::ErrorCounter) {
    let mut reported = 0;
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        let dropped = dropped_lines.dropped_lines();
        if dropped > reported {
            metrics::counter!("mxrelay_log_lines_dropped_total").absolute(dropped as u64);
            tracing::warn!(dropped = dropped - reported, "log lines dropped: stderr was not being read (a stalled journald?)");
            reported = dropped;
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP, as installed.
type Signals = (
    std::io::Result<tokio::signal::unix::Signal>,
    std::io::Result<tokio::signal::unix::Signal>,
    std::io::Result<tokio::signal::unix::Signal>,
);

/// Runs until SIGTERM or SIGINT (graceful shutdown); SIGHUP reloads the configuration.
/// The service manager is told of each reload and of the shutdown.
async fn serve_signals(
    signals: Signals,
    relay: mxrelay::relay::Relay,
    path: &Path,
    grace: std::time::Duration,
    manager: &ServiceManager,
    status: &str,
) {
    let (Ok(mut term), Ok(mut interrupt), Ok(mut hup)) = signals else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL (queued mail is safe)");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                manager.reloading();
                // Applied or refused, a configuration is in force. Reading the files and
                // compiling custom policies takes a while (some 90 ms a module). This runs on
                // the thread that blocks on the runtime, not on a worker, so sessions and
                // deliveries go on meanwhile; `block_in_place` keeps it so if it ever runs
                // on a worker.
                let _no_put_meanwhile = relay.hold_server_lists().await;
                if tokio::task::block_in_place(|| reload(&relay, path)) {
                    manager.ready(status);
                } else {
                    manager.ready(&format!("{status}; the last reload was refused (see the log)"));
                }
            }
        }
    }
    manager.stopping().await;
    tracing::info!(grace = ?grace, "shutting down: no new mail accepted; letting deliveries in flight finish");
    if relay.shutdown(grace).await {
        tracing::info!("stopped; queued mail stays queued for the next start");
    } else {
        tracing::warn!("deliveries still in flight after the grace period; they will be retried on the next start");
    }
}

/// "held 3 messages" from the admin API's `{"held": 3}`.
fn counted(body: &str, field: &str) -> String {
    let n = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v[field].as_u64()).unwrap_or(0);
    format!("{field} {n} message{}\n", if n == 1 { "" } else { "s" })
}

fn queue(command: QueueCommand) -> ExitCode {
    use mxrelay::queue_cli::{QueueCliError, render_list, render_retried, request, request_bytes};
    use std::io::Write;
    let path = match &command {
        QueueCommand::List { config, .. }
        | QueueCommand::Retry { config, .. }
        | QueueCommand::Remove { config, .. }
        | QueueCommand::Show { config, .. }
        | QueueCommand::Hold { config, .. }
        | QueueCommand::Release { config, .. } => config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Text answers, except the message itself, which goes out byte for byte (`postcat`).
    let text = |answer: Result<String, QueueCliError>| answer.map(String::into_bytes);
    let result = match &command {
        QueueCommand::List { domain, json, .. } => {
            let listed = match domain {
                Some(d) if !mxrelay::queue_cli::is_domain_name(d) => {
                    Err(QueueCliError::Usage(format!("--domain {d:?} is not a domain name")))
                }
                Some(d) => request(&config, "GET", &format!("/api/queue?domain={d}"), ""),
                None => request(&config, "GET", "/api/queue", ""),
            };
            text(if *json { listed.map(|b| b + "\n") } else { listed.map(|b| render_list(&b)) })
        }
        QueueCommand::Retry { id, domain, .. } => {
            let body = match (id, domain) {
                (Some(id), _) => serde_json::json!({ "id": id }),
                (None, Some(d)) => serde_json::json!({ "domain": d }),
                (None, None) => serde_json::json!({}),
            };
            let answer = request(&config, "POST", "/api/queue/retry", &body.to_string());
            text(answer.map(|b| render_retried(&b, id.as_deref(), domain.as_deref())))
        }
        QueueCommand::Remove { id, .. } => {
            text(request(&config, "DELETE", &format!("/api/queue/{id}"), "").map(|_| format!("removed {id}\n")))
        }
        QueueCommand::Show { id, full: true, .. } => request_bytes(&config, "GET", &format!("/api/queue/{id}/message"), ""),
        QueueCommand::Show { id, full: false, .. } => {
            text(request(&config, "GET", &format!("/api/queue/{id}"), "").map(|b| mxrelay::queue_cli::render_show(&b)))
        }
        QueueCommand::Hold { which, .. } => {
            text(request(&config, "POST", "/api/queue/hold", &which.body()).map(|b| counted(&b, "held")))
        }
        QueueCommand::Release { which, .. } => {
            text(request(&config, "POST", "/api/queue/release", &which.body()).map(|b| counted(&b, "released")))
        }
    };
    match result {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(&output).and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // A closed pipe (`| head`) is not worth a message; the exit status says it.
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: the configuration is read again and applied (true), or refused with the reasons
/// logged.
fn reload(relay: &mxrelay::relay::Relay, path: &Path) -> bool {
    let refused: Vec<String> = match Config::load(path) {
        Ok(next) => match (next.warnings.clone(), relay.reload(next)) {
            (warnings, Ok(notes)) => {
                for warning in warnings {
                    tracing::warn!(problem = %warning, "configuration warning");
                }
                for note in notes {
                    tracing::warn!(note = %note, "reload");
                }
                tracing::info!(config = %path.display(), "configuration reloaded");
                return true;
            }
            (_, Err(problems)) => problems.iter().map(ToString::to_string).collect(),
        },
        Err(ConfigError::Invalid { problems }) => {
            problems.iter().filter(|p| p.severity == Severity::Error).map(ToString::to_string).collect()
        }
        Err(e) => vec![e.to_string()],
    };
    for problem in refused {
        tracing::error!(%problem, "reload refused; the previous configuration stays in force");
    }
    false
}

fn check(path: &Path) -> ExitCode {
    match load(path, Say::Lines) {
        Some(Loaded { config, .. }) => {
            let servers: usize = config.domains.iter().map(|d| d.servers.len()).sum();
            let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            println!("{}: ok ({}, {})", path.display(), count(config.domains.len(), "domain"), count(servers, "server"));
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

/// `plan`'s options besides the config and domain.
struct PlanOptions<'a> {
    messages: u64,
    down: &'a [String],
    now_ms: Option<u64>,
    rcpt: Option<String>,
    json: bool,
}

/// Loads the config for a command about one domain, and finds the domain (its index in
/// `config.domains`).
fn load_for_domain(path: &Path, domain: Option<&str>) -> Option<(Loaded, usize)> {
    let loaded = load(path, Say::Lines)?;
    let index = find_domain(&loaded.config, path, domain)?;
    Some((loaded, index))
}

/// The index of `domain` in `config.domains`, or of the only domain when none is given;
/// reports a domain that is not configured, or a choice left open.
fn find_domain(config: &Config, path: &Path, domain: Option<&str>) -> Option<usize> {
    const NAMED: usize = 10;
    let configured = || {
        // A config that loaded has at least one domain.
        let names: Vec<&str> = config.domains.iter().take(NAMED).map(|d| d.name.as_str()).collect();
        let more = config.domains.len().saturating_sub(NAMED);
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        format!("{}{more}", names.join(", "))
    };
    let index = match domain {
        Some(domain) => config.domain_index(domain),
        None if config.domains.len() == 1 => Some(0),
        None => {
            eprintln!(
                "error: --domain is needed: {} configures {} domains: {}",
                path.display(),
                config.domains.len(),
                configured()
            );
            return None;
        }
    };
    if let (None, Some(domain)) = (index, domain) {
        eprintln!("error: --domain {domain:?} is not configured in {}; configured: {}", path.display(), configured());
    }
    index
}

fn test_servers(path: &Path, domain: Option<&str>, rcpt: Option<String>, sender: String, json: bool) -> ExitCode {
    use mxrelay::outbound::{TestEnvelope, Transport, render_server_tests, server_tests_json, test_servers};
    use mxrelay::tls::{ClientTls, OutboundTls};
    // The servers are reached as a delivery would, which needs the domain's TLS settings but
    // not its policy: no policy is compiled (some 90 ms a module), and a broken one does not
    // keep the servers from being tested.
    let Some(config) = load_config(path, Say::Lines) else {
        return ExitCode::FAILURE;
    };
    let Some(index) = find_domain(&config, path, domain) else {
        return ExitCode::FAILURE;
    };
    let domain_config = &config.domains[index];
    let tls = match ClientTls::load(&config.delivery).and_then(|client| OutboundTls::for_domain(domain_config, &client)) {
        Ok(tls) => tls,
        Err(problem) => {
            Say::Lines.problems(&[problem]);
            return ExitCode::FAILURE;
        }
    };
    let name = &domain_config.name;
    let envelope = TestEnvelope { sender, rcpt: rcpt.unwrap_or_else(|| format!("postmaster@{name}")) };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let results = runtime.block_on(async {
        let transport = std::sync::Arc::new(Transport::new(&config.relay.hostname, &config.delivery));
        test_servers(&transport, &domain_config.servers, &tls, &envelope).await
    });
    let passed = results.iter().all(|t| t.passed());
    if json {
        println!("{}", server_tests_json(name, &envelope, &results));
    } else {
        print!("{}", render_server_tests(name, &envelope, &results));
    }
    if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn plan(path: &Path, domain: Option<&str>, opts: PlanOptions<'_>) -> ExitCode {
    let PlanOptions { messages, down, now_ms, rcpt, json } = opts;
    let Some((Loaded { config, policies, .. }, index)) = load_for_domain(path, domain) else {
        return ExitCode::FAILURE;
    };
    let domain_config = &config.domains[index];
    let Some(policy) = policies.domain(&domain_config.name) else {
        eprintln!("error: domain {}: policy not loaded", domain_config.name);
        return ExitCode::FAILURE;
    };
    let down = match simulate::down_indices(policy.servers(), &domain_config.name, down) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now_ms = now_ms.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    });
    let rcpt = rcpt.unwrap_or_else(|| format!("postmaster@{}", domain_config.name));
    let sim = simulate::simulate(&domain_config.name, policy, &simulate::Scenario { messages, down: &down, now_ms, rcpt: &rcpt });
    if json {
        match serde_json::to_string(&sim) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", simulate::render_table(&sim, policy.router(), &down));
    }
    ExitCode::SUCCESS
}
