//! Several named pools from one configuration: [`PoolsConfig`] (the `[pools.NAME]` tables) and
//! [`Pools`], the started pools.

use std::collections::BTreeMap;

use futures::stream::{FuturesUnordered, StreamExt};

use super::PoolConfig;
use crate::{Error, Pool, PoolBuilder};

/// Several pools' settings by name: the `[pools.NAME]` tables of a file, each over the file's
/// top-level keys (see [`PoolsConfig::load`]); start them with [`Pools::from_config`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PoolsConfig {
    /// Each pool's settings, by name. A pool whose `name` is unset is named (in metrics and
    /// spans) after its entry here.
    pub pools: BTreeMap<String, PoolConfig>,
}

/// Named pools started together from a [`PoolsConfig`].
///
/// ```no_run
/// use snakepit::{config::PoolsConfig, Pools};
/// use serde_json::json;
/// # async fn demo() -> Result<(), snakepit::Error> {
/// let pools = Pools::from_config(&PoolsConfig::load("pools.toml")?).await?;
/// if let Some(gpu) = pools.get("gpu") {
///     gpu.execute("predict", json!({"x": 1})).await?;
/// }
/// pools.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Pools {
    pools: BTreeMap<String, Pool>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.pools.iter()).finish()
    }
}

impl Pools {
    /// Starts every pool concurrently and returns once all are ready. If one fails, the others
    /// are stopped (those still starting, killed) and the error, an [`Error::Config`] keyed
    /// `pools.NAME`, names the pool and holds the cause as its `source`; an invalid pool is
    /// reported before anything starts.
    pub async fn from_config(cfg: &PoolsConfig) -> Result<Pools, Error> {
        let mut builders = Vec::with_capacity(cfg.pools.len());
        for (name, c) in &cfg.pools {
            let b = PoolBuilder::from_config(c).map_err(|e| in_pool(name, e))?;
            let b = if c.name.is_none() { b.name(name) } else { b };
            builders.push((name.clone(), b));
        }
        let mut starting: FuturesUnordered<_> =
            builders.into_iter().map(|(name, b)| async move { (name, b.build().await) }).collect();
        let mut pools = BTreeMap::new();
        let mut failed = None;
        while let Some((name, r)) = starting.next().await {
            match r {
                Ok(p) => {
                    pools.insert(name, p);
                }
                Err(e) => {
                    failed = Some(Error::Config {
                        origin: None,
                        line: None,
                        key: format!("pools.{name}"),
                        reason: "the pool could not start".into(),
                        source: Some(Box::new(e)),
                    });
                    break;
                }
            }
        }
        // Dropping an unfinished start kills its workers.
        drop(starting);
        if let Some(e) = failed {
            futures::future::join_all(pools.values().map(Pool::shutdown)).await;
            return Err(e);
        }
        Ok(Pools { pools })
    }

    /// The pool named `name`.
    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// The pools' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.pools.keys().map(String::as_str)
    }

    /// Each pool with its name, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Pool)> + '_ {
        self.pools.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// How many pools there are.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// Stops every pool gracefully, concurrently (see [`Pool::shutdown`]).
    pub async fn shutdown(&self) {
        futures::future::join_all(self.pools.values().map(Pool::shutdown)).await;
    }
}

/// A pool's configuration error, its key under `pools.NAME`.
fn in_pool(name: &str, e: Error) -> Error {
    match e {
        Error::Config { origin, line, key, reason, source } => Error::Config {
            origin,
            line,
            key: if key.is_empty() { format!("pools.{name}") } else { format!("pools.{name}.{key}") },
            reason,
            source,
        },
        e => e,
    }
}
