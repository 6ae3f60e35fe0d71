//! The policy core for the browser, bound with wasm-bindgen.
//!
//! The inbound-servers widget (`web/`) calls these on every keystroke; the relay's admin API
//! validates with the same core, so the browser and the relay cannot disagree. Arguments and
//! results are JSON text: small glue, no extra serialisation crate in the bundle.

use mxrelay_policy_core::{PlanInput, Problem, RawServer, Router, validate_servers};
use serde::Serialize;
use wasm_bindgen::prelude::wasm_bindgen;

/// Problems of a server list: `[{index, host, field, severity, code, message}]`.
#[wasm_bindgen]
pub fn validate(entries_json: &str) -> String {
    json(&match parse(entries_json) {
        Ok(raw) => mxrelay_policy_core::validate(&raw),
        Err(p) => vec![p],
    })
}

/// One server in the preview.
#[derive(Debug, Serialize)]
struct PreviewServer {
    index: u32,
    address: String,
    down: bool,
    /// Share of its tier's traffic while the whole tier is up, percent.
    share: f64,
    /// Share of all mail it receives with the given servers down, percent.
    receives: f64,
}

#[derive(Debug, Serialize)]
struct PreviewTier {
    preference: u16,
    servers: Vec<PreviewServer>,
}

/// What the widget shows.
#[derive(Debug, Serialize)]
struct Preview {
    problems: Vec<Problem>,
    tiers: Vec<PreviewTier>,
    /// Percent of mail that finds every server down: queued and retried.
    queued: f64,
}

/// Problems plus, when the list is usable, tiers, shares and where mail goes with the
/// servers at `down_json` (indices) down.
#[wasm_bindgen]
pub fn preview(entries_json: &str, down_json: &str) -> String {
    let raw = match parse(entries_json) {
        Ok(r) => r,
        Err(p) => return json(&Preview { problems: vec![p], tiers: vec![], queued: 0.0 }),
    };
    let down: Vec<u32> = serde_json::from_str(down_json).unwrap_or_default();
    let (router, problems) = match Router::from_raw(&raw) {
        Ok((router, warnings)) => (router, warnings),
        Err(problems) => return json(&Preview { problems, tiers: vec![], queued: 0.0 }),
    };
    let (received, queued) = router.expected_shares(&down);
    let tiers = router
        .tiers()
        .iter()
        .map(|t| PreviewTier {
            preference: t.preference,
            servers: t
                .members
                .iter()
                .map(|&i| PreviewServer {
                    index: i,
                    address: router.servers()[i as usize].address(),
                    down: down.contains(&i),
                    share: 100.0 * router.share(i),
                    receives: 100.0 * received[i as usize],
                })
                .collect(),
        })
        .collect();
    json(&Preview { problems, tiers, queued: 100.0 * queued })
}

/// The plan for one message (golden vectors in the browser): `[indices]`, or `null` when
/// the list is invalid.
#[wasm_bindgen]
pub fn plan(entries_json: &str, seed: u64, attempt: u32, now_ms: u64, down_json: &str) -> String {
    let down: Vec<u32> = serde_json::from_str(down_json).unwrap_or_default();
    match parse(entries_json).ok().and_then(|raw| validate_servers(&raw).ok()) {
        Some((servers, _)) => json(&Router::new(servers).plan(&PlanInput { seed, attempt, now_ms, down: &down })),
        None => "null".into(),
    }
}

fn parse(entries_json: &str) -> Result<Vec<RawServer>, Problem> {
    serde_json::from_str(entries_json).map_err(|e| Problem {
        index: None,
        host: String::new(),
        field: mxrelay_policy_core::Field::Servers,
        severity: mxrelay_policy_core::Severity::Error,
        code: mxrelay_policy_core::ProblemCode::Policy,
        message: format!("the server list is not readable: {e}"),
    })
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"[{"host":"mail.mailroutedemo.com","preference":10},{"host":"mail2.mailroutedemo.com","preference":10},{"host":"mail3.mailroutedemo.com","preference":10},{"host":"backup1.mailroutedemo.com","preference":20},{"host":"backup2.mailroutedemo.com","preference":20}]"#;

    #[test]
    fn preview_of_the_seed_example() {
        let v: serde_json::Value = serde_json::from_str(&preview(SEED, "[]")).expect("json");
        assert_eq!(v["tiers"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["tiers"][0]["servers"][0]["receives"].as_f64().map(f64::round), Some(33.0));
        assert_eq!(v["tiers"][1]["servers"][0]["receives"].as_f64(), Some(0.0));
        let v: serde_json::Value = serde_json::from_str(&preview(SEED, "[0,1,2]")).expect("json");
        assert_eq!(v["tiers"][1]["servers"][0]["receives"].as_f64(), Some(50.0));
        let v: serde_json::Value = serde_json::from_str(&preview(SEED, "[0,1,2,3,4]")).expect("json");
        assert_eq!(v["queued"].as_f64(), Some(100.0));
    }

    #[test]
    fn an_unknown_key_is_refused_not_read_as_a_default() {
        let v: serde_json::Value = serde_json::from_str(&validate(r#"[{"host":"a.example.com","prefrence":20}]"#)).expect("json");
        let message = v[0]["message"].as_str().unwrap_or_default();
        assert!(message.contains("unknown field `prefrence`"), "{v}");
        assert_eq!(plan(r#"[{"host":"a.example.com","prefrence":20}]"#, 0, 1, 0, "[]"), "null");
    }

    #[test]
    fn form_text_is_validated_like_the_config() {
        let v: serde_json::Value = serde_json::from_str(&validate(r#"[{"host":"999.1.1.1","preference":"ten"}]"#)).expect("json");
        let codes: Vec<&str> = v.as_array().expect("list").iter().filter_map(|p| p["code"].as_str()).collect();
        assert_eq!(codes, vec!["ip-literal", "not-a-number"]);
        assert!(validate("not json").contains("not readable"));
    }
}
