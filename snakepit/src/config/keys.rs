//! Every key a pool's configuration knows, and how an environment variable's text becomes its
//! value: the loader checks `SNAKEPIT_CFG_*` variables against this list (an unknown one is
//! logged and ignored), and a test checks that `snakepit.example.toml` documents each key.

/// How a variable's text becomes a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Kept as text (names, paths, durations, enum names, a command line).
    Text,
    /// Parsed: an integer, a float, `true`/`false`, an array `[a, b]`, else text.
    Parsed,
    /// A table of text values under any sub-key, its case kept (`worker.env.OMP_NUM_THREADS`).
    TextTable,
    /// Any value at any depth below, sub-keys' case kept (`worker.config.model.name`).
    Tree,
}

/// The keys of one pool (dotted), with their kinds.
pub(crate) const KEYS: &[(&str, Kind)] = &[
    ("name", Kind::Text),
    ("instance", Kind::Text),
    ("size", Kind::Parsed),
    ("max_queue", Kind::Parsed),
    ("queue_timeout", Kind::Text),
    ("default_timeout", Kind::Text),
    ("max_call_time", Kind::Text),
    ("startup_concurrency", Kind::Parsed),
    ("shutdown_grace", Kind::Text),
    ("drain_timeout", Kind::Text),
    ("cancel_grace", Kind::Text),
    ("drop_policy", Kind::Text),
    ("stream_window", Kind::Parsed),
    ("busy_poll", Kind::Text),
    ("pipeline_depth", Kind::Parsed),
    ("shm_threshold", Kind::Parsed),
    ("shm_max", Kind::Parsed),
    ("quarantine", Kind::Parsed),
    ("run_dir", Kind::Text),
    ("run_registry", Kind::Parsed),
    ("transport", Kind::Text),
    ("worker.script", Kind::Text),
    ("worker.module", Kind::Text),
    ("worker.command", Kind::Text),
    ("worker.args", Kind::Parsed),
    ("worker.interpreter", Kind::Text),
    ("worker.protocol", Kind::Text),
    ("worker.tools", Kind::Parsed),
    ("worker.env", Kind::TextTable),
    ("worker.env_clear", Kind::Parsed),
    ("worker.env_allow", Kind::Parsed),
    ("worker.cwd", Kind::Text),
    ("worker.config", Kind::Tree),
    ("worker.profile", Kind::Text),
    ("worker.threads", Kind::Parsed),
    ("worker.zygote", Kind::Parsed),
    ("worker.handshake_timeout", Kind::Text),
    ("worker.timeouts", Kind::TextTable),
    ("worker.adapter_class", Kind::Text),
    ("worker.node_path", Kind::Parsed),
    ("heartbeat.enabled", Kind::Parsed),
    ("heartbeat.interval", Kind::Text),
    ("heartbeat.timeout", Kind::Text),
    ("heartbeat.max_missed", Kind::Parsed),
    ("heartbeat.busy", Kind::Parsed),
    ("recycle.max_requests", Kind::Parsed),
    ("recycle.max_age", Kind::Text),
    ("recycle.max_memory", Kind::Parsed),
    ("recycle.memory_check", Kind::Text),
    ("recycle.jitter", Kind::Parsed),
    ("restart.backoff_min", Kind::Text),
    ("restart.backoff_max", Kind::Text),
    ("restart.max_restarts", Kind::Parsed),
    ("restart.window", Kind::Text),
    ("sessions.ttl", Kind::Text),
    ("sessions.max", Kind::Parsed),
    ("sessions.affinity", Kind::Text),
    ("sessions.create_on_use", Kind::Parsed),
    ("sessions.store", Kind::Text),
    ("autoscale.enabled", Kind::Parsed),
    ("autoscale.min", Kind::Parsed),
    ("autoscale.max", Kind::Parsed),
    ("autoscale.interval", Kind::Text),
    ("autoscale.up_after", Kind::Parsed),
    ("autoscale.down_after", Kind::Parsed),
    ("autoscale.idle_below", Kind::Parsed),
    ("autoscale.step", Kind::Parsed),
    ("remote.agents", Kind::Parsed),
    ("remote.tls_ca", Kind::Text),
    ("remote.tls_cert", Kind::Text),
    ("remote.tls_key", Kind::Text),
    ("remote.insecure_plaintext", Kind::Parsed),
    ("remote.keepalive_interval", Kind::Text),
    ("remote.keepalive_timeout", Kind::Text),
    ("remote.connect_timeout", Kind::Text),
    ("remote.resolve_every", Kind::Text),
];

/// The key a variable's lower-cased parts name, its kind, and how many parts it takes (the
/// rest, if any, are sub-keys of a table or tree); `None` for no key.
pub(crate) fn lookup(parts: &[String]) -> Option<(Kind, usize)> {
    KEYS.iter().find_map(|(key, kind)| {
        let n = key.split('.').count();
        let named = parts.len() >= n && key.split('.').zip(parts).all(|(a, b)| a == b);
        let fits = match kind {
            Kind::Text | Kind::Parsed => parts.len() == n,
            Kind::TextTable => parts.len() == n + 1,
            Kind::Tree => parts.len() >= n,
        };
        (named && fits).then_some((*kind, n))
    })
}
