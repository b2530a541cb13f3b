//! Remote worker hosts for snakepit.
//!
//! One machine's cores are sometimes not enough. This crate puts workers on other machines,
//! reached over what people already run: gRPC over TCP with mutual TLS, the standard gRPC
//! health service, DNS names re-resolved as a Kubernetes headless service changes.
//!
//! * The **agent** side ([`server`]): [`server::bind`] and [`server::Listener::serve`] serve any [`Backend`] — in practice a
//!   local snakepit pool, whose workers keep their local stdio transport, supervision and
//!   no-orphans guarantee — as the `snakepit.v1.Agent` service (`proto/snakepit/v1/agent.proto`).
//!   Each call is one bidirectional stream carrying the call, its stream chunks and credit, its
//!   cancel, and the worker's host calls back to the front end that made it.
//! * The **front-end** side ([`Remote`]): an [`Adapter`](snakepit_core::Adapter) whose
//!   [`Launcher`](snakepit_core::Launcher) "starts" a worker by binding one worker's worth of an
//!   agent's capacity. A pool built on it supervises remote workers exactly like local ones:
//!   heartbeats, restart with backoff when an agent is lost, session affinity, deadlines,
//!   cancellation. It is written against the public plug-in traits only.
//!
//! TLS uses rustls with the `ring` provider only ([`tls::install_crypto_provider`]).

use std::fmt;

/// The `snakepit.v1.Agent` protocol, generated from `proto/snakepit/v1/agent.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used, unreachable_pub)]
pub mod proto {
    tonic::include_proto!("snakepit.v1");
}

mod client;
mod error;
mod io;
mod resolve;
pub mod server;
pub mod tls;
mod wire;

pub use client::{Remote, RemoteOptions};
pub use error::Error;
pub use resolve::{DnsResolver, Resolve};
pub use server::{Backend, BackendCall, Capacity};
pub use tls::{ClientTls, ServerTls};

/// Where an agent is: its URL as configured (`https://host:port`), the host name (for the TLS
/// server name) and the port. Parsed with [`AgentUrl::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentUrl {
    /// The URL as given.
    pub url: String,
    /// Whether it is `http://` (plaintext, loopback only).
    pub plaintext: bool,
    /// The host: a DNS name or an IP address.
    pub host: String,
    /// The port (default 7443).
    pub port: u16,
}

/// The largest gRPC message either side accepts: a frame of the local transports
/// ([`snakepit_core::DEFAULT_MAX_FRAME`]) plus room for the envelope.
pub const MAX_MESSAGE: usize = snakepit_core::DEFAULT_MAX_FRAME + (1 << 20);

/// The port an agent listens on when a URL names none.
pub const DEFAULT_PORT: u16 = 7443;

impl AgentUrl {
    /// Parses `https://host[:port]` (or `http://` for plaintext; the caller decides whether
    /// that is allowed).
    pub fn parse(s: &str) -> Result<AgentUrl, Error> {
        let bad = |reason: &str| Error::Url { url: s.to_owned(), reason: reason.to_owned() };
        let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        let plaintext = match u.scheme() {
            "https" => false,
            "http" => true,
            _ => return Err(bad("the scheme must be https:// (or http:// for plaintext on loopback)")),
        };
        if u.path() != "/" && !u.path().is_empty() || u.query().is_some() {
            return Err(bad("an agent URL has no path or query"));
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(bad("no host")),
        };
        let port = u.port().unwrap_or(DEFAULT_PORT);
        Ok(AgentUrl { url: s.trim_end_matches('/').to_owned(), plaintext, host, port })
    }

    /// Whether the host is a loopback address (`127.0.0.0/8`, `::1`) or `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_parse_and_refuse_what_they_should() {
        let u = AgentUrl::parse("https://agent-a.internal:7443").expect("parses");
        assert_eq!((u.host.as_str(), u.port, u.plaintext), ("agent-a.internal", 7443, false));
        assert!(!u.is_loopback());
        let u = AgentUrl::parse("https://10.0.0.7").expect("parses");
        assert_eq!(u.port, DEFAULT_PORT);
        let u = AgentUrl::parse("http://127.0.0.1:9000/").expect("parses");
        assert!(u.plaintext && u.is_loopback());
        assert_eq!(u.url, "http://127.0.0.1:9000");
        assert!(AgentUrl::parse("https://[::1]:1").expect("v6").is_loopback());
        for bad in ["ftp://x", "x:1", "https://a/b", "https://a?x=1", ""] {
            assert!(AgentUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
