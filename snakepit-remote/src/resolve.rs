//! Name resolution for agent URLs: a DNS name may stand for several agents (a Kubernetes
//! headless service has one address per ready pod), re-resolved periodically.

use std::net::SocketAddr;

use async_trait::async_trait;

/// Resolves an agent URL's host to the addresses of the agents behind it. The default is the
/// system resolver ([`DnsResolver`]); tests inject their own.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    /// The addresses `host:port` stands for now (an IP address stands for itself).
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct DnsResolver;

#[async_trait]
impl Resolve for DnsResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }
}
