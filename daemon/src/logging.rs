//! The daemon's log: lines on stderr, filtered by `RUST_LOG` (default `info`), and a filter an
//! operator can change while the daemon runs (`kvtier log-filter`), e.g. to debug one module
//! during an incident without a restart.

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the process's logger (once; later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(filter);
    let lines =
        fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry().with(filter).with(lines).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the log filter with `directives` (`RUST_LOG` syntax, e.g. `info,kvtier_daemon::transfer=debug`);
/// an empty string changes nothing. Returns the filter before and after.
pub fn set_filter(directives: &str) -> Result<(String, String), String> {
    let handle = FILTER.get().ok_or("this process did not set up its logger with logging::init")?;
    let before = handle.with_current(|f| f.to_string()).map_err(|e| e.to_string())?;
    if directives.trim().is_empty() {
        return Ok((before.clone(), before));
    }
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("bad log filter {directives:?}: {e}"))?;
    let after = filter.to_string();
    handle.reload(filter).map_err(|e| e.to_string())?;
    tracing::warn!(before, after, "log filter changed");
    Ok((before, after))
}
