//! Session handles: per-client state kept by the host, and calls routed by affinity.

use serde_json::Value;
use snakepit_core::{Error, Payload, SessionRecord, VarType};

use crate::{CallOptions, Pool};

/// A handle on one session of a [`Pool`]. Sessions are kept by the pool's session store; the
/// handle only names one (and holds a clone of the pool: it is `Clone + Send + Sync + 'static`,
/// so it can be kept in a service's state or moved into a task). Every use refreshes the
/// session's time-to-live.
#[derive(Debug, Clone)]
pub struct Session {
    pool: Pool,
    id: String,
}

impl Session {
    pub(crate) fn new(pool: &Pool, id: String) -> Self {
        Session { pool: pool.clone(), id }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn missing(&self) -> Error {
        Error::SessionNotFound { id: self.id.clone() }
    }

    /// A snapshot of the session (metadata, variables, pinned worker).
    pub async fn record(&self) -> Result<SessionRecord, Error> {
        self.pool.session_store().get(&self.id).await?.ok_or_else(|| self.missing())
    }

    /// A variable's value.
    pub async fn get(&self, name: &str) -> Result<Option<Value>, Error> {
        self.pool.session_store().get_var(&self.id, name).await
    }

    /// Sets a variable (its type, if declared before, is checked).
    pub async fn set(&self, name: &str, value: Value) -> Result<(), Error> {
        self.pool.session_store().set_var(&self.id, name, value, None).await
    }

    /// Sets a variable and declares its type; this and later writes must fit it.
    pub async fn set_typed(&self, name: &str, value: Value, ty: VarType) -> Result<(), Error> {
        self.pool.session_store().set_var(&self.id, name, value, Some(ty)).await
    }

    /// Deletes a variable; returns whether it existed.
    pub async fn delete(&self, name: &str) -> Result<bool, Error> {
        self.pool.session_store().delete_var(&self.id, name).await
    }

    /// Runs `command` in this session (see [`Pool::execute_in_session`]).
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value, Error> {
        self.pool.execute_in_session(&self.id, command, args).await
    }

    /// Runs `command` in this session with options (see [`Pool::execute_in_session_with`]).
    pub async fn execute_with(
        &self,
        command: &str,
        args: Payload,
        opts: CallOptions,
    ) -> Result<Payload, Error> {
        self.pool.execute_in_session_with(&self.id, command, args, opts).await
    }

    /// Closes the session; returns whether it existed.
    pub async fn close(self) -> Result<bool, Error> {
        self.pool.session_store().close(&self.id).await
    }
}

impl Pool {
    /// Creates a session (or returns the existing one with that id: creation is idempotent and
    /// safe when many callers race). Fails with `SessionQuotaExceeded` when the store is full.
    pub async fn create_session(&self, id: &str, metadata: Value) -> Result<Session, Error> {
        self.session_store().create(id, metadata).await?;
        Ok(Session::new(self, id.to_owned()))
    }

    /// A handle on an existing session (`SessionNotFound` if it does not exist or expired).
    pub async fn session(&self, id: &str) -> Result<Session, Error> {
        match self.session_store().get(id).await? {
            Some(_) => Ok(Session::new(self, id.to_owned())),
            None => Err(Error::SessionNotFound { id: id.to_owned() }),
        }
    }

    /// The ids of the live sessions.
    pub async fn list_sessions(&self) -> Result<Vec<String>, Error> {
        self.session_store().list().await
    }
}

/// The pool's global variables: pool-wide values outside any session (the original Snakepit's
/// global programs and values), shared with every worker through the `global.*` host calls
/// (`ctx.globals` in the Python and Node SDKs). They live in the session store and never expire.
#[derive(Debug, Clone, Copy)]
pub struct Globals<'a> {
    pool: &'a Pool,
}

impl Globals<'_> {
    /// A global's value, if it is set.
    pub async fn get(&self, name: &str) -> Result<Option<Value>, Error> {
        self.pool.session_store().get_global(name).await
    }

    /// Sets a global.
    pub async fn set(&self, name: &str, value: Value) -> Result<(), Error> {
        self.pool.session_store().set_global(name, value).await
    }

    /// Deletes a global; returns whether it was set.
    pub async fn delete(&self, name: &str) -> Result<bool, Error> {
        self.pool.session_store().delete_global(name).await
    }
}

impl Pool {
    /// The pool's global variables (see [`Globals`]).
    pub fn globals(&self) -> Globals<'_> {
        Globals { pool: self }
    }
}

impl Pool {
    /// Creates a session with options: its own time-to-live (`SessionOptions::with_ttl`),
    /// instead of the pool's `session_ttl`. Idempotent as [`create_session`](Pool::create_session)
    /// (an existing session keeps its options).
    pub async fn create_session_with(
        &self,
        id: &str,
        metadata: Value,
        opts: snakepit_core::SessionOptions,
    ) -> Result<Session, Error> {
        self.session_store().create_with(id, metadata, opts).await?;
        Ok(Session::new(self, id.to_owned()))
    }

    /// Changes a session's metadata with `update` (read-modify-write, atomic with respect to
    /// other updates of that session) and returns the session's record. `SessionNotFound` if
    /// it does not exist.
    pub async fn update_session(
        &self,
        id: &str,
        update: impl FnOnce(&mut Value) + Send,
    ) -> Result<snakepit_core::SessionRecord, Error> {
        self.session_store().update_metadata(id, Box::new(update)).await
    }

    /// The session store's counters: live sessions, created, expired, quota refusals.
    pub async fn session_stats(&self) -> Result<snakepit_core::SessionStats, Error> {
        self.session_store().stats().await
    }
}
