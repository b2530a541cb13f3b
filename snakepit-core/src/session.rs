//! Sessions: per-client state that outlives a call, and the [`SessionStore`] trait that keeps it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{Error, WorkerId};

/// The declared type of a session variable; values are checked against it on every write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum VarType {
    /// Any JSON value.
    Any,
    /// `true` / `false`.
    Bool,
    /// An integer, optionally within `[min, max]`.
    Int {
        /// Smallest allowed value.
        #[serde(default)]
        min: Option<i64>,
        /// Largest allowed value.
        #[serde(default)]
        max: Option<i64>,
    },
    /// A number, optionally within `[min, max]`.
    Float {
        /// Smallest allowed value.
        #[serde(default)]
        min: Option<f64>,
        /// Largest allowed value.
        #[serde(default)]
        max: Option<f64>,
    },
    /// A string, optionally one of `choices`.
    String {
        /// The allowed values, if restricted.
        #[serde(default)]
        choices: Option<Vec<String>>,
    },
    /// A JSON array.
    List,
    /// A JSON object.
    Object,
}

impl VarType {
    /// Checks `value` against the type; the error says why it does not fit.
    pub fn check(&self, value: &serde_json::Value) -> Result<(), String> {
        use serde_json::Value as V;
        let bad = |what: &str| Err(format!("expected {what}, got {value}"));
        match (self, value) {
            (VarType::Any, _) => Ok(()),
            (VarType::Bool, V::Bool(_)) => Ok(()),
            (VarType::Int { min, max }, V::Number(n)) if n.is_i64() || n.is_u64() => {
                let Some(i) = n.as_i64() else { return bad("an integer that fits in i64") };
                match (min, max) {
                    (Some(lo), _) if i < *lo => Err(format!("{i} is below the minimum {lo}")),
                    (_, Some(hi)) if i > *hi => Err(format!("{i} is above the maximum {hi}")),
                    _ => Ok(()),
                }
            }
            (VarType::Float { min, max }, V::Number(n)) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                match (min, max) {
                    (Some(lo), _) if f < *lo => Err(format!("{f} is below the minimum {lo}")),
                    (_, Some(hi)) if f > *hi => Err(format!("{f} is above the maximum {hi}")),
                    _ => Ok(()),
                }
            }
            (VarType::String { choices }, V::String(s)) => match choices {
                Some(c) if !c.iter().any(|x| x == s) => Err(format!("{s:?} is not one of {c:?}")),
                _ => Ok(()),
            },
            (VarType::List, V::Array(_)) | (VarType::Object, V::Object(_)) => Ok(()),
            (VarType::Bool, _) => bad("a bool"),
            (VarType::Int { .. }, _) => bad("an integer"),
            (VarType::Float { .. }, _) => bad("a number"),
            (VarType::String { .. }, _) => bad("a string"),
            (VarType::List, _) => bad("a list"),
            (VarType::Object, _) => bad("an object"),
        }
    }
}

/// A typed session variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variable {
    /// Its value.
    pub value: serde_json::Value,
    /// Its declared type (checked on every write).
    pub ty: VarType,
}

/// A snapshot of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionRecord {
    /// The session id.
    pub id: String,
    /// Free-form metadata given at creation.
    pub metadata: serde_json::Value,
    /// Its variables.
    pub variables: BTreeMap<String, Variable>,
    /// The worker its last call ran on (affinity).
    pub worker: Option<WorkerId>,
    /// The front end (pool) that worker belongs to, when the store is shared by several
    /// (see [`SessionStore::front_end`]); `None` for a store of one pool.
    #[serde(default)]
    pub front: Option<String>,
    /// When it was created.
    pub created: SystemTime,
}

impl SessionRecord {
    /// A new, empty session.
    pub fn new(id: impl Into<String>, metadata: serde_json::Value) -> Self {
        SessionRecord {
            id: id.into(),
            metadata,
            variables: BTreeMap::new(),
            worker: None,
            front: None,
            created: SystemTime::now(),
        }
    }
}

/// Options of a session at creation (see [`SessionStore::create_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Its own time-to-live (refreshed on use), instead of the store's.
    pub ttl: Option<std::time::Duration>,
}

impl SessionOptions {
    /// Options with this session's own time-to-live.
    pub fn with_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// A session store's counters (the original Snakepit store's `get_stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStats {
    /// Sessions alive now.
    pub live: u64,
    /// Sessions created since the store started (a re-creation after expiry counts again).
    pub created: u64,
    /// Sessions that expired (found expired on access, or swept).
    pub expired: u64,
    /// Creations refused because the store was full.
    pub quota_refusals: u64,
}

/// A change to a session's metadata, applied atomically (see
/// [`SessionStore::update_metadata`]).
pub type MetadataUpdate<'a> = Box<dyn FnOnce(&mut serde_json::Value) + Send + 'a>;

/// Where sessions live. The default is the sharded in-memory store of `snakepit-session`; the
/// trait is async so that a distributed backend (Redis) fits behind it.
///
/// Every successful access refreshes the session's time-to-live.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Creates the session, or returns the existing one with that id (creation is idempotent
    /// and safe under concurrency). Fails with [`Error::SessionQuotaExceeded`] when full.
    async fn create(&self, id: &str, metadata: serde_json::Value) -> Result<SessionRecord, Error>;
    /// The session, if it exists and has not expired.
    async fn get(&self, id: &str) -> Result<Option<SessionRecord>, Error>;
    /// Sets a variable (declaring its type on first write unless `ty` is given).
    async fn set_var(
        &self,
        id: &str,
        name: &str,
        value: serde_json::Value,
        ty: Option<VarType>,
    ) -> Result<(), Error>;
    /// A variable's value.
    async fn get_var(&self, id: &str, name: &str) -> Result<Option<serde_json::Value>, Error>;
    /// Deletes a variable; returns whether it existed.
    async fn delete_var(&self, id: &str, name: &str) -> Result<bool, Error>;
    /// Records the worker a session's call ran on.
    async fn set_worker(&self, id: &str, worker: Option<WorkerId>) -> Result<(), Error>;
    /// The ids of the live sessions.
    async fn list(&self) -> Result<Vec<String>, Error>;
    /// Closes (deletes) a session; returns whether it existed.
    async fn close(&self, id: &str) -> Result<bool, Error>;

    /// Creates a session with options (its own TTL); like [`create`](Self::create) otherwise
    /// (an existing session is returned as it is, its options unchanged). The default: a
    /// store without per-session TTLs, which accepts only default options.
    async fn create_with(
        &self,
        id: &str,
        metadata: serde_json::Value,
        opts: SessionOptions,
    ) -> Result<SessionRecord, Error> {
        if opts.ttl.is_some() {
            return Err(Error::Unavailable("this session store has no per-session TTL".into()));
        }
        self.create(id, metadata).await
    }

    /// Applies `update` to a live session's metadata, atomically with respect to other updates
    /// of that session (read-modify-write), and returns the session.
    /// [`Error::SessionNotFound`] if it does not exist. The default: unsupported.
    async fn update_metadata(&self, id: &str, update: MetadataUpdate<'_>) -> Result<SessionRecord, Error> {
        let _ = (id, update);
        Err(Error::Unavailable("this session store cannot update metadata".into()))
    }

    /// The store's counters. The default: unsupported.
    async fn stats(&self) -> Result<SessionStats, Error> {
        Err(Error::Unavailable("this session store keeps no statistics".into()))
    }

    /// The name of this front end when several share the store (two `serve` processes on one
    /// Redis): a session's worker is recorded with it, and a pool trusts a session's worker
    /// only when it was recorded by its own front end (else the session has no worker here:
    /// `Hint` calls go anywhere, strict ones get `SessionLost` unless rehydrated). `None` (the
    /// default): one pool owns the store.
    fn front_end(&self) -> Option<&str> {
        None
    }

    /// A global variable (pool-wide, outside any session; Snakepit's global programs and
    /// values), if set. Globals never expire. The default: a store without globals, which
    /// fails with [`Error::Unavailable`].
    async fn get_global(&self, name: &str) -> Result<Option<serde_json::Value>, Error> {
        let _ = name;
        Err(Error::Unavailable("this session store keeps no global variables".into()))
    }

    /// Sets a global variable (see [`get_global`](Self::get_global)).
    async fn set_global(&self, name: &str, value: serde_json::Value) -> Result<(), Error> {
        let _ = (name, value);
        Err(Error::Unavailable("this session store keeps no global variables".into()))
    }

    /// Deletes a global variable; returns whether it existed.
    async fn delete_global(&self, name: &str) -> Result<bool, Error> {
        let _ = name;
        Err(Error::Unavailable("this session store keeps no global variables".into()))
    }
}
