//! # snakepit-session
//!
//! [`MemoryStore`]: the default [`SessionStore`]. Sessions live in a sharded concurrent map
//! (`dashmap`), so readers of different sessions never contend; each session has a time-to-live
//! refreshed on every access; a quota bounds how many exist; expiry is amortised — an expired
//! session is dropped when it is next touched, and a background sweeper (holding only a weak
//! reference) clears the rest shard by shard, never blocking readers of other shards.
//! Concurrent creation of one id is safe: exactly one record is created and everyone gets it.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use snakepit_core::{
    Error, MetadataUpdate, SessionOptions, SessionRecord, SessionStats, SessionStore, VarType, Variable,
    WorkerId,
};
use tokio::time::Instant;

#[derive(Debug)]
struct Entry {
    record: SessionRecord,
    expires: Instant,
    /// Its time-to-live (the store's, or its own from `create_with`).
    ttl: Duration,
}

#[derive(Debug)]
struct Shared {
    map: DashMap<String, Entry>,
    ttl: Duration,
    max: usize,
    count: AtomicUsize,
    /// Global variables: pool-wide, never expiring.
    globals: DashMap<String, serde_json::Value>,
    created: AtomicU64,
    expired: AtomicU64,
    quota_refusals: AtomicU64,
}

/// The sharded in-memory session store. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(Duration::from_secs(3600), 100_000)
    }
}

impl MemoryStore {
    /// A store whose sessions expire `ttl` after their last use, holding at most `max_sessions`.
    pub fn new(ttl: Duration, max_sessions: usize) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                map: DashMap::new(),
                ttl,
                max: max_sessions,
                count: AtomicUsize::new(0),
                globals: DashMap::new(),
                created: AtomicU64::new(0),
                expired: AtomicU64::new(0),
                quota_refusals: AtomicU64::new(0),
            }),
        }
    }

    /// Starts the background sweeper on the current runtime: every `every`, expired sessions
    /// are removed. It stops by itself when the store is dropped.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                let n = sweep(&shared);
                if n > 0 {
                    tracing::debug!(expired = n, "session sweeper");
                }
            }
        })
    }

    /// Removes every expired session now; returns how many.
    pub fn sweep(&self) -> usize {
        sweep(&self.shared)
    }

    /// How many sessions exist (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shared.count.load(Ordering::Acquire)
    }

    /// Whether the store holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on a live session, refreshing its TTL; `None` if missing or expired.
    fn with_live<R>(&self, id: &str, f: impl FnOnce(&mut SessionRecord) -> R) -> Option<R> {
        let now = Instant::now();
        let s = &self.shared;
        {
            let mut e = s.map.get_mut(id)?;
            if e.expires > now {
                e.expires = now + e.ttl;
                return Some(f(&mut e.record));
            }
        }
        // Expired: drop it (only if still expired: a concurrent create may have renewed it).
        if s.map.remove_if(id, |_, e| e.expires <= now).is_some() {
            s.count.fetch_sub(1, Ordering::AcqRel);
            s.expired.fetch_add(1, Ordering::Relaxed);
        }
        None
    }
}

fn sweep(s: &Shared) -> usize {
    let now = Instant::now();
    let mut removed = 0;
    s.map.retain(|_, e| {
        let keep = e.expires > now;
        if !keep {
            removed += 1;
        }
        keep
    });
    s.count.fetch_sub(removed, Ordering::AcqRel);
    s.expired.fetch_add(removed as u64, Ordering::Relaxed);
    removed
}

pub(crate) fn not_found(id: &str) -> Error {
    Error::SessionNotFound { id: id.to_owned() }
}

/// The variable a write makes: its type (the one given, else the variable's declared one, else
/// `Any`) checked against the value.
pub(crate) fn typed_var(
    existing: Option<&Variable>,
    name: &str,
    value: serde_json::Value,
    ty: Option<VarType>,
) -> Result<Variable, Error> {
    let ty = match (ty, existing) {
        (Some(t), _) => t,
        (None, Some(v)) => v.ty.clone(),
        (None, None) => VarType::Any,
    };
    ty.check(&value).map_err(|reason| Error::InvalidVariable { name: name.to_owned(), reason })?;
    Ok(Variable { value, ty })
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create(&self, id: &str, metadata: serde_json::Value) -> Result<SessionRecord, Error> {
        self.create_with(id, metadata, SessionOptions::default()).await
    }

    async fn create_with(
        &self,
        id: &str,
        metadata: serde_json::Value,
        opts: SessionOptions,
    ) -> Result<SessionRecord, Error> {
        let s = &self.shared;
        let ttl = opts.ttl.unwrap_or(s.ttl);
        let mut swept = false;
        loop {
            let now = Instant::now();
            match s.map.entry(id.to_owned()) {
                MapEntry::Occupied(mut o) => {
                    let e = o.get_mut();
                    if e.expires <= now {
                        // An expired session with this id: start afresh (the count is unchanged).
                        e.record = SessionRecord::new(id, metadata);
                        e.ttl = ttl;
                        s.expired.fetch_add(1, Ordering::Relaxed);
                        s.created.fetch_add(1, Ordering::Relaxed);
                    }
                    e.expires = now + e.ttl;
                    return Ok(e.record.clone());
                }
                MapEntry::Vacant(v) => {
                    if s.count.fetch_add(1, Ordering::AcqRel) >= s.max {
                        s.count.fetch_sub(1, Ordering::AcqRel);
                        drop(v);
                        // The quota counts live sessions: sweep expired ones once, then retry.
                        if !swept {
                            swept = true;
                            sweep(s);
                            continue;
                        }
                        s.quota_refusals.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::SessionQuotaExceeded { max: s.max });
                    }
                    let record = SessionRecord::new(id, metadata);
                    v.insert(Entry { record: record.clone(), expires: now + ttl, ttl });
                    s.created.fetch_add(1, Ordering::Relaxed);
                    return Ok(record);
                }
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Option<SessionRecord>, Error> {
        Ok(self.with_live(id, |r| r.clone()))
    }

    async fn set_var(
        &self,
        id: &str,
        name: &str,
        value: serde_json::Value,
        ty: Option<VarType>,
    ) -> Result<(), Error> {
        self.with_live(id, |r| {
            let var = typed_var(r.variables.get(name), name, value, ty)?;
            r.variables.insert(name.to_owned(), var);
            Ok(())
        })
        .unwrap_or_else(|| Err(not_found(id)))
    }

    async fn get_var(&self, id: &str, name: &str) -> Result<Option<serde_json::Value>, Error> {
        self.with_live(id, |r| r.variables.get(name).map(|v| v.value.clone())).ok_or_else(|| not_found(id))
    }

    async fn delete_var(&self, id: &str, name: &str) -> Result<bool, Error> {
        self.with_live(id, |r| r.variables.remove(name).is_some()).ok_or_else(|| not_found(id))
    }

    async fn set_worker(&self, id: &str, worker: Option<WorkerId>) -> Result<(), Error> {
        self.with_live(id, |r| r.worker = worker).ok_or_else(|| not_found(id))
    }

    async fn list(&self) -> Result<Vec<String>, Error> {
        let now = Instant::now();
        let mut ids: Vec<String> =
            self.shared.map.iter().filter(|e| e.value().expires > now).map(|e| e.key().clone()).collect();
        ids.sort();
        Ok(ids)
    }

    async fn close(&self, id: &str) -> Result<bool, Error> {
        let removed = self.shared.map.remove(id);
        if removed.is_some() {
            self.shared.count.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(removed.is_some_and(|(_, e)| e.expires > Instant::now()))
    }

    async fn update_metadata(&self, id: &str, update: MetadataUpdate<'_>) -> Result<SessionRecord, Error> {
        // The map's shard lock is held while `update` runs: updates of one session serialise.
        self.with_live(id, |r| {
            update(&mut r.metadata);
            r.clone()
        })
        .ok_or_else(|| not_found(id))
    }

    async fn stats(&self) -> Result<SessionStats, Error> {
        let s = &self.shared;
        let now = Instant::now();
        let live = s.map.iter().filter(|e| e.value().expires > now).count() as u64;
        let mut stats = SessionStats::default();
        stats.live = live;
        stats.created = s.created.load(Ordering::Relaxed);
        stats.expired = s.expired.load(Ordering::Relaxed);
        stats.quota_refusals = s.quota_refusals.load(Ordering::Relaxed);
        Ok(stats)
    }

    async fn get_global(&self, name: &str) -> Result<Option<serde_json::Value>, Error> {
        Ok(self.shared.globals.get(name).map(|v| v.value().clone()))
    }

    async fn set_global(&self, name: &str, value: serde_json::Value) -> Result<(), Error> {
        self.shared.globals.insert(name.to_owned(), value);
        Ok(())
    }

    async fn delete_global(&self, name: &str) -> Result<bool, Error> {
        Ok(self.shared.globals.remove(name).is_some())
    }
}

#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;

#[cfg(test)]
mod tests;
