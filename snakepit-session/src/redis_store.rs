//! [`RedisStore`] (feature `redis`): sessions in Redis, shared by several front ends (pools in
//! several processes or on several machines).
//!
//! Layout, under a key prefix (default `snakepit:`):
//!
//! * `{prefix}s:{id}`: a hash per session: `meta` (JSON), `created` (ms), `ttl` (ms), `worker`
//!   (`slot:generation`) and `front` (the front end that recorded it), and one `v:{name}` field
//!   per variable (its value and declared type, JSON). The key expires `ttl` after its last use
//!   (Redis expiry, refreshed by every access).
//! * `{prefix}live`: a sorted set of the live session ids scored by their expiry time: the
//!   quota counts it, atomically with the creation (a Lua script), and `list` reads it.
//! * `{prefix}globals`: a hash of the global variables; `{prefix}stats`: the store's counters.
//!
//! Times are the Redis server's (`TIME`), so front ends with skewed clocks agree on expiry.
//!
//! **Consistency.** Each operation is atomic on its own (a script or a single command). A
//! variable is last-writer-wins: two front ends writing one variable at once leave one of the
//! two values, and a type declared by one is checked on the other's later writes, not on a
//! write racing it. Metadata updates are compare-and-set: one that loses to a concurrent
//! change writes nothing and fails with `session_store` (retry it), so none is lost silently. A session's worker is recorded with its front end: another front end sees the
//! session as having no worker of its own (`Hint` calls go anywhere; strict ones get
//! `SessionLost` unless rehydrated).
//!
//! **Failures.** Every operation has a deadline (default 1 s): Redis down, slow or refusing
//! gives [`Error::SessionStore`] within it, never a hang. A connection that fails is
//! re-established on its own (`ConnectionManager`), and one that stops answering is replaced
//! after two unanswered operations in a row, so the store works again as soon as Redis answers.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use crate::not_found;
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use snakepit_core::{
    Error, MetadataUpdate, SessionOptions, SessionRecord, SessionStats, SessionStore, VarType, Variable,
    WorkerId,
};

/// Creates a session within the quota, or refreshes and returns an existing one.
/// KEYS: session, live, stats. ARGV: id, metadata JSON, ttl ms, max sessions.
const CREATE: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gone = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if gone > 0 then redis.call('HINCRBY', KEYS[3], 'expired', gone) end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl')) or tonumber(ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
  return redis.call('HGETALL', KEYS[1])
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  redis.call('HINCRBY', KEYS[3], 'quota_refusals', 1)
  return false
end
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'created', now, 'ttl', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HINCRBY', KEYS[3], 'created', 1)
return redis.call('HGETALL', KEYS[1])
"#;

/// Refreshes a live session's expiry and returns its fields (`false` if it is gone).
/// KEYS: session, live, stats. ARGV: id.
const TOUCH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[3], 'expired', 1) end
  return false
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl')) or 3600000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
return redis.call('HGETALL', KEYS[1])
"#;

/// Sets fields of a live session (1), or nothing if it is gone (0).
/// KEYS: session. ARGV: field, value, field, value...
const SET_FIELD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"#;

/// Compare-and-set of a live session's metadata: 1 done, 0 changed meanwhile, -1 gone.
/// KEYS: session. ARGV: old JSON, new JSON.
const CAS_META: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'meta') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[2])
return 1
"#;

/// Drops the expired ids (counting them), then returns the live ones (ARGV[1] = "ids") or
/// their number. KEYS: live, stats.
const LIVE: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gone = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if gone > 0 then redis.call('HINCRBY', KEYS[2], 'expired', gone) end
if ARGV[1] == 'ids' then return redis.call('ZRANGE', KEYS[1], 0, -1) end
return redis.call('ZCARD', KEYS[1])
"#;

/// The longest session TTL (ten years): a longer one would overflow Redis's milliseconds.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Sessions in Redis, shared by front ends. Cheap to clone (one multiplexed connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: std::sync::Arc<std::sync::RwLock<ConnectionManager>>,
    client: redis::Client,
    /// Operations in a row that got no answer; two start a new connection (a Redis that hangs
    /// or a network that drops packets never closes the old one).
    silent: std::sync::Arc<std::sync::atomic::AtomicU32>,
    reconnecting: std::sync::Arc<std::sync::atomic::AtomicBool>,
    prefix: String,
    ttl: Duration,
    max: usize,
    timeout: Duration,
    front: String,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    create: Script,
    touch: Script,
    set_field: Script,
    cas_meta: Script,
    live: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("front", &self.front)
            .field("ttl", &self.ttl)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

fn store_error(message: impl Into<String>, e: Option<redis::RedisError>) -> Error {
    Error::SessionStore {
        message: message.into(),
        source: e.map(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://HOST:PORT/DB` or `redis+unix:///path/redis.sock`; TLS is not
    /// built in). Defaults: sessions live 1 h after their last use, at most 100 000, each
    /// operation within 1 s, keys under `snakepit:`, and a front-end name unique to this store
    /// (`PoolBuilder::session_store_url` names it after the pool's run). Fails with
    /// [`Error::SessionStore`] if Redis does not answer within 1 s.
    pub async fn connect(url: &str) -> Result<RedisStore, Error> {
        let timeout = Duration::from_secs(1);
        let client =
            redis::Client::open(url).map_err(|e| store_error(format!("{url}: not a Redis URL"), Some(e)))?;
        let conn = manager(&client, timeout)
            .await
            .map_err(|e| store_error(format!("{url}: cannot connect ({})", e.0), e.1))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(RedisStore {
            conn: std::sync::Arc::new(std::sync::RwLock::new(conn)),
            client,
            silent: std::sync::Arc::default(),
            reconnecting: std::sync::Arc::default(),
            prefix: "snakepit:".into(),
            ttl: Duration::from_secs(3600),
            max: 100_000,
            timeout,
            front: format!("{}:{}:{nanos:x}:{seq}", host.trim(), std::process::id()),
            scripts: std::sync::Arc::new(Scripts {
                create: Script::new(CREATE),
                touch: Script::new(TOUCH),
                set_field: Script::new(SET_FIELD),
                cas_meta: Script::new(CAS_META),
                live: Script::new(LIVE),
            }),
        })
    }

    /// Sessions expire this long after their last use (default 1 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Most live sessions, across every front end (default 100 000).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max = n;
        self
    }

    /// Each operation's deadline (default 1 s).
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The prefix of every key (default `snakepit:`): stores with different prefixes share a
    /// Redis without seeing each other's sessions.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// This front end's name (default: unique to this store): a session's worker is recorded
    /// with it (see [`SessionStore::front_end`]). Two stores given one name trust each other's
    /// worker records: give each front end its own.
    pub fn front_end_name(mut self, name: impl Into<String>) -> Self {
        self.front = name.into();
        self
    }

    fn key(&self, id: &str) -> String {
        format!("{}s:{id}", self.prefix)
    }

    fn live_key(&self) -> String {
        format!("{}live", self.prefix)
    }

    fn stats_key(&self) -> String {
        format!("{}stats", self.prefix)
    }

    fn globals_key(&self) -> String {
        format!("{}globals", self.prefix)
    }

    /// The connection now (a new one replaces it after operations go unanswered).
    fn connection(&self) -> ConnectionManager {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs one operation within the deadline. Two unanswered ones in a row start a new
    /// connection in the background: the old one may never fail on its own.
    async fn op<T, F>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        use std::sync::atomic::Ordering;
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => {
                self.silent.store(0, Ordering::Relaxed);
                r.map_err(|e| store_error(format!("{what} failed"), Some(e)))
            }
            Err(_) => {
                if self.silent.fetch_add(1, Ordering::Relaxed) + 1 >= 2
                    && !self.reconnecting.swap(true, Ordering::AcqRel)
                {
                    let (client, conn, flag, silent) = (
                        self.client.clone(),
                        self.conn.clone(),
                        self.reconnecting.clone(),
                        self.silent.clone(),
                    );
                    let timeout = self.timeout;
                    tokio::spawn(async move {
                        if let Ok(fresh) = manager(&client, timeout).await {
                            *conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                            silent.store(0, Ordering::Relaxed);
                            tracing::info!("session store: reconnected to Redis");
                        }
                        flag.store(false, Ordering::Release);
                    });
                }
                Err(store_error(format!("{what}: no answer from Redis within {:?}", self.timeout), None))
            }
        }
    }

    /// The session's fields, its expiry refreshed; `None` if it is gone.
    async fn touch(&self, id: &str) -> Result<Option<SessionRecord>, Error> {
        Ok(self.touch_raw(id).await?.map(|(rec, _)| rec))
    }

    /// [`touch`](Self::touch), with the metadata as stored (for compare-and-set).
    async fn touch_raw(&self, id: &str) -> Result<Option<(SessionRecord, String)>, Error> {
        let mut conn = self.connection();
        let mut inv = self.scripts.touch.key(self.key(id));
        inv.key(self.live_key()).key(self.stats_key()).arg(id);
        let fields: Option<Vec<String>> = self.op("reading a session", inv.invoke_async(&mut conn)).await?;
        fields.map(|f| record(id, f)).transpose()
    }

    /// Sets `fields` (name, value pairs) of a live session in one round trip.
    async fn set_fields(&self, id: &str, fields: &[(&str, String)]) -> Result<(), Error> {
        let mut conn = self.connection();
        let mut inv = self.scripts.set_field.key(self.key(id));
        for (name, value) in fields {
            inv.arg(*name).arg(value);
        }
        let done: i64 = self.op("writing a session", inv.invoke_async(&mut conn)).await?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::SessionNotFound { id: id.to_owned() })
        }
    }
}

/// Opens a multiplexed connection within `timeout` (reconnecting on its own after a reset).
async fn manager(
    client: &redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager, (String, Option<redis::RedisError>)> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_number_of_retries(2)
        .set_max_delay(500);
    match tokio::time::timeout(timeout, ConnectionManager::new_with_config(client.clone(), config)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(("refused".into(), Some(e))),
        Err(_) => Err((format!("no answer within {timeout:?}"), None)),
    }
}

/// A session's hash fields (name, value, name, value...) as a record, and its metadata as
/// stored.
fn record(id: &str, fields: Vec<String>) -> Result<(SessionRecord, String), Error> {
    let corrupt = |what: &str| store_error(format!("session {id}: unreadable {what} in Redis"), None);
    let mut rec = SessionRecord::new(id, serde_json::Value::Null);
    let mut raw_meta = String::from("null");
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match k.as_str() {
            "meta" => {
                rec.metadata = serde_json::from_str(&v).map_err(|_| corrupt("metadata"))?;
                raw_meta = v;
            }
            "created" => {
                let ms: u64 = v.parse().map_err(|_| corrupt("creation time"))?;
                rec.created = UNIX_EPOCH + Duration::from_millis(ms);
            }
            "worker" => {
                let (slot, generation) = v.split_once(':').ok_or_else(|| corrupt("worker"))?;
                rec.worker = Some(WorkerId {
                    slot: slot.parse().map_err(|_| corrupt("worker"))?,
                    generation: generation.parse().map_err(|_| corrupt("worker"))?,
                });
            }
            "front" => rec.front = Some(v),
            name => {
                if let Some(var) = name.strip_prefix("v:") {
                    let parsed: Variable = serde_json::from_str(&v).map_err(|_| corrupt("variable"))?;
                    rec.variables.insert(var.to_owned(), parsed);
                }
            }
        }
    }
    Ok((rec, raw_meta))
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn create(&self, id: &str, metadata: serde_json::Value) -> Result<SessionRecord, Error> {
        self.create_with(id, metadata, SessionOptions::default()).await
    }

    async fn create_with(
        &self,
        id: &str,
        metadata: serde_json::Value,
        opts: SessionOptions,
    ) -> Result<SessionRecord, Error> {
        let ttl = opts.ttl.unwrap_or(self.ttl).min(MAX_TTL).as_millis().max(1) as u64;
        let mut conn = self.connection();
        let mut inv = self.scripts.create.key(self.key(id));
        inv.key(self.live_key())
            .key(self.stats_key())
            .arg(id)
            .arg(metadata.to_string())
            .arg(ttl)
            .arg(self.max);
        let fields: Option<Vec<String>> = self.op("creating a session", inv.invoke_async(&mut conn)).await?;
        match fields {
            Some(f) => record(id, f).map(|(rec, _)| rec),
            None => Err(Error::SessionQuotaExceeded { max: self.max }),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<SessionRecord>, Error> {
        self.touch(id).await
    }

    async fn set_var(
        &self,
        id: &str,
        name: &str,
        value: serde_json::Value,
        ty: Option<VarType>,
    ) -> Result<(), Error> {
        let rec = self.touch(id).await?.ok_or_else(|| not_found(id))?;
        let var = crate::typed_var(rec.variables.get(name), name, value, ty)?;
        let var =
            serde_json::to_string(&var).map_err(|e| store_error(format!("variable {name}: {e}"), None))?;
        self.set_fields(id, &[(&format!("v:{name}"), var)]).await
    }

    async fn get_var(&self, id: &str, name: &str) -> Result<Option<serde_json::Value>, Error> {
        let rec = self.touch(id).await?.ok_or_else(|| not_found(id))?;
        Ok(rec.variables.get(name).map(|v| v.value.clone()))
    }

    async fn delete_var(&self, id: &str, name: &str) -> Result<bool, Error> {
        let rec = self.touch(id).await?.ok_or_else(|| not_found(id))?;
        if !rec.variables.contains_key(name) {
            return Ok(false);
        }
        let mut conn = self.connection();
        let n: i64 = self.op("deleting a variable", conn.hdel(self.key(id), format!("v:{name}"))).await?;
        Ok(n > 0)
    }

    async fn set_worker(&self, id: &str, worker: Option<WorkerId>) -> Result<(), Error> {
        match worker {
            Some(w) => {
                let worker = format!("{}:{}", w.slot, w.generation);
                self.set_fields(id, &[("front", self.front.clone()), ("worker", worker)]).await
            }
            None => {
                let mut conn = self.connection();
                let _: i64 =
                    self.op("forgetting a worker", conn.hdel(self.key(id), &["worker", "front"])).await?;
                Ok(())
            }
        }
    }

    async fn list(&self) -> Result<Vec<String>, Error> {
        let mut conn = self.connection();
        let mut inv = self.scripts.live.key(self.live_key());
        inv.key(self.stats_key()).arg("ids");
        let mut ids: Vec<String> = self.op("listing sessions", inv.invoke_async(&mut conn)).await?;
        ids.sort();
        Ok(ids)
    }

    async fn close(&self, id: &str) -> Result<bool, Error> {
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        pipe.atomic().del(self.key(id)).zrem(self.live_key(), id);
        let (deleted, _): (i64, i64) = self.op("closing a session", pipe.query_async(&mut conn)).await?;
        Ok(deleted > 0)
    }

    async fn update_metadata(&self, id: &str, update: MetadataUpdate<'_>) -> Result<SessionRecord, Error> {
        // Compare-and-set: the update runs once, on the metadata read; if another front end
        // changed it in between, nothing is written and the error says so (no update is lost
        // silently; the caller may retry).
        let (rec, old) = self.touch_raw(id).await?.ok_or_else(|| not_found(id))?;
        let mut meta = rec.metadata.clone();
        update(&mut meta);
        let new = meta.to_string();
        let mut conn = self.connection();
        let mut inv = self.scripts.cas_meta.key(self.key(id));
        inv.arg(&old).arg(&new);
        let r: i64 = self.op("updating metadata", inv.invoke_async(&mut conn)).await?;
        match r {
            1 => {
                let mut rec = rec;
                rec.metadata = meta;
                Ok(rec)
            }
            -1 => Err(not_found(id)),
            _ => Err(store_error(
                format!("session {id}: its metadata changed concurrently; the update was not applied"),
                None,
            )),
        }
    }

    async fn stats(&self) -> Result<SessionStats, Error> {
        let mut conn = self.connection();
        let mut inv = self.scripts.live.key(self.live_key());
        inv.key(self.stats_key()).arg("count");
        let live: u64 = self.op("counting sessions", inv.invoke_async(&mut conn)).await?;
        let counters: BTreeMap<String, u64> =
            self.op("reading stats", conn.hgetall(self.stats_key())).await?;
        let mut s = SessionStats::default();
        s.live = live;
        s.created = counters.get("created").copied().unwrap_or(0);
        s.expired = counters.get("expired").copied().unwrap_or(0);
        s.quota_refusals = counters.get("quota_refusals").copied().unwrap_or(0);
        Ok(s)
    }

    fn front_end(&self) -> Option<&str> {
        Some(&self.front)
    }

    async fn get_global(&self, name: &str) -> Result<Option<serde_json::Value>, Error> {
        let mut conn = self.connection();
        let v: Option<String> = self.op("reading a global", conn.hget(self.globals_key(), name)).await?;
        v.map(|v| {
            serde_json::from_str(&v).map_err(|_| store_error(format!("global {name}: unreadable"), None))
        })
        .transpose()
    }

    async fn set_global(&self, name: &str, value: serde_json::Value) -> Result<(), Error> {
        let mut conn = self.connection();
        let _: i64 =
            self.op("writing a global", conn.hset(self.globals_key(), name, value.to_string())).await?;
        Ok(())
    }

    async fn delete_global(&self, name: &str) -> Result<bool, Error> {
        let mut conn = self.connection();
        let n: i64 = self.op("deleting a global", conn.hdel(self.globals_key(), name)).await?;
        Ok(n > 0)
    }
}
