//! Fault injection for the supervision tests: `KVTIER_FAULT="demoter:panic,ring:stall"` makes
//! the named background parts panic or stop making progress at their next fault point. Read once
//! from the environment; without the variable every fault point is a relaxed load and a branch.
//! An operator never sets it; tests of `tests/supervision.rs` do.

use std::sync::OnceLock;

/// What an injected fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Panic at the fault point.
    Panic,
    /// Stop at the fault point for good (a hung device, a deadlock).
    Stall,
}

/// Parses `part:panic` / `part:stall` pairs, comma-separated; unknown words are ignored.
///
/// ```
/// use kvtier_daemon::fault::{parse, Fault};
/// assert_eq!(parse("demoter:panic, ring:stall,x"), vec![("demoter".into(), Fault::Panic), ("ring".into(), Fault::Stall)]);
/// ```
pub fn parse(spec: &str) -> Vec<(String, Fault)> {
    (spec.split(','))
        .filter_map(|item| {
            let (part, what) = item.trim().split_once(':')?;
            let fault = match what.trim() {
                "panic" => Fault::Panic,
                "stall" => Fault::Stall,
                _ => return None,
            };
            Some((part.trim().to_string(), fault))
        })
        .collect()
}

fn faults() -> &'static [(String, Fault)] {
    static FAULTS: OnceLock<Vec<(String, Fault)>> = OnceLock::new();
    FAULTS.get_or_init(|| std::env::var("KVTIER_FAULT").map(|s| parse(&s)).unwrap_or_default())
}

/// The fault injected into `part` (matched by its name before any `-index`: `ring` matches
/// `ring-0`), if any.
pub fn injected(part: &str) -> Option<Fault> {
    let base = part.split('-').next().unwrap_or(part);
    faults().iter().find(|(p, _)| p == base || p == part).map(|(_, f)| *f)
}

/// A fault point in a thread: panics, or blocks forever, if a fault is injected into `part`.
pub fn point(part: &str) {
    match injected(part) {
        Some(Fault::Panic) => panic!("fault injected into {part} (KVTIER_FAULT)"),
        Some(Fault::Stall) => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        None => {}
    }
}

/// A fault point in an async task: panics, or never completes, if a fault is injected into `part`.
pub async fn point_async(part: &str) {
    match injected(part) {
        Some(Fault::Panic) => panic!("fault injected into {part} (KVTIER_FAULT)"),
        Some(Fault::Stall) => std::future::pending::<()>().await,
        None => {}
    }
}
