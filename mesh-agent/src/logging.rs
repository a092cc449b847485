//! The agent's own logs (`tracing`, to stderr; `MESH_LOG_FORMAT=json` for
//! JSON lines), with a filter that can change at run time: `RUST_LOG` at
//! start (default `info`), then `POST /logging?level=SPEC` on the admin
//! port or `mesh-agent log-level SPEC` (SPEC: `debug`,
//! `info,mesh_agent::proxy=debug`, ... as `RUST_LOG`). An invalid SPEC is
//! refused with the parser's reason and the current filter stays.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the global subscriber (once; later calls do nothing).
pub fn init() {
    let spec = std::env::var("RUST_LOG").ok().filter(|s| EnvFilter::try_new(s).is_ok()).unwrap_or_else(|| "info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&spec));
    let json = std::env::var("MESH_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colours only for a person at a terminal, never in files or a pod's log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json { registry.with(fmt.json()).try_init() } else { registry.with(fmt).try_init() };
    if installed.is_ok() {
        let _ = CONTROL.set(Control { handle, current: Mutex::new(spec) });
    }
}

/// The filter in force.
pub fn level() -> Option<String> {
    CONTROL.get().map(|c| c.current.lock().expect("poisoned").clone())
}

/// Replaces the filter; `Err` (and no change) when `spec` does not parse.
pub fn set_level(spec: &str) -> Result<(), String> {
    let control = CONTROL.get().ok_or("logging is not initialized")?;
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("invalid log filter {spec:?}: {e}"))?;
    control.handle.reload(filter).map_err(|e| e.to_string())?;
    *control.current.lock().expect("poisoned") = spec.to_owned();
    tracing::info!(filter = spec, "log filter changed");
    Ok(())
}
