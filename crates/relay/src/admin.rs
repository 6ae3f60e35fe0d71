//! The admin HTTP listener (`[relay] admin_listen`): Prometheus metrics, the domains API
//! and the inbound-servers widget.
//!
//! * `GET /metrics`: Prometheus text format (no token: bind it to a private address).
//! * `GET /healthz`: `200` when the queue's writer and the scheduler answer and new mail is
//!   stored, `503` naming the part that does not answer, the reason new mail is refused (a
//!   full disk), or that shutdown has started (no token), for load balancers and
//!   orchestrators.
//! * `GET /api/domains`, `GET /api/domains/{domain}/servers`,
//!   `PUT /api/domains/{domain}/servers`: need `Authorization: Bearer <relay.admin_token>`.
//!   A PUT is validated by the same core as the widget (`422` with the same problems, nothing
//!   applied), then applied to new deliveries at once and written to the config file.
//! * `GET /` and the widget's files from `relay.web_root`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use mxrelay_policy_core::{Problem, RawServer, Server, Severity, validate_servers};
use serde::Serialize;

use crate::config::Config;
use crate::policies::Policies;
use crate::relay::Readiness;
use crate::scheduler::Scope;

/// Largest request body accepted (a server list is a few KiB).
const MAX_BODY: usize = 64 * 1024;

/// Installs the process-wide metrics recorder; call once, before anything records.
pub fn install_metrics() -> Option<PrometheusHandle> {
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
}

/// What the admin handlers share with the relay.
#[derive(Clone)]
pub struct AdminState {
    /// The metrics recorder's handle.
    pub metrics: Option<PrometheusHandle>,
    /// The configuration in force (the API changes its server lists).
    pub config: Arc<RwLock<Config>>,
    /// The policies in force.
    pub policies: Arc<RwLock<Arc<Policies>>>,
    /// The scheduler, for queue control.
    pub events: tokio::sync::mpsc::UnboundedSender<crate::scheduler::Event>,
    /// Domains given a queue gauge at the last scrape, so that one no longer configured or
    /// queued for is set to 0 once instead of keeping its last value.
    pub gauged_domains: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Held by each `PUT .../servers` from start to end (and by a reload): it reads the config
    /// file and the policies in force and writes both back, so two at once would lose one's
    /// change.
    pub server_lists: Arc<tokio::sync::Mutex<()>>,
    /// The queue, to read a queued message for `GET /api/queue/{id}`.
    pub queue: crate::queue::Queue,
    /// The relay's outbound side, to test a domain's servers as deliveries reach them.
    pub transport: Arc<crate::outbound::Transport>,
    /// Set once shutdown starts.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Serves the admin API on `addr`; returns the address actually bound.
pub async fn serve(addr: SocketAddr, state: AdminState) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/domains", get(list_domains))
        .route("/api/domains/{domain}/servers", get(get_servers).put(put_servers))
        .route("/api/domains/{domain}/test", axum::routing::post(test_domain_servers))
        .route("/api/queue", get(list_queue))
        .route("/api/queue/retry", axum::routing::post(retry_queue))
        .route("/api/queue/hold", axum::routing::post(hold_queued))
        .route("/api/queue/release", axum::routing::post(release_queued))
        .route("/api/queue/{id}", get(show_queued).delete(remove_queued))
        .route("/api/queue/{id}/message", get(queued_message))
        .route("/", get(index))
        .route("/{*file}", get(static_file))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    Ok(bound)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long `/healthz` waits for each part to answer: as long as sessions wait before they
/// take a writer still busy for hung and refuse mail, so the two agree.
const HEALTH_WAIT: std::time::Duration = crate::queue::STALLED_AFTER;

async fn healthz(State(state): State<AdminState>) -> Response {
    // `503` with what is wrong, for whoever routes mail to the relay.
    let unavailable = |status: &str, error: String| {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": status, "error": error }))).into_response()
    };
    if state.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        // No new mail is taken: a load balancer should send it elsewhere.
        return unavailable("stopping", "shutting down: no new mail accepted".into());
    }
    match crate::relay::check_alive(&state.queue, &state.events, HEALTH_WAIT).await {
        Ok(Readiness::Ready) => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Ok(Readiness::Refusing(why)) => unavailable("refusing", why),
        Err(stuck) => unavailable("unresponsive", format!("{stuck} within {}s", HEALTH_WAIT.as_secs())),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    // Queue size and age are read at scrape time: computing the age on every change would
    // cost a pass over the queue per message.
    let (tx, rx) = tokio::sync::oneshot::channel();
    if state.events.send(crate::scheduler::Event::Stats(tx)).is_ok()
        && let Ok(per_domain) = rx.await
    {
        let now = crate::queue::now_ms();
        let age = |oldest_ms: Option<u64>| oldest_ms.map_or(0, |t| now.saturating_sub(t)) as f64 / 1000.0;
        metrics::gauge!("mxrelay_queue_size").set(per_domain.values().map(|s| s.size).sum::<usize>() as f64);
        metrics::gauge!("mxrelay_queue_held").set(per_domain.values().map(|s| s.held).sum::<usize>() as f64);
        metrics::gauge!("mxrelay_queue_oldest_seconds").set(age(per_domain.values().map(|s| s.oldest_ms).min()));
        // Every configured domain has its series, 0 when nothing waits, so a customer whose
        // mail piles up stands out; so has any other domain with mail queued (notifications).
        let mut current: HashSet<String> = read(&state.config).domains.iter().map(|d| d.name.clone()).collect();
        current.extend(per_domain.keys().cloned());
        let mut gauged = state.gauged_domains.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for domain in current.union(&gauged) {
            let stats = per_domain.get(domain);
            let size = stats.map_or(0, |s| s.size);
            metrics::gauge!("mxrelay_domain_queue_size", "domain" => domain.clone()).set(size as f64);
            metrics::gauge!("mxrelay_domain_queue_oldest_seconds", "domain" => domain.clone())
                .set(age(stats.map(|s| s.oldest_ms)));
        }
        *gauged = current;
    }
    match &state.metrics {
        Some(m) => m.render().into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed").into_response(),
    }
}

#[derive(Debug, Serialize)]
struct ApiError {
    error: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<Problem>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ApiError { error: message.into(), problems: vec![] })).into_response()
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why an API request is refused before it is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denied {
    /// No token is configured: the API is off.
    Disabled,
    /// The token is missing or wrong.
    Unauthorized,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Disabled => error(StatusCode::FORBIDDEN, "the API is disabled: set relay.admin_token to enable it"),
            Denied::Unauthorized => error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"),
        }
    }
}

/// Proof that the request carries the configured bearer token: an `/api/*` handler takes it
/// as an argument, and a request without it is refused before the handler runs.
struct Authorized;

impl axum::extract::FromRequestParts<AdminState> for Authorized {
    type Rejection = Denied;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AdminState) -> Result<Self, Denied> {
        let expected = read(&state.config).relay.admin_token.clone().ok_or(Denied::Disabled)?;
        let given =
            parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) => Ok(Authorized),
            Some(_) | None => Err(Denied::Unauthorized),
        }
    }
}

/// One queued envelope as the queue commands show it.
#[derive(Debug, Serialize)]
struct QueuedView {
    id: String,
    domain: String,
    sender: String,
    recipients: Vec<String>,
    size: u64,
    attempts: u32,
    age_seconds: u64,
    next_attempt_in_seconds: i64,
    last_error: Option<String>,
    /// Held by an operator: no attempt until released.
    held: bool,
}

impl QueuedView {
    fn of(e: crate::queue::Envelope, now: u64) -> QueuedView {
        QueuedView {
            id: e.queue_id(),
            age_seconds: now.saturating_sub(e.received_ms) / 1000,
            next_attempt_in_seconds: (e.next_attempt_ms as i64 - now as i64) / 1000,
            domain: e.domain,
            sender: e.sender,
            recipients: e.recipients,
            size: e.size,
            attempts: e.attempts,
            last_error: e.last_error,
            held: e.held,
        }
    }
}

/// The queued envelopes in `scope`, from the scheduler.
async fn snapshot(state: &AdminState, scope: Scope) -> Result<Vec<crate::queue::Envelope>, Response> {
    let unavailable = || error(StatusCode::SERVICE_UNAVAILABLE, "the scheduler is not running");
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.events.send(crate::scheduler::Event::Snapshot(scope, tx)).map_err(|_| unavailable())?;
    rx.await.map_err(|_| unavailable())
}

/// `GET /api/queue`, or `GET /api/queue?domain=D` for one domain's mail.
async fn list_queue(_: Authorized, State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let scope = match query.as_deref().map(|q| q.split_once('=')) {
        None => Scope::All,
        Some(Some(("domain", domain))) if crate::queue_cli::is_domain_name(domain) => {
            Scope::Domain(domain.trim_end_matches('.').to_ascii_lowercase())
        }
        Some(_) => return error(StatusCode::BAD_REQUEST, "the only query is ?domain=NAME, with a domain name"),
    };
    let mut envelopes = match snapshot(&state, scope).await {
        Ok(envelopes) => envelopes,
        Err(refused) => return refused,
    };
    envelopes.sort_by_key(|e| e.id);
    let now = crate::queue::now_ms();
    let view: Vec<QueuedView> = envelopes.into_iter().map(|e| QueuedView::of(e, now)).collect();
    Json(view).into_response()
}

/// A queued envelope by its ID in the URL, and its message as stored (the relay's
/// `Received:` field first).
async fn queued(state: &AdminState, id: &str) -> Result<(crate::queue::Envelope, Vec<u8>), Response> {
    let parsed =
        parse_id(id).ok_or_else(|| error(StatusCode::BAD_REQUEST, format!("{id:?} is not a queue ID (16 hex digits)")))?;
    let envelope = snapshot(state, Scope::Id(parsed)).await?.pop().ok_or_else(|| not_queued(id))?;
    let data = (state.queue.load_data(parsed).await)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read {id}: {e}")))?;
    Ok((envelope, data))
}

/// `GET /api/queue/{id}`: the envelope, as in the list, and the message's header section.
async fn show_queued(_: Authorized, State(state): State<AdminState>, UrlPath(id): UrlPath<String>) -> Response {
    let (envelope, data) = match queued(&state, &id).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let end = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(data.len(), |at| at + 2);
    let headers = String::from_utf8_lossy(&data[..end]).into_owned();
    Json(serde_json::json!({ "envelope": QueuedView::of(envelope, crate::queue::now_ms()), "headers": headers })).into_response()
}

/// `GET /api/queue/{id}/message`: the whole message as stored (Postfix's `postcat -bh`).
async fn queued_message(_: Authorized, State(state): State<AdminState>, UrlPath(id): UrlPath<String>) -> Response {
    match queued(&state, &id).await {
        Ok((_, data)) => ([(header::CONTENT_TYPE, "message/rfc822")], data).into_response(),
        Err(refused) => refused,
    }
}

/// The body of `POST /api/queue/retry|hold|release`: `{"id": "..."}`, `{"domain": "..."}`
/// or `{"all": true}`. Retry also takes `{}` for everything.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeRequest {
    id: Option<String>,
    domain: Option<String>,
    #[serde(default)]
    all: bool,
}

fn parse_id(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim(), 16).ok()
}

/// The envelopes a request names; `{}` means everything only when `empty_is_all`. A refusal
/// says why, for a `400`.
fn scope(body: &[u8], empty_is_all: bool) -> Result<Scope, String> {
    let usage = r#"give {"id": "..."}, {"domain": "..."} or {"all": true}"#;
    let req: ScopeRequest =
        serde_json::from_slice(if body.is_empty() { b"{}" } else { body }).map_err(|e| format!("{usage}: {e}"))?;
    match (req.id, req.domain, req.all || empty_is_all) {
        (Some(id), None, _) if !req.all => {
            parse_id(&id).map(Scope::Id).ok_or(format!("{id:?} is not a queue ID (16 hex digits)"))
        }
        (None, Some(domain), _) if !req.all => Ok(Scope::Domain(domain.trim_end_matches('.').to_ascii_lowercase())),
        (None, None, true) => Ok(Scope::All),
        (None, None, false) => Err(usage.to_string()),
        (Some(_), _, _) | (None, Some(_), _) => Err(format!("{usage}, only one of them")),
    }
}

async fn retry_queue(_: Authorized, State(state): State<AdminState>, body: Bytes) -> Response {
    let scope = match scope(&body, true) {
        Ok(scope) => scope,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let one = scope.id();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = state.events.send(crate::scheduler::Event::RetryNow(scope, tx));
    match rx.await {
        Ok(retried) if one.is_some() && retried.retrying + retried.held == 0 => {
            not_queued(one.map(crate::queue::format_id).unwrap_or_default())
        }
        Ok(retried) => (StatusCode::ACCEPTED, Json(retried)).into_response(),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the scheduler is not running"),
    }
}

/// The answer about a queue ID that is not queued.
fn not_queued(id: impl std::fmt::Display) -> Response {
    error(StatusCode::NOT_FOUND, format!("{id} is not in the queue"))
}

/// `POST /api/queue/hold` and `/api/queue/release`: answers how many messages changed.
async fn hold_or_release(state: &AdminState, body: &[u8], hold: bool) -> Response {
    let scope = match scope(body, false) {
        Ok(scope) => scope,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let one = scope.id();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = state.events.send(crate::scheduler::Event::Hold(scope, hold, tx));
    let answer = rx.await;
    // None changed: an ID already held (or released) is fine, one not queued is not.
    if let (Some(id), Ok(Ok(0))) = (one, &answer) {
        match snapshot(state, Scope::Id(id)).await {
            Ok(found) if found.is_empty() => {
                return not_queued(crate::queue::format_id(id));
            }
            Ok(_) => {}
            Err(response) => return response,
        }
    }
    match answer {
        Ok(Ok(n)) => {
            let field = if hold { "held" } else { "released" };
            Json(serde_json::Value::Object([(field.to_string(), n.into())].into_iter().collect())).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("applied, but not yet on disk: {e}")),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the scheduler is not running"),
    }
}

async fn hold_queued(_: Authorized, State(state): State<AdminState>, body: Bytes) -> Response {
    hold_or_release(&state, &body, true).await
}

async fn release_queued(_: Authorized, State(state): State<AdminState>, body: Bytes) -> Response {
    hold_or_release(&state, &body, false).await
}

async fn remove_queued(_: Authorized, State(state): State<AdminState>, UrlPath(id): UrlPath<String>) -> Response {
    let Some(parsed) = parse_id(&id) else {
        return error(StatusCode::BAD_REQUEST, format!("{id:?} is not a queue ID (16 hex digits)"));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = state.events.send(crate::scheduler::Event::Remove(parsed, tx));
    match rx.await {
        Ok(true) => Json(serde_json::json!({"removed": id})).into_response(),
        Ok(false) => not_queued(&id),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the scheduler is not running"),
    }
}

#[derive(Debug, Serialize)]
struct DomainSummary {
    name: String,
    policy: String,
    servers: usize,
}

async fn list_domains(_: Authorized, State(state): State<AdminState>) -> Response {
    let config = read(&state.config);
    let list: Vec<DomainSummary> = config
        .domains
        .iter()
        .map(|d| DomainSummary { name: d.name.clone(), policy: d.policy.label(), servers: d.servers.len() })
        .collect();
    Json(list).into_response()
}

async fn get_servers(_: Authorized, State(state): State<AdminState>, UrlPath(domain): UrlPath<String>) -> Response {
    let config = read(&state.config);
    match config.domain(&domain) {
        Some(d) => Json(d.servers.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("{domain} is not a configured domain")),
    }
}

async fn put_servers(_: Authorized, State(state): State<AdminState>, UrlPath(domain): UrlPath<String>, body: Bytes) -> Response {
    let raw: Vec<RawServer> = match read_json(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body must be a JSON list of servers: {e}")),
    };
    let _one_at_a_time = state.server_lists.lock().await;
    let name = match read(&state.config).domain(&domain) {
        Some(d) => d.name.clone(),
        None => return error(StatusCode::NOT_FOUND, format!("{domain} is not a configured domain")),
    };
    let servers = match validated(&raw, "changed") {
        Ok(servers) => servers,
        Err(refused) => return *refused,
    };
    // Build the new policy first: if the domain's policy refuses the list, nothing changes.
    let next = match read(&state.policies).with_domain_servers(&name, servers.clone()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    };
    let path = read(&state.config).path.clone();
    let saved = {
        let (path, name, servers) = (path.clone(), name.clone(), servers.clone());
        tokio::task::spawn_blocking(move || persist(&path, &name, &servers)).await
    };
    if let Err(e) = saved.map_err(|e| e.to_string()).and_then(|r| r) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("not saved: cannot write {}: {e}", path.display()));
    }
    *state.policies.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    {
        let mut config = state.config.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = config.domains.iter_mut().find(|d| d.name == name) {
            d.servers = servers.clone();
        }
    }
    tracing::info!(domain = %name, servers = servers.len(), "server list changed through the API");
    Json(servers).into_response()
}

/// A server list from a request body, validated by the core; or `422` with every problem,
/// the widget's messages, saying that nothing was `done`.
fn validated(raw: &[RawServer], done: &str) -> Result<Vec<Server>, Box<Response>> {
    validate_servers(raw).map(|(servers, _warnings)| servers).map_err(|problems| {
        let count = problems.iter().filter(|p| p.severity == Severity::Error).count();
        let body = ApiError { error: format!("{count} problem(s) in the server list; nothing was {done}"), problems };
        Box::new((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response())
    })
}

/// Reads a JSON body. A problem inside it is named by its path (`[1].prefrence: unknown field
/// ...`, as `index` 1 in the API's problems), without the line and column a one-line body
/// makes useless; a body that is not JSON keeps its position.
fn read_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut reader = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            return inner.to_string();
        }
        let text = inner.to_string();
        let position = format!(" at line {} column {}", inner.line(), inner.column());
        format!("{path}: {}", text.strip_suffix(&position).unwrap_or(&text))
    })
}

/// The body of `POST /api/domains/{domain}/test`; every field is optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    /// The recipient to offer; default `postmaster@` the domain.
    rcpt: Option<String>,
    /// The sender to offer; default the null sender.
    #[serde(default)]
    sender: String,
    /// A server list to test instead of the configured one (as `PUT .../servers` takes it),
    /// so that a list can be tried before it is saved.
    servers: Option<Vec<RawServer>>,
}

/// `POST /api/domains/{domain}/test`: what `mxrelay test-servers --json` prints, for the
/// domain's servers or a list given in the body, with the domain's TLS settings.
async fn test_domain_servers(
    _: Authorized,
    State(state): State<AdminState>,
    UrlPath(domain): UrlPath<String>,
    body: Bytes,
) -> Response {
    let request: TestRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TestRequest::default()
    } else {
        match read_json(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be a JSON object of rcpt, sender and servers: {e}"),
                );
            }
        }
    };
    let Some((name, configured)) = read(&state.config).domain(&domain).map(|d| (d.name.clone(), d.servers.clone())) else {
        return error(StatusCode::NOT_FOUND, format!("{domain} is not a configured domain"));
    };
    let servers = match &request.servers {
        None => configured,
        Some(raw) => match validated(raw, "tested") {
            Ok(servers) => servers,
            Err(refused) => return *refused,
        },
    };
    let tls = read(&state.policies).tls(&name);
    let envelope = crate::outbound::TestEnvelope {
        sender: request.sender,
        rcpt: request.rcpt.unwrap_or_else(|| format!("postmaster@{name}")),
    };
    let results = crate::outbound::test_servers(&state.transport, &servers, &tls, &envelope).await;
    let report = crate::outbound::server_tests_json(&name, &envelope, &results);
    tracing::info!(domain = %name, servers = results.len(), passed = %report["passed"], "servers tested through the API");
    Json(report).into_response()
}

/// Writes `servers` as the domain's `[[domain.server]]` list, keeping the rest of the file
/// (comments included), through a temporary file and a rename.
fn persist(path: &Path, domain: &str, servers: &[Server]) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| e.to_string())?;
    let domains = doc.get_mut("domain").and_then(toml_edit::Item::as_array_of_tables_mut).ok_or("no [[domain]] tables")?;
    let table = domains
        .iter_mut()
        .find(|t| {
            t.get("name").and_then(toml_edit::Item::as_str).is_some_and(|n| n.trim_end_matches('.').eq_ignore_ascii_case(domain))
        })
        .ok_or_else(|| format!("no [[domain]] named {domain}"))?;
    let mut list = toml_edit::ArrayOfTables::new();
    for s in servers {
        let mut t = toml_edit::Table::new();
        t.insert("host", toml_edit::value(s.host.clone()));
        if s.port != mxrelay_policy_core::DEFAULT_PORT {
            t.insert("port", toml_edit::value(i64::from(s.port)));
        }
        t.insert("preference", toml_edit::value(i64::from(s.preference)));
        if s.weight != mxrelay_policy_core::DEFAULT_WEIGHT {
            t.insert("weight", toml_edit::value(i64::from(s.weight)));
        }
        list.push(t);
    }
    table.insert("server", toml_edit::Item::ArrayOfTables(list));
    // Written whole under another name, synced, then renamed over the file and the directory
    // synced: after a crash or a power cut the file is the old one or the new one, and a
    // `200` means the new one.
    // The new file keeps the old one's mode: it holds the admin token.
    let mode = std::fs::metadata(path).map_err(|e| e.to_string())?.permissions();
    let tmp = path.with_extension("toml.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
    file.set_permissions(mode).map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut file, doc.to_string().as_bytes()).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())
}

async fn index(state: State<AdminState>) -> Response {
    static_file(state, UrlPath("index.html".into())).await
}

/// The widget's files from `relay.web_root`; only plain relative names, no `..`.
async fn static_file(State(state): State<AdminState>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(root) = read(&state.config).relay.web_root.clone() else {
        return error(StatusCode::NOT_FOUND, "the widget is not served: set relay.web_root");
    };
    let safe = !file.is_empty()
        && file.split('/').all(|part| !part.is_empty() && part != ".." && part != ".")
        && file.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if !safe {
        return error(StatusCode::NOT_FOUND, "no such file");
    }
    let path: PathBuf = root.join(&file);
    let content_type = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some(_) | None => "application/octet-stream",
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(_) => error(StatusCode::NOT_FOUND, "no such file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_commands_name_exactly_one_scope() {
        let parsed = |body: &str, empty_is_all| scope(body.as_bytes(), empty_is_all);
        assert!(matches!(parsed(r#"{"id": "00000000000000FF"}"#, false), Ok(Scope::Id(255))));
        assert!(matches!(parsed(r#"{"domain": "Customer.Test."}"#, false), Ok(Scope::Domain(d)) if d == "customer.test"));
        assert!(matches!(parsed(r#"{"all": true}"#, false), Ok(Scope::All)));
        assert!(matches!(parsed("", true), Ok(Scope::All)), "retry's {{}} is everything");
        for (body, why) in [
            ("", "hold with no scope would hold everything by accident"),
            (r#"{"id": "x"}"#, "not an ID"),
            (r#"{"id": "FF", "domain": "customer.test"}"#, "two scopes"),
            (r#"{"domain": "customer.test", "all": true}"#, "two scopes"),
            (r#"{"ids": ["FF"]}"#, "unknown field"),
        ] {
            let refused = parsed(body, false).expect_err(why);
            assert!(refused.starts_with("give {") || refused.contains("not a queue ID"), "{body}: {refused}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn persist_replaces_only_the_domains_servers() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("relay.toml");
        let original = "# my relay\n[relay]\nhostname = \"r.test\"\n\n[[domain]]\nname = \"a.test\" # keep\n[[domain.server]]\nhost = \"old.a.test\"\n\n[[domain]]\nname = \"b.test\"\n[[domain.server]]\nhost = \"mx.b.test\"\npreference = 5\n";
        std::fs::write(&path, original).expect("write");
        let servers = vec![Server::new("new1.a.test", 10), Server { port: 2525, weight: 3, ..Server::new("new2.a.test", 20) }];
        persist(&path, "A.test", &servers).expect("persist");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# my relay\n") && text.contains("# keep"), "{text}");
        assert!(
            !text.contains("old.a.test")
                && text.contains("new1.a.test")
                && text.contains("port = 2525")
                && text.contains("weight = 3"),
            "{text}"
        );
        assert!(text.contains("mx.b.test") && text.contains("preference = 5"), "{text}");
    }

    /// The config holds the admin token: a saved list must not make it readable to others.
    #[test]
    fn persist_keeps_the_files_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "[[domain]]\nname = \"a.test\"\n[[domain.server]]\nhost = \"old.a.test\"\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        persist(&path, "a.test", &[Server::new("new.a.test", 10)]).expect("persist");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o640);
        assert!(std::fs::read_to_string(&path).expect("read").contains("new.a.test"));
        assert!(!path.with_extension("toml.tmp").exists(), "the temporary file is gone");
    }
}
