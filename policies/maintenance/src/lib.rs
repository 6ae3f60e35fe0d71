//! Maintenance windows: a server inside one of its windows is used only as a last resort
//! (behind every other live server, ahead of servers known to be down), using the time the
//! relay passes in.
//!
//! ```toml
//! [[domain.policy_config.windows]]
//! server = "mx1.example.com"            # host, or host:port
//! start = "2026-12-06T02:00:00Z"
//! end = "2026-12-06T04:00:00Z"
//! ```

use mxrelay_policy_sdk::{Message, Policy, Problem, Router, Server, builtin_plan, setting_problem};
use serde::Deserialize;

/// `[domain.policy_config]` of the maintenance policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The windows.
    #[serde(default)]
    pub windows: Vec<WindowSetting>,
}

/// One window as configured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSetting {
    /// `host` or `host:port` of a configured server.
    pub server: String,
    /// Start, RFC 3339 UTC (`2026-12-06T02:00:00Z`).
    pub start: String,
    /// End (exclusive), RFC 3339 UTC.
    pub end: String,
}

#[derive(Debug)]
struct Window {
    server: u32,
    start_ms: u64,
    end_ms: u64,
}

/// The built-in plan with servers under maintenance moved back.
#[derive(Debug)]
pub struct Maintenance {
    router: Router,
    windows: Vec<Window>,
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` into ms since the epoch.
pub fn parse_utc(text: &str) -> Option<u64> {
    let t = text.trim();
    let b = t.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d, hh, mm, ss) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000).ok()
}

impl Policy for Maintenance {
    type Settings = Settings;
    const WANTS_ENVELOPE: bool = false;

    fn new(servers: Vec<Server>, settings: Settings) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut windows = Vec::new();
        for (n, w) in settings.windows.iter().enumerate() {
            let name = w.server.trim().trim_end_matches('.').to_ascii_lowercase();
            let server = servers.iter().position(|s| s.host == name || s.address() == name);
            let (start, end) = (parse_utc(&w.start), parse_utc(&w.end));
            let at = |field: &str| format!("windows[{n}].{field}");
            if server.is_none() {
                problems.push(setting_problem(&at("server"), format!("{:?} is not one of the domain's servers", w.server)));
            }
            if start.is_none() {
                problems
                    .push(setting_problem(&at("start"), format!("{:?} is not a UTC time like 2026-12-06T02:00:00Z", w.start)));
            }
            if end.is_none() {
                problems.push(setting_problem(&at("end"), format!("{:?} is not a UTC time like 2026-12-06T04:00:00Z", w.end)));
            }
            if let (Some(server), Some(start_ms), Some(end_ms)) = (server, start, end) {
                if end_ms <= start_ms {
                    problems.push(setting_problem(&at("end"), "the window ends before it starts"));
                }
                windows.push(Window { server: server as u32, start_ms, end_ms });
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Maintenance { router: Router::new(servers), windows })
    }

    fn plan(&self, msg: &Message) -> Vec<u32> {
        let plan = builtin_plan(&self.router, msg);
        let in_window = |i: u32| self.windows.iter().any(|w| w.server == i && (w.start_ms..w.end_ms).contains(&msg.now_ms));
        let (mut live, mut resting, mut down) = (Vec::new(), Vec::new(), Vec::new());
        for i in plan {
            if msg.down.contains(&i) {
                down.push(i);
            } else if in_window(i) {
                resting.push(i);
            } else {
                live.push(i);
            }
        }
        live.extend(resting);
        live.extend(down);
        live
    }
}

mxrelay_policy_sdk::export_policy!(Maintenance);

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Maintenance {
        let servers = vec![Server::new("mx1.example.com", 10), Server::new("mx2.example.com", 20)];
        let windows = vec![WindowSetting {
            server: "mx1.example.com".into(),
            start: "2026-12-06T02:00:00Z".into(),
            end: "2026-12-06T04:00:00Z".into(),
        }];
        Maintenance::new(servers, Settings { windows }).expect("valid")
    }

    #[test]
    fn utc_times() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2026-11-28T18:48:20Z"), Some(1_795_891_700_000));
        assert_eq!(parse_utc("2026-11-28 18:48:20"), None);
        assert_eq!(parse_utc("2026-13-28T18:48:20Z"), None);
    }

    #[test]
    fn a_server_in_its_window_is_last_resort() {
        let p = policy();
        let at = |t: &str| p.plan(&Message { now_ms: parse_utc(t).expect("time"), ..Message::default() });
        assert_eq!(at("2026-12-06T01:59:59Z"), vec![0, 1]);
        assert_eq!(at("2026-12-06T02:00:00Z"), vec![1, 0]);
        assert_eq!(at("2026-12-06T03:59:59Z"), vec![1, 0]);
        assert_eq!(at("2026-12-06T04:00:00Z"), vec![0, 1]);
        // Still used when the backup is down: last resort, not excluded.
        let plan =
            p.plan(&Message { now_ms: parse_utc("2026-12-06T03:00:00Z").expect("time"), down: vec![1], ..Message::default() });
        assert_eq!(plan, vec![0, 1]);
    }

    #[test]
    fn settings_errors_name_the_window_and_field() {
        let servers = vec![Server::new("mx1.example.com", 10)];
        let windows = vec![WindowSetting {
            server: "mx9.example.com".into(),
            start: "tomorrow".into(),
            end: "2026-12-06T04:00:00Z".into(),
        }];
        let err = Maintenance::new(servers, Settings { windows }).expect_err("invalid");
        assert!(err.iter().any(|p| p.host == "windows[0].server" && p.message.contains("mx9.example.com")), "{err:?}");
        assert!(err.iter().any(|p| p.host == "windows[0].start" && p.message.contains("tomorrow")), "{err:?}");
    }
}
