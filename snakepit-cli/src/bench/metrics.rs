//! The metrics rows: the same pools with a Prometheus recorder installed, beside the rows
//! without one (the other pools were built before it, so their handles record nothing).

use super::*;

/// Installs the Prometheus exporter (on a free loopback port, as `serve --metrics-addr` does)
/// and starts a pool of one worker and one of `nw`, or `None` (with a message).
pub(super) async fn pools(python: &str, nw: usize) -> Option<(Arc<Pool>, Arc<Pool>)> {
    if let Err(e) = snakepit::metrics::install_prometheus(([127, 0, 0, 1], 0).into()) {
        eprintln!("bench: no metrics rows: {e}");
        return None;
    }
    let build = |n: usize| {
        Pool::builder()
            .run_registry(false)
            .heartbeat(None)
            .adapter(Python::showcase().interpreter(python))
            .name(format!("bench-{n}"))
            .size(n)
            .build()
    };
    match futures::future::try_join(build(1), build(nw)).await {
        Ok((one, many)) => Some((Arc::new(one), Arc::new(many))),
        Err(e) => {
            eprintln!("bench: no metrics rows: {e}");
            None
        }
    }
}
