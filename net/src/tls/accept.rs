//! The server side of TLS, done here rather than by tonic so that each connection is accepted
//! with the certificate current when it arrives ([`Reloading`]).

use super::{Parsed, Reloading, TlsConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// Server-side TLS that follows its files.
pub type ServerTls = Reloading<Arc<ServerConfig>>;

/// How long a client has to complete its handshake before its connection is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// TLS connections accepted (handshake done) and not yet taken by the server.
const QUEUED: usize = 64;

/// Handshakes in progress at most: past it, new connections are closed at once, so clients
/// that connect and stall cannot pile up sockets and tasks (each may take `HANDSHAKE`).
const MAX_HANDSHAKES: usize = 256;

/// The rustls server configuration of `files`: our certificate chain and key, client
/// certificates required and checked against the CA (mutual TLS), HTTP/2 offered by ALPN.
pub fn server_config(files: &TlsConfig) -> anyhow::Result<Arc<ServerConfig>> {
    let Parsed { chain, key, cas } = files.parse(&files.read()?)?;
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| anyhow::anyhow!("grpc.tls.ca {}: {e}", files.ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder(roots.into()).build()?;
    let mut config = ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Server-side TLS for `files`, read now (bad files fail the start) and again when they change.
pub fn server_tls(files: &TlsConfig) -> anyhow::Result<Arc<ServerTls>> {
    Ok(Arc::new(Reloading::new(files.clone(), server_config)?))
}

/// The connections accepted on `tcp` (without Nagle), each through a TLS handshake with the
/// certificate current when it arrived, for `serve_with_incoming`. Handshakes run in tasks of
/// their own, so a slow or silent client holds up no other (and at most `MAX_HANDSHAKES` of
/// them at a time); a failed one only closes its connection.
pub fn incoming(tcp: TcpListener, tls: Arc<ServerTls>) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(QUEUED);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        while !tx.is_closed() {
            let (stream, peer) = match tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!("gRPC (TCP) accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&handshakes).try_acquire_owned() else {
                tracing::debug!(%peer, "{MAX_HANDSHAKES} TLS handshakes in progress: connection closed");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (tx, acceptor) = (tx.clone(), TlsAcceptor::from(tls.current().1));
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake not done within {HANDSHAKE:?}"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
