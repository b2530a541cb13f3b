//! The crate's error: what can be wrong with a remote set-up before any call is made.

/// A remote set-up that cannot work: a bad URL, an unreadable or invalid PEM file, an address
/// that cannot be bound or is not allowed. Calls and worker starts report
/// [`snakepit_core::Error`] instead (`transport_setup`, `agent_lost`, ...).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An agent URL that cannot be used.
    #[error("agent URL `{url}`: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why not.
        reason: String,
    },
    /// A certificate or key file that cannot be read or used.
    #[error("TLS: {path}: {reason}")]
    Tls {
        /// The file (or the setting) at fault.
        path: String,
        /// Why.
        reason: String,
    },
    /// Plaintext was asked for an address that is not loopback.
    #[error("--insecure-plaintext is for loopback addresses only; {addr} is not one (use TLS)")]
    InsecureNotLoopback {
        /// The address.
        addr: String,
    },
    /// The listening address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the agent's gRPC server failed: {0}")]
    Serve(String),
}

impl From<Error> for snakepit_core::Error {
    /// A set-up error is a configuration error (kind `config`), keyed by what it is about.
    fn from(e: Error) -> Self {
        let key = match &e {
            Error::Url { .. } | Error::InsecureNotLoopback { .. } => "remote.agents",
            Error::Tls { .. } => "remote.tls",
            Error::Bind { .. } | Error::Serve(_) => "remote.listen",
        };
        snakepit_core::Error::Config {
            origin: None,
            line: None,
            key: key.into(),
            reason: e.to_string(),
            source: None,
        }
    }
}
