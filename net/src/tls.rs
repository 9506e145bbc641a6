//! TLS for the gRPC plane over TCP (router feed, TransferService, health): the daemon serves
//! with its certificate and accepts only clients presenting one its CA signed (mutual TLS);
//! daemons pulling from each other and routers dial with the same files. Peers are verified by
//! one agreed name (`server_name`), not by the address dialed: a prefill daemon is named by its
//! node's IP, and one certificate for that name can serve every node. The unix socket stays
//! plain (its file mode guards it). Certificates replaced on disk are picked up by the next
//! connection, accepted or dialed, without a restart ([`Reloading`]).

mod accept;
mod channels;
mod reload;

pub use accept::{incoming, server_config, server_tls, ServerTls};
pub use channels::Channels;
pub use reload::Reloading;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Client-side TLS that follows its files.
pub type ClientTls = Reloading<ClientTlsConfig>;

/// Client-side TLS for `files`, read now (bad files fail the start) and again when they change.
pub fn client_tls(files: &TlsConfig) -> anyhow::Result<Arc<ClientTls>> {
    Ok(Arc::new(Reloading::new(files.clone(), TlsConfig::client)?))
}

/// Where the certificate, key and CA are (PEM files); all empty: plain gRPC.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// This daemon's (or router's) certificate chain, presented to peers both ways.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signed every daemon's and router's certificate: peers must present one.
    pub ca: PathBuf,
    /// The name every peer's certificate is checked for (a DNS SAN).
    pub server_name: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { cert: PathBuf::new(), key: PathBuf::new(), ca: PathBuf::new(), server_name: "kvtierd".into() }
    }
}

/// The TLS files' contents, each read once.
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

/// The TLS files, parsed.
struct Parsed {
    /// Our certificate chain.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The CA's certificates.
    cas: Vec<CertificateDer<'static>>,
}

fn read(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("grpc.tls.{what} {}: {e}", path.display()))
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    /// Checks that the settings are all given or all empty (half a TLS setup is refused, not
    /// silently run in plain text).
    pub fn validate(&self) -> anyhow::Result<()> {
        let given = [&self.cert, &self.key, &self.ca].map(|p| !p.as_os_str().is_empty());
        anyhow::ensure!(
            given.iter().all(|&g| g) || given.iter().all(|&g| !g),
            "grpc.tls: give cert, key and ca together (mutual TLS), or none of them"
        );
        anyhow::ensure!(!self.enabled() || !self.server_name.is_empty(), "grpc.tls.server_name must not be empty");
        Ok(())
    }

    /// The three files, each read once (what is checked is what is used, even while they are
    /// being replaced).
    fn read(&self) -> anyhow::Result<Pem> {
        Ok(Pem { cert: read("cert", &self.cert)?, key: read("key", &self.key)?, ca: read("ca", &self.ca)? })
    }

    /// `pem` parsed, so that a file replaced by something else is noticed before it is used.
    fn parse(&self, pem: &Pem) -> anyhow::Result<Parsed> {
        let certs = |what: &str, path: &Path, bytes: &[u8]| -> anyhow::Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("grpc.tls.{what} {}: {e}", path.display()))?;
            anyhow::ensure!(!certs.is_empty(), "grpc.tls.{what} {}: no certificate in it", path.display());
            Ok(certs)
        };
        let chain = certs("cert", &self.cert, &pem.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&pem.key)
            .map_err(|e| anyhow::anyhow!("grpc.tls.key {}: no private key in it ({e})", self.key.display()))?;
        Ok(Parsed { chain, key, cas: certs("ca", &self.ca, &pem.ca)? })
    }

    /// The client side: the CA to trust, our identity, the name peers are checked for.
    pub fn client(&self) -> anyhow::Result<ClientTlsConfig> {
        let pem = self.read()?;
        self.parse(&pem)?;
        let identity = Identity::from_pem(pem.cert, pem.key);
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem.ca)).identity(identity);
        Ok(tls.domain_name(self.server_name.clone()))
    }
}

/// An endpoint for the gRPC server at `addr` (`host:port` or a URL) over TCP, with TLS when
/// `tls` is given: short connect timeout, no Nagle, and keep-alives so that a stream over a dead
/// link is noticed within seconds.
pub fn endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    let bare = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{bare}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_tls_setup_is_refused() {
        assert!(TlsConfig::default().validate().is_ok());
        let half = TlsConfig { cert: "c.pem".into(), key: "k.pem".into(), ..Default::default() };
        assert!(half.validate().unwrap_err().to_string().contains("together"));
        let nameless = TlsConfig { cert: "c".into(), key: "k".into(), ca: "a".into(), server_name: String::new() };
        assert!(nameless.validate().is_err());
    }

    #[test]
    fn endpoints_take_the_scheme_of_their_security() {
        assert_eq!(endpoint("10.0.0.5:9465", None).unwrap().uri().to_string(), "http://10.0.0.5:9465/");
        assert_eq!(endpoint("http://h:1", None).unwrap().uri().to_string(), "http://h:1/");
        let tls = ClientTlsConfig::new().domain_name("kvtierd");
        assert_eq!(endpoint("http://h:1", Some(&tls)).unwrap().uri().to_string(), "https://h:1/");
    }
}
