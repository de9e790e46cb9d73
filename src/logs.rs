//! Logging for both binaries: to stderr, one JSON object per line when stderr is not a
//! terminal or `SHARDLAKE_LOG_FORMAT=json`, compact text otherwise; `RUST_LOG` sets the level.

/// Without `RUST_LOG`: info, but delta-rs's kernel and operations only warn (at info they
/// log every snapshot they build, with the whole log listing; and the snapshot builder logs
/// an error for a table that does not exist yet, which delta-rs returns as `NotATable` and
/// shardlake handles).
const DEFAULT: &str =
    "info,buoyant_kernel=warn,buoyant_kernel::snapshot::builder=off,deltalake_core=warn";

pub fn init() {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT.into());
    let json = match std::env::var("SHARDLAKE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.compact().init();
    }
}
