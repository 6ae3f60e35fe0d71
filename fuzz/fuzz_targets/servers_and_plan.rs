//! Server entries as typed, then plans: validation never panics, every problem names its
//! entry, and a valid list's plan names every server exactly once, with down servers last.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_policy_core::{PlanInput, RawNumber, RawServer, Router};

/// Maps bytes into the entry grammar's alphabet so most inputs reach deep validation.
fn entries(data: &[u8]) -> Vec<RawServer> {
    const HOST_CHARS: &[u8] = b"abcxyz019.-:[]_ ";
    data.chunks(8)
        .take(64)
        .map(|c| {
            let host: String =
                c.iter().take(c.len().saturating_sub(3)).map(|b| HOST_CHARS[*b as usize % HOST_CHARS.len()] as char).collect();
            let num = |b: Option<&u8>| {
                b.map(
                    |b| if b % 7 == 0 { RawNumber::Text(format!("{}x", b)) } else { RawNumber::Int(i64::from(*b) * 300 - 1000) },
                )
            };
            RawServer {
                host: format!("{host}.example"),
                port: num(c.get(5)),
                preference: num(c.get(6)),
                weight: num(c.get(7)).filter(|_| c.len() > 7),
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let raw = entries(data);
    match Router::from_raw(&raw) {
        Err(problems) => assert!(problems.iter().all(|p| p.index.is_none_or(|i| (i as usize) < raw.len()))),
        Ok((router, _)) => {
            let n = router.servers().len() as u32;
            let seed = data.iter().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
            let down: Vec<u32> = (0..n).filter(|i| (seed >> (i % 64)) & 1 == 1).collect();
            let plan = router.plan(&PlanInput { seed, attempt: 1, now_ms: 0, down: &down });
            let mut sorted = plan.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            let first_down = plan.iter().position(|i| down.contains(i)).unwrap_or(plan.len());
            assert!(plan[first_down..].iter().all(|i| down.contains(i)), "a live server after a down one");
        }
    }
});
