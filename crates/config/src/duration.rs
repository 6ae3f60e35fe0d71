//! Durations in the config: `250ms`, `30s`, `5m`, `4h`, `5d`.

use std::time::Duration;

/// Parses a duration like `30s`; the message says what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad(text))?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad(text)),
    };
    n.checked_mul(unit_ms).map(Duration::from_millis).ok_or_else(|| bad(text))
}

fn bad(text: &str) -> String {
    format!("{text:?} is not a duration; write a whole number and a unit: 250ms, 30s, 5m, 4h or 5d")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(432_000)));
        for bad in ["", "5", "m", "1.5h", "-1s", "5 parsecs", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
